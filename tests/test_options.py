"""The run options' one definition (engine/options.py): checks, and the command line built from it."""
from __future__ import annotations

import pytest

from geochange.engine.cli import build_parser, parsed_options
from geochange.engine.errors import OptionError
from geochange.engine.options import DETECT, EVALUATE, DetectOptions, flag, names, spec


def test_values_are_checked_and_named_as_the_command_line_spells_them():
    refused = {"tile": 16, "overlap": -1, "batch": 0, "threshold": float("nan"), "resolution": 0.0, "min_area": -1.0,
               "grid": "both", "precision": "int8", "tta": "yes", "pre_bands": [0], "post_bands": "1", "device": 3}
    for name, value in refused.items():
        with pytest.raises(OptionError, match=f"^{flag(name)} must be"):
            DetectOptions(**{name: value})
    with pytest.raises(OptionError, match=r"--overlap must be in \[0, tile\) = \[0, 64\), not 64"):
        DetectOptions(tile=64, overlap=64)
    with pytest.raises(OptionError, match="unknown evaluate option pre_bands; known: device, tile"):
        DetectOptions.of({"pre_bands": [1]}, EVALUATE)
    # JSON gives lists and whole numbers where the engine keeps tuples and floats.
    options = DetectOptions.of({"pre_bands": [3, 2, 1], "threshold": 1, "simplify": 2})
    assert options.pre_bands == (3, 2, 1) and options.threshold == 1.0 and isinstance(options.simplify, float)


def test_the_command_line_offers_each_option_with_its_default():
    parser = build_parser()
    args = parser.parse_args(["detect", "a.tif", "b.tif", "--model", "m", "--out", "o"])
    assert parsed_options(args, DETECT) == {name: spec(name).default for name in names(DETECT)}
    args = parser.parse_args(["detect", "a.tif", "b.tif", "--model", "m", "--out", "o", "--pre-bands", "3,2,1",
                              "--tile", "256", "--tta", "--grid", "post", "--sar-db", "--precision", "fp32"])
    chosen = parsed_options(args, DETECT)
    assert (chosen["pre_bands"], chosen["tile"], chosen["tta"], chosen["grid"], chosen["sar_db"],
            chosen["precision"]) == ((3, 2, 1), 256, True, "post", True, "fp32")
    evaluate = parser.parse_args(["evaluate", "--model", "m", "--data", "d", "--overlap", "32"])
    assert parsed_options(evaluate, EVALUATE) == {**{name: spec(name).default for name in names(EVALUATE)},
                                                  "overlap": 32}
    with pytest.raises(SystemExit):  # a detect-only option is no evaluate argument
        parser.parse_args(["evaluate", "--model", "m", "--data", "d", "--pre-bands", "1"])
