import sys

from geochange.trainer.cli import main

sys.exit(main())
