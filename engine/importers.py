"""``geochange import-weights``: foreign checkpoints of the formats below into GeoChange packages.

The file is read and its keys mapped by ``engine.checkpoints`` with the rules that live beside the
model (``models/tinycd.py``): every source tensor must map to exactly one model tensor of the same shape
and every model tensor must be filled, or nothing is written.
"""
from __future__ import annotations

import os
from pathlib import Path

from geochange.engine import models
from geochange.engine.atomic import same_file
from geochange.engine.checkpoints import map_state_dict, read_checkpoint
from geochange.engine.errors import OptionError, PackageError
from geochange.engine.header import read_metadata
from geochange.engine.manifest import make_manifest
from geochange.engine.models.tinycd import AUTHORS_RULES as TINYCD_RULES
from geochange.engine.package import save_package

FORMATS = {
    "tinycd": {
        "architecture": "tinycd",
        "rules": TINYCD_RULES,
        "tile": 256,  # LEVIR-CD and WHU-CD cut into 256 px crops, as the authors train and test
        "gsd": 0.5,  # LEVIR-CD's pixels (Chen and Shi, Remote Sensing 2020); WHU-CD's are 0.3 m
        "training": {"dataset": "LEVIR-CD", "method": "plain",
                     "metrics": {"f1_change_global_levir_test_published": 0.9105,
                                 "iou_change_global_levir_test_published": 0.8357}},
        "source": "TinyCD authors' released weights (AndreaCodegoni/Tiny_model_4_CD, pretrained_models/)",
        "licence": "the authors' release terms (research / non-commercial use)",
    },
}


def import_weights(fmt: str, source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Convert a foreign checkpoint of format ``fmt`` into a package at ``destination``."""
    if fmt not in FORMATS:
        raise OptionError(f"--format: unknown format {fmt!r}; known: {', '.join(sorted(FORMATS))}")
    if same_file(source, destination):  # the checkpoint would be replaced by its package
        raise OptionError(f"{destination}: the package would replace the checkpoint it is made from; name another file")
    try:
        read_metadata(source)
    except PackageError:
        pass  # not a package: a foreign checkpoint, as it should be
    else:
        raise OptionError(f"{source}: already a GeoChange package; detect, evaluate and the trainer take it as it is")
    info = FORMATS[fmt]
    model = models.create(info["architecture"])
    mapped = map_state_dict(read_checkpoint(source), model.state_dict(), info["rules"], origin=str(source),
                            target=info["architecture"])
    model.load_state_dict(mapped.state, strict=True)
    manifest = make_manifest(info["architecture"], tile=info["tile"], gsd=info["gsd"], training=info["training"],
                             licence=info["licence"], source=f"{info['source']}: {Path(source).name}")
    return save_package(model, manifest, destination)
