"""The model package: round trip, and clear refusals of anything else."""
import json
import pickle
import struct

import pytest
import torch

from geochange.engine.errors import PackageError
from geochange.engine.manifest import make_manifest
from geochange.engine.models import create
from geochange.engine.package import load_package, read_manifest, save_package


@pytest.fixture
def package(tmp_path):
    torch.manual_seed(0)
    model = create("tinycd").eval()
    manifest = make_manifest("tinycd", training={"dataset": "test", "method": "plain"})
    return model, save_package(model, manifest, tmp_path / "m.safetensors")


def test_round_trip_gives_identical_outputs(package):
    model, path = package
    loaded = load_package(path)
    assert not loaded.model.training
    assert loaded.manifest["architecture"] == "tinycd"
    assert loaded.manifest["training"]["dataset"] == "test"
    pre, post = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(pre, post), loaded.model(pre, post))


def test_loading_draws_no_random_weights(package):
    """The file fills every tensor: drawing the architecture's random weights first cost time (a second for
    M2CD-ConvNeXt-T) and moved the caller's random stream."""
    state = torch.get_rng_state()
    load_package(package[1])
    assert torch.equal(torch.get_rng_state(), state)


def test_pytorch_pickle_is_refused_without_unpickling(tmp_path):
    sentinel = tmp_path / "was_unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    zip_pickle = tmp_path / "weights.pth"
    torch.save({"x": torch.zeros(1)}, zip_pickle)
    raw_pickle = tmp_path / "evil.safetensors"
    raw_pickle.write_bytes(pickle.dumps(Boom()))
    for path in (zip_pickle, raw_pickle):
        with pytest.raises(PackageError, match="pickle"):
            load_package(path)
    assert not sentinel.exists()


def test_truncated_package_is_refused(package, tmp_path):
    _, path = package
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageError, match="corrupt or truncated"):
        load_package(cut)
    header_only = tmp_path / "header.safetensors"
    header_only.write_bytes(data[:100])
    with pytest.raises(PackageError, match="truncated"):
        load_package(header_only)


def test_safetensors_without_manifest_and_bad_manifest_are_refused(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(PackageError, match="without a GeoChange manifest"):
        read_manifest(plain)
    bad = tmp_path / "bad.safetensors"
    manifest = make_manifest("tinycd")
    manifest["inputs"].pop("post")
    save_file({"w": torch.zeros(2)}, str(bad), metadata={"geochange": json.dumps(manifest)})
    with pytest.raises(PackageError, match="'pre' and 'post'"):
        read_manifest(bad)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "wrong.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"geochange": json.dumps(make_manifest("tinycd"))})
    with pytest.raises(PackageError, match="weights do not fit tinycd"):
        load_package(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PackageError, match="no such model file"):
        load_package(tmp_path / "absent.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(PackageError, match="too short"):
        load_package(tmp_path / "empty.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(PackageError, match="truncated"):
        load_package(tmp_path / "huge.safetensors")


def test_save_is_atomic_when_the_manifest_is_invalid(tmp_path):
    with pytest.raises(PackageError):
        save_package(create("tinycd"), {"format": "other"}, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_metric_undefined_on_the_data_is_null_in_the_manifest(tmp_path):
    """A trainer's package stored NaN metrics as bare NaN, which strict JSON readers (jq, JSON.parse) refuse."""
    from geochange.engine.header import read_metadata

    manifest = make_manifest("tinycd", training={"metrics": {"val": {"f1": float("nan"), "oa": 0.9}}})
    path = save_package(create("tinycd"), manifest, tmp_path / "m.safetensors")
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8:8 + length])["__metadata__"]["geochange"]
    assert "NaN" not in header and json.loads(header)["training"]["metrics"]["val"] == {"f1": None, "oa": 0.9}
    assert read_metadata(path)["training"]["metrics"]["val"]["f1"] is None
