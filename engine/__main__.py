import sys

from geochange.engine.cli import main

sys.exit(main())
