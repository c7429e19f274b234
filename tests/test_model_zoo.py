"""Every registered variant: a package round trip, the CLI and the Processing algorithm on real pixels."""
import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from geochange.engine.manifest import make_manifest
from geochange.engine.models import create, list_models, spec
from geochange.engine.package import load_package, save_package

VARIANTS = list_models()


@pytest.fixture(scope="module")
def crop(shared_data, tmp_path_factory):
    """A 128 px crop of the LEVIR tile: RGB pre and post, and the post's first band as a grey image
    for the models whose post date is SAR."""
    folder = tmp_path_factory.mktemp("zoo")
    window = Window(448, 448, 128, 128)
    paths = {}
    for name, bands in (("pre", [1, 2, 3]), ("post", [1, 2, 3]), ("post_grey", [1])):
        with rasterio.open(shared_data / "levir_tile_georef" / f"{name.split('_')[0]}.tif") as src:
            profile = dict(src.profile, width=128, height=128, count=len(bands), transform=src.window_transform(window))
            data = src.read(bands, window=window)
        paths[name] = folder / f"{name}.tif"
        with rasterio.open(paths[name], "w", **profile) as dst:
            dst.write(data)
    return paths


def create_seeded(name):
    torch.manual_seed(0)
    return create(name).eval()


def post_of(name, crop):
    return crop["post_grey"] if spec(name).inputs[1]["modality"] == "sar" else crop["post"]


@pytest.mark.parametrize("name", VARIANTS)
def test_package_round_trip_gives_identical_outputs(name, tmp_path):
    model = create_seeded(name)
    path = save_package(model, make_manifest(name), tmp_path / f"{name}.safetensors")
    loaded = load_package(path)
    pre, post = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(pre, post), loaded.model(pre, post))


@pytest.mark.parametrize("name", VARIANTS)
def test_cli_detect_runs_every_variant(name, crop, tmp_path):
    path = save_package(create_seeded(name), make_manifest(name), tmp_path / f"{name}.safetensors")
    run = subprocess.run([sys.executable, "-m", "geochange.engine", "detect", str(crop["pre"]),
                          str(post_of(name, crop)), "--model", str(path), "--out", str(tmp_path / "out"),
                          "--tile", "128", "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    with rasterio.open(tmp_path / "out" / "change_probability.tif") as p:
        prob = p.read(1)
    assert prob.shape == (128, 128) and np.isfinite(prob).all() and 0 <= prob.min() <= prob.max() <= 1


def test_models_command_lists_every_variant_with_its_size():
    run = subprocess.run([sys.executable, "-m", "geochange.engine", "models"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines()[1:] if line.split()[0] in VARIANTS}
    assert set(rows) == set(VARIANTS)
    assert float(rows["tinycd"][1]) == pytest.approx(0.285, abs=0.0005)
    assert float(rows["sscfnet_r50"][1]) == pytest.approx(28.690, abs=0.001)  # auxiliary heads left out
    assert rows["tinycd"][3] == "-" and "nan" not in run.stdout  # GFLOPs counted with --flops only

    # Read in part (`| head`): the rest goes nowhere, without a traceback. Unbuffered, each line meets the closed pipe.
    reader = subprocess.Popen([sys.executable, "-m", "geochange.engine", "models"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    reader.stdout.readline()
    reader.stdout.close()
    assert reader.wait(timeout=600) == 1 and reader.stderr.read() == ""


@pytest.mark.parametrize("name", VARIANTS)
def test_processing_algorithm_runs_every_variant(name, crop, geochange_provider, tmp_path):
    from conftest import run_algorithm

    path = save_package(create_seeded(name), make_manifest(name), tmp_path / f"{name}.safetensors")
    result = run_algorithm("geochange:detectchanges", {
        "PRE": str(crop["pre"]), "POST": str(post_of(name, crop)), "MODEL": str(path), "DEVICE": "cpu",
        "TILE_SIZE": 128, "OUTPUT_PROBABILITY": str(tmp_path / "p.tif"), "OUTPUT_MASK": str(tmp_path / "m.tif"),
        "OUTPUT_POLYGONS": str(tmp_path / "c.gpkg")})
    with rasterio.open(result["OUTPUT_PROBABILITY"]) as p:
        prob = p.read(1)
    assert prob.shape == (128, 128) and np.isfinite(prob).all() and 0 <= prob.min() <= prob.max() <= 1
