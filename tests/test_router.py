"""O-P routing: each window's prediction comes from the teacher of the original model's CAR."""
import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from geochange.engine.detect import detect
from geochange.engine.errors import PackageError
from geochange.engine.manifest import make_manifest
from geochange.engine.models import create
from geochange.engine.package import load_model, load_package, read_manifest, save_package, save_router
from geochange.engine.predictor import Predictor
from geochange.engine.routing import RouterPredictor, route


def test_route_boundaries_follow_the_authors():
    for dtype in (torch.float32, torch.float64):
        car = torch.tensor([0.0, 0.05, 0.0500001, 0.2, 0.2000001, 1.0], dtype=dtype)
        # O-P inference (the authors' test code): CAR <= t.
        assert route(car, [0.05, 0.2], inclusive=True).tolist() == [0, 0, 1, 1, 2, 2]
        # Training partitions and distillation: CAR < t.
        assert route(car, [0.05, 0.2]).tolist() == [0, 1, 1, 2, 2, 2]
    assert route(torch.tensor([1 / 20, 4 / 20]), [0.05, 0.2]).tolist() == [1, 2]  # 1 and 4 px of 20
    assert route(torch.tensor([0.1, 0.1000001]), [0.1], inclusive=True).tolist() == [0, 1]


def constant_teacher(path, logit):
    """A TinyCD whose classifier ignores its input: probability sigmoid(logit) everywhere."""
    model = create("tinycd").eval()
    with torch.no_grad():
        model.classifier[-1].weight.zero_()
        model.classifier[-1].bias.fill_(logit)
    return save_package(model, make_manifest("tinycd"), path)


@pytest.fixture(scope="module")
def router(tinycd_package, tmp_path_factory):
    folder = tmp_path_factory.mktemp("router")
    teachers = [(name, constant_teacher(folder / f"{name}.safetensors", logit))
                for name, logit in (("small", -3.0), ("medium", 0.0), ("large", 3.0))]
    return save_router(folder / "router.safetensors", tinycd_package, teachers, [0.05, 0.2])


def test_router_package_round_trip_and_refusal_as_plain_model(router, tinycd_package):
    loaded = load_model(router)
    assert loaded.thresholds == [0.05, 0.2] and [n for n, _ in loaded.teachers] == ["small", "medium", "large"]
    original = load_package(tinycd_package).model.state_dict()
    for key, value in loaded.original.model.state_dict().items():
        assert torch.equal(value, original[key])
    with pytest.raises(PackageError, match="router package"):
        read_manifest(router)


def test_each_window_takes_the_teacher_of_its_car(router, tinycd_package, shared_data, tmp_path):
    tile = shared_data / "levir_tile_georef"
    expected = {0: 1 / (1 + np.exp(3.0)), 1: 0.5, 2: 1 / (1 + np.exp(-3.0))}
    original = Predictor(load_package(tinycd_package), "cpu")
    seen = set()
    for i, (col, row) in enumerate([(0, 0), (768, 0), (512, 512), (256, 768), (0, 512)]):
        window = Window(col, row, 256, 256)
        paths = []
        for name in ("pre", "post"):
            with rasterio.open(tile / f"{name}.tif") as src:
                profile = dict(src.profile, width=256, height=256, transform=src.window_transform(window))
                data = src.read(window=window)
            paths.append(tmp_path / f"{name}{i}.tif")
            with rasterio.open(paths[-1], "w", **profile) as dst:
                dst.write(data)
            if name == "pre":
                pre = data
            else:
                post = data
        car = float((original(pre[None], post[None])[0] > 0.5).mean())
        which = 0 if car <= 0.05 else 1 if car <= 0.2 else 2
        seen.add(which)
        result = detect(*paths, router, probability=tmp_path / f"p{i}.tif", mask=tmp_path / f"m{i}.tif",
                        polygons=tmp_path / f"c{i}.gpkg", tile=256, device="cpu")
        with rasterio.open(result.probability) as p:
            np.testing.assert_allclose(p.read(1), expected[which], rtol=1e-5)
    assert seen == {0, 1, 2}  # the crops exercise every partition


def test_a_window_s_car_counts_its_valid_pixels_only(router, tinycd_package, shared_data):
    with rasterio.open(shared_data / "levir_tile_georef" / "pre.tif") as a, \
            rasterio.open(shared_data / "levir_tile_georef" / "post.tif") as b:
        pre, post = (src.read(window=Window(256, 768, 256, 256))[None] for src in (a, b))
    changed = Predictor(load_package(tinycd_package), "cpu")(pre, post)[0] > 0.5
    assert 0.05 < changed.mean() <= 0.2  # over all pixels: the medium teacher
    valid = changed.copy()  # the changed pixels and as many unchanged ones: a CAR of 0.5
    valid.flat[np.flatnonzero(~changed)[:np.count_nonzero(changed)]] = True
    predictor = RouterPredictor(load_model(router), lambda package: Predictor(package, "cpu"))
    np.testing.assert_allclose(predictor(pre, post), 0.5, rtol=1e-5)
    np.testing.assert_allclose(predictor(pre, post, valid[None]), 1 / (1 + np.exp(-3.0)), rtol=1e-5)
    assert predictor.routed.tolist() == [0, 1, 1]
