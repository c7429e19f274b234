"""The model zoo: a finished run exported with fp16 weights and checked, recorded by sha256, chosen by name;
and the zoo shipped in zoo/: every package matches its record, loads, and scores what it recorded."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from geochange.engine.cli import main as geochange
from geochange.engine.errors import PackageError
from geochange.engine.package import load_package
from geochange.engine.zoo import describe_zoo, format_zoo, zoo_index, zoo_path
from geochange.trainer.config import ConfigError
from geochange.trainer.data import build_splits
from geochange.trainer.export import check_figures, export_run, fp16_moves
from geochange.trainer.loop import Trainer
from conftest import REPO
from trainer_setup import small_config


@pytest.fixture(scope="module")
def finished_run(shared_data, tinycd_package, tmp_path_factory):
    """The TinyCD authors' weights through one training step of (nearly) zero learning rate on LEVIR-CD:
    a finished run whose predictions are confident, as a trained model's are."""
    run = tmp_path_factory.mktemp("run")
    cfg = small_config(run, shared_data / "levir_cd", "tinycd", model={"init": str(tinycd_package)},
                       optim={"lr": 1e-9}, schedule={"iterations": 1, "warmup": 0}, train={"val_interval": 1})
    Trainer(cfg).fit()
    return run


def test_a_finished_run_goes_into_the_zoo_in_fp16(finished_run, tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    with pytest.raises(ConfigError, match="only a finished run"):
        export_run(tmp_path, "nothing", task="t", data_licence="l", zoo=zoo)
    record = export_run(finished_run, "tiny_buildings", task="buildings: optical before and after",
                        data_licence="LEVIR-CD: research only", gsd=0.5, zoo=zoo)
    assert zoo_index(zoo) == {"tiny_buildings": record}
    path = zoo_path("tiny_buildings", zoo)
    with safe_open(str(path), framework="pt") as f:
        floats = [f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()]
    assert floats and set(floats) == {torch.float16}
    package = load_package(path)
    assert all(p.dtype == torch.float32 for p in package.model.parameters())  # loaded as fp32
    assert package.manifest["task"] == "buildings: optical before and after" and package.manifest["gsd"] == 0.5
    # The figures recorded are the fp16 weights' own, within 0.002 of the run's fp32 test.
    run_test = json.loads((finished_run / "results.json").read_text())["test"]["global"]
    shipped = package.manifest["training"]["metrics"]["test"]["global"]
    assert all(abs(shipped[k] - run_test[k]) <= 0.002 for k in ("f1", "iou", "mIoU", "oa"))
    [entry] = describe_zoo(zoo)
    assert entry["test"]["f1"] == shipped["f1"] and entry["sha256"] == record["sha256"]
    assert entry["recipe"]["command"] and "commit" in entry["recipe"]
    assert "tiny_buildings  (tinycd) buildings" in format_zoo([entry])
    # A package changed after it was recorded is refused by name.
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(PackageError, match="does not match its record"):
        zoo_path("tiny_buildings", zoo)


@pytest.mark.parametrize("name", ["bad/name", "", ".hidden", "../up", "m1.safetensors", "a b"])
def test_an_export_name_that_is_no_zoo_name_is_refused_before_anything_is_written(name, tmp_path):
    """``bad/name`` wrote zoo/bad/name.safetensors and an index entry that broke ``geochange zoo``; '' a hidden
    file."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    with pytest.raises(ConfigError, match="a zoo name is letters, digits"):
        export_run(tmp_path, name, task="t", data_licence="l", zoo=zoo)
    assert not any(zoo.iterdir())


def test_an_existing_zoo_name_is_replaced_only_when_asked_and_corrupt_results_are_refused(tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "index.json").write_text(json.dumps({"m1": {"file": "m1.safetensors", "bytes": 1, "sha256": "0"}}))
    with pytest.raises(ConfigError, match="has a model of this name already; give --replace"):
        export_run(tmp_path, "m1", task="t", data_licence="l", zoo=zoo)
    (tmp_path / "results.json").write_text('{"test": {"global": ')  # cut short
    for replace, name in ((True, "m1"), (False, "m2")):
        with pytest.raises(ConfigError, match=r"results.json: not a run's results, the file is corrupt"):
            export_run(tmp_path, name, task="t", data_licence="l", zoo=zoo, replace=replace)


def test_fp16_moves_count_a_figure_undefined_on_one_side_only_as_a_move():
    """results.json writes an undefined figure as null (JSON has no NaN); the fp16 weights' own is NaN."""
    nan = float("nan")
    run = {"f1": None, "iou": None, "mIoU": 0.5, "oa": 0.9}
    assert fp16_moves({"f1": nan, "iou": nan, "mIoU": 0.501, "oa": 0.9}, run) == pytest.approx(
        {"f1": 0.0, "iou": 0.0, "mIoU": 0.001, "oa": 0.0})
    moved = fp16_moves({"f1": 0.0, "iou": 0.0, "mIoU": 0.5, "oa": 0.9}, run)
    assert moved["f1"] != moved["f1"] and not abs(moved["f1"]) <= 0.002  # NaN: refused by any tolerance
    moved = fp16_moves({"f1": nan, "iou": nan, "mIoU": 0.5, "oa": 0.9}, dict(run, f1=0.1, iou=0.05))
    assert not all(abs(v) <= 0.002 for v in moved.values())


def test_an_unknown_model_name_lists_the_zoo(capsys):
    assert geochange(["info", "no_such_model"]) == 2
    assert "no such model file, nor a zoo model's name" in capsys.readouterr().err


@pytest.mark.skipif(not zoo_index(), reason="zoo/ is empty")
def test_a_folder_named_as_a_zoo_model_does_not_hide_it(tmp_path, monkeypatch, capsys):
    """An output folder named after the model (``--out tinycd_flood``) is not a model file."""
    name = sorted(zoo_index())[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir()
    assert geochange(["info", name]) == 0
    shown = capsys.readouterr().out
    assert "architecture" in shown
    # The training run's config and figures (kilobytes of JSON) are cut to a line; --json has them whole.
    assert max(len(line) for line in shown.splitlines()) < 200 and "... (--json: all)" in shown
    # Nor does a file so named (planted in a downloaded folder): the name is the zoo's checked file; ./NAME the file.
    from geochange.engine.zoo import resolve_model

    (tmp_path / name).rmdir()
    (tmp_path / name).write_bytes(b"not the zoo's")
    assert resolve_model(name) == zoo_path(name) and resolve_model(f"./{name}").resolve() == tmp_path / name
    assert resolve_model(resolve_model(f"./{name}")).resolve() == tmp_path / name  # as loaders resolve it again
    assert geochange(["info", f"./{name}"]) == 2  # the file, not the zoo's model
    assert f"{tmp_path / name}: truncated or not a safetensors file" in capsys.readouterr().err


SHIPPED = zoo_index()


@pytest.mark.parametrize("name", sorted(SHIPPED) or [pytest.param(None, marks=pytest.mark.skip("zoo/ is empty"))])
def test_every_shipped_zoo_model_loads_and_scores_what_it_recorded(name, shared_data, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes name their data relative to the repository, as they are run
    path = zoo_path(name)  # size and sha256 as recorded
    package = load_package(name)  # by name, as --model NAME
    assert package.path == path
    training = package.manifest["training"]
    assert len(build_splits(training["config"]["data"]["datasets"])["test"]) == training["data"]["test"]
    check = check_figures(package, training["config"])
    recorded = training["metrics"]["check"]
    assert check["tiles"] == recorded["tiles"] and check["f1"] >= recorded["f1"] - 0.02
    assert geochange(["zoo"]) == 0 and name in capsys.readouterr().out


def zoo_tested(name: str) -> tuple[dict, list[str]]:
    """A zoo model's recorded test summary and the `geochange evaluate` options that test it as the trainer did."""
    tested = load_package(name).manifest["training"]["metrics"]["test"]
    return tested, ["--tta"] if tested.get("tta") else []


@pytest.mark.parametrize("name", sorted(SHIPPED) or [pytest.param(None, marks=pytest.mark.skip("zoo/ is empty"))])
def test_evaluate_reproduces_the_trainers_test_figures(name, shared_data, tmp_path, capsys):
    """One prediction path: `geochange evaluate` on OMBRIA's 70 test tiles gives the figures the trainer's
    test recorded in the package (with its TTA), on the same images."""
    tested, options = zoo_tested(name)
    out = tmp_path / "metrics.json"
    assert geochange(["evaluate", "--model", name, "--data", str(shared_data / "ombria_full" / "test"),
                      "--device", "cpu", "--precision", "fp32", "--json", str(out), *options]) == 0
    summary = json.loads(out.read_text())
    assert summary["tta"] == tested.get("tta") and summary["tile"] == load_package(name).tile
    assert summary["files"] == [f.rsplit("/", 1)[1] for f in tested["files"]]
    for scope in ("global", "per_image"):
        for key in ("f1", "iou", "mIoU", "oa"):
            assert summary[scope][key] == pytest.approx(tested[scope][key], abs=0.001), (scope, key)


@pytest.mark.parametrize("name", sorted(SHIPPED) or [pytest.param(None, marks=pytest.mark.skip("zoo/ is empty"))])
def test_a_zoo_model_detects_on_plain_and_georeferenced_pairs(name, shared_data, tmp_path, capsys):
    """A test tile pair as the PNG files it comes in (paired pixel for pixel) and as GeoTIFFs placed in UTM:
    the same windows (the model's tile, from its package), so the same change mask."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from geochange.engine.rasters import read_image

    tiles = shared_data / "ombria_full" / "test"
    tile = sorted(p.name for p in (tiles / "A").iterdir())[0]
    plain = [tiles / "A" / tile, tiles / "B" / tile]
    placed = []
    for path in plain:
        pixels = read_image(path)
        placed.append(tmp_path / f"{path.parent.name}.tif")
        with rasterio.open(placed[-1], "w", driver="GTiff", width=256, height=256, count=len(pixels),
                           dtype=pixels.dtype, crs="EPSG:32633", transform=from_origin(500000, 5000000, 10, 10)) as dst:
            dst.write(pixels)
    masks = []
    for pair, out in ((plain, tmp_path / "plain"), (placed, tmp_path / "placed")):
        assert geochange(["detect", *map(str, pair), "--model", name, "--out", str(out), "--device", "cpu"]) == 0
        assert f"windows of {load_package(name).tile} px: the model's tile" in "".join(capsys.readouterr())
        with rasterio.open(out / "change_mask.tif") as src:
            masks.append(src.read(1))
    assert (masks[0] == 255).any() and np.array_equal(masks[0], masks[1])


def test_baselines_on_the_ombria_test_tiles(shared_data):
    """The figures the zoo models are compared with (README), from the metric code the models use."""
    from geochange.trainer.baselines import BASELINES
    from geochange.trainer.evaluation import evaluate_items

    items = build_splits([{"root": str(shared_data / "ombria_full")}])["test"]
    assert len(items) == 70
    figures = {name: evaluate_items(predict, items)["global"] for name, predict in BASELINES.items()}
    assert figures["all no change"]["f1"] == 0 and figures["all no change"]["oa"] == pytest.approx(0.6663, abs=1e-4)
    otsu = figures["Otsu on the post SAR image"]
    assert (otsu["f1"], otsu["iou"], otsu["mIoU"]) == pytest.approx((0.6375, 0.4679, 0.5708), abs=1e-4)
