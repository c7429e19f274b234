"""Hostile or broken packages and inputs (issue 14, items 4, 5, 7 and 10): each is refused with one line
that names the file and the field, quickly and without allocating what the file asks for."""
import contextlib
import json
import os
import pickle
import re
import resource
import time

import numpy as np
import pytest
import rasterio
import torch
from rasterio.control import GroundControlPoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from geochange.engine.cli import main
from geochange.engine.errors import OptionError, PackageError, RasterError
from geochange.engine.manifest import make_manifest
from geochange.engine.models import create
from geochange.engine.package import load_model, load_package, save_package, save_router
from geochange.engine.predictor import Predictor
from geochange.engine.rasters import open_raster


def write(path, tensors: dict, manifest) -> str:
    """A package file of any content, as a hostile or broken tool might write it."""
    save_file(tensors, str(path), metadata={"geochange": json.dumps(manifest)})
    return str(path)


@contextlib.contextmanager
def memory_limit(extra: int = 2**30):
    """At most ``extra`` more bytes of data for this process, so that code allocating what a file asks
    for fails at once instead of taking the machine's memory."""
    with open("/proc/self/status") as f:
        in_use = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (in_use + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


@pytest.fixture(scope="module")
def tinycd_state():
    torch.manual_seed(0)
    return {k: v.contiguous().clone() for k, v in create("tinycd").state_dict().items()}


@pytest.fixture(scope="module")
def m2cd_state():
    return {k: v.contiguous().clone() for k, v in create("m2cd_mit_b0").state_dict().items()}


@pytest.fixture
def tiny_package(tmp_path, tinycd_state) -> str:
    return write(tmp_path / "tinycd.safetensors", tinycd_state, make_manifest("tinycd"))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- 4: a small file cannot make the engine allocate ------------------------------------------------

@pytest.mark.parametrize("tensors, arch_kwargs, message", [
    ("one", {"num_experts": 100000}, r"more than 4 times the file's 1 tensors"),
    ("m2cd", {"num_experts": 100000}, r"more than 4 times the file's 292 tensors"),
    ("m2cd", {"in_chans": 23000000}, r"inputs\.pre must be 23000000 channel\(s\), as arch_kwargs\.in_chans"),
])
def test_absurd_arch_kwargs_are_refused_before_allocating(tmp_path, m2cd_state, tensors, arch_kwargs, message):
    state = m2cd_state if tensors == "m2cd" else {"w": torch.zeros(1)}
    path = write(tmp_path / "hostile.safetensors", state, make_manifest("m2cd_mit_b0", arch_kwargs))
    start = time.perf_counter()
    with memory_limit(), pytest.raises(PackageError, match=message):
        load_model(path)
    assert time.perf_counter() - start < 5.0  # well under a second alone; the memory limit is the real bound


def test_router_members_are_checked_before_allocating(tmp_path, tiny_package):
    router = save_router(tmp_path / "router.safetensors", tiny_package,
                         [("small", tiny_package), ("large", tiny_package)], [0.1])
    with safe_open(str(router), framework="pt") as f:
        manifest = json.loads(f.metadata()["geochange"])
    manifest["teachers"][1]["manifest"]["arch_kwargs"] = {"in_chans": 23000000}
    hostile = write(tmp_path / "hostile.safetensors", load_file(str(router)), manifest)
    start = time.perf_counter()
    refused = r"\[teachers\[1\]\]: manifest field inputs\.pre must be 23000000 channel"
    with memory_limit(), pytest.raises(PackageError, match=refused):
        load_model(hostile)
    assert time.perf_counter() - start < 5.0  # well under a second alone; the memory limit is the real bound


# --- 5: broken scales, statistics or weights are errors, not "no change" -----------------------------

def test_a_scale_of_zero_is_refused(capsys, tiny_package, levir_crop, tmp_path):
    code, _, err = run_cli(capsys, "detect", levir_crop["pre"], levir_crop["post"], "--model", tiny_package,
                           "--out", tmp_path / "out", "--device", "cpu", "--pre-scale", "0")
    assert code == 2 and "--pre-scale must be a number above 0, not 0.0" in err
    assert not (tmp_path / "out" / "change_mask.tif").exists()
    with pytest.raises(OptionError, match="post scale"):
        Predictor(load_package(tiny_package), "cpu", scales={"post": float("nan")})


@pytest.mark.parametrize("field, value", [("scale", 0), ("std", [0, 0, 0]), ("std", [0.2, -1, 0.2])])
def test_a_package_scale_or_std_of_zero_is_refused(tmp_path, tinycd_state, field, value):
    manifest = make_manifest("tinycd")
    manifest["inputs"]["post"][field] = value
    path = write(tmp_path / "m.safetensors", tinycd_state, manifest)
    with pytest.raises(PackageError, match=rf"m\.safetensors: manifest field inputs\.post\.{field} must be"):
        load_package(path)


def test_nan_weights_are_an_error_not_no_change(capsys, tmp_path, tinycd_state, levir_crop):
    state = dict(tinycd_state)
    state["classifier.0.weight"] = torch.full_like(state["classifier.0.weight"], float("nan"))
    path = write(tmp_path / "nan.safetensors", state, make_manifest("tinycd"))
    code, out, err = run_cli(capsys, "detect", levir_crop["pre"], levir_crop["post"], "--model", path,
                             "--out", tmp_path / "out", "--device", "cpu")
    assert code == 2 and "change polygons" not in out
    assert "NaN/inf for valid pixels: its weights hold NaN/inf" in err and "classifier.0.weight" in err
    assert not (tmp_path / "out" / "change_mask.tif").exists()


# --- 7: unreadable, mis-shaped or malformed packages ------------------------------------------------

def test_packages_are_written_with_the_user_s_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_package(create("tinycd"), make_manifest("tinycd"), tmp_path / "m.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path, tinycd_state):
    state = dict(tinycd_state)
    state["classifier.0.weight"] = torch.zeros(5, 5)
    path = write(tmp_path / "m.safetensors", state, make_manifest("tinycd"))
    shape = list(tinycd_state["classifier.0.weight"].shape)
    with pytest.raises(PackageError, match=rf"m\.safetensors: weights do not fit tinycd: tensor "
                                           rf"classifier\.0\.weight has shape \[5, 5\] in the file, "
                                           rf"the architecture's is {re.escape(str(shape))}"):
        load_package(path)


def _mean_abc(m):
    m["inputs"]["pre"]["mean"] = "abc"


def _threshold_null(m):
    m["output"]["threshold"] = None


def _in_chans(m):
    m["arch_kwargs"] = {"in_chans": -5}


def _num_experts(m):
    m.update(make_manifest("m2cd_mit_b0", {"num_experts": 0}))


def _bands_text(m):
    m["inputs"]["pre"]["bands"] = "3"


@pytest.mark.parametrize("change, field", [
    (_mean_abc, "manifest field inputs.pre.mean must be a list of 3 numbers, not 'abc'"),
    (_threshold_null, "manifest field output.threshold must be a number in [0, 1], not None"),
    (_in_chans, "manifest field arch_kwargs.in_chans must be a whole number above 0, not -5"),
    (_num_experts, "manifest field arch_kwargs.num_experts must be a whole number above 0, not 0"),
    (_bands_text, "manifest field inputs.pre.bands must be a whole number above 0, not '3'"),
    (lambda m: m.update(tile=16), "manifest field tile must be a whole number of pixels, at least 32, not 16"),
    (lambda m: m.update(gsd=0), "manifest field gsd must be metres per pixel, above 0, not 0"),
    (lambda m: [m], "the manifest must be a JSON object, not list"),
])
def test_malformed_manifests_are_one_line_errors(capsys, tmp_path, change, field):
    manifest = make_manifest("tinycd")
    manifest = change(manifest) or manifest
    path = write(tmp_path / "m.safetensors", {"w": torch.zeros(1)}, manifest)
    with pytest.raises(PackageError) as refused:
        load_model(path)
    assert str(refused.value) == f"{path}: {field}"
    code, out, err = run_cli(capsys, "info", path)
    # info shows the manifest as stored, then names what is malformed.
    assert code == 2 and err == f"geochange: error: {path}: {field}\n"
    assert json.loads(out) == manifest


def test_import_weights_into_a_folder_is_refused(capsys, shared_data, tmp_path):
    code, _, err = run_cli(capsys, "import-weights", "--format", "tinycd",
                           shared_data / "weights" / "tinycd_levir_official.pth", tmp_path)
    assert code == 2 and err == (f"geochange: error: {tmp_path}: is a folder; name the package file, "
                                 f"e.g. {tmp_path / 'model.safetensors'}\n")
    assert list(tmp_path.iterdir()) == []


def test_import_weights_over_its_own_checkpoint_is_refused(capsys, shared_data, tmp_path):
    source = tmp_path / "tinycd.pth"
    source.write_bytes((shared_data / "weights" / "tinycd_levir_official.pth").read_bytes())
    code, _, err = run_cli(capsys, "import-weights", "--format", "tinycd", source, source)
    assert code == 2 and err == (f"geochange: error: {source}: the package would replace the checkpoint it is made "
                                 "from; name another file\n")
    assert source.read_bytes() == (shared_data / "weights" / "tinycd_levir_official.pth").read_bytes()

# --- 10: messages -----------------------------------------------------------------------------------

def test_a_gcp_only_raster_says_so_and_how_to_warp_it(tmp_path):
    path = tmp_path / "gcps.tif"
    gcps = [GroundControlPoint(0, 0, 500000, 4000000), GroundControlPoint(0, 64, 500000, 3999360),
            GroundControlPoint(64, 0, 500640, 4000000)]
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", gcps=gcps,
                       crs="EPSG:32614") as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(RasterError, match=r"gcps\.tif: georeferenced by 3 ground control points only.*"
                                          r"`gdalwarp -t_srs EPSG:32614 gcps\.tif warped\.tif`"):
        open_raster(path)


def test_a_protocol_0_pickle_is_called_a_pickle(tmp_path):
    path = tmp_path / "old.safetensors"
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=0))
    with pytest.raises(PackageError, match="PyTorch pickle checkpoint"):
        load_model(path)


@pytest.mark.parametrize("content", [
    pickle.dumps({"weight": list(range(30000))}, protocol=0),  # longer than what is parsed to tell a pickle
    b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f",  # 11 bytes declaring a string of 2**63 bytes
    b"\x80\x04\x8d\xff\xff\xff\x7f\x00\x00\x00\x00",  # and one of 2 GiB
], ids=["long protocol 0", "2**63 bytes", "2 GiB"])
def test_pickles_are_told_without_reading_what_they_declare(content, capsys, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    code, _, err = run_cli(capsys, "info", path)
    assert code == 2 and err.count("\n") == 1 and "PyTorch pickle checkpoint" in err


def test_import_weights_names_the_checkpoint_once(capsys, tmp_path):
    source = tmp_path / "absent.pth"
    code, _, err = run_cli(capsys, "import-weights", "--format", "tinycd", source, tmp_path / "m.safetensors")
    assert code == 2 and err == f"geochange: error: {source}: no such checkpoint\n"


def test_info_does_not_pass_terminal_escapes_through(capsys, tmp_path, tinycd_state):
    manifest = make_manifest("tinycd", licence="\x1b]0;owned\x07\x1b[2J", source="a\nfake row")
    path = write(tmp_path / "m.safetensors", tinycd_state, manifest)
    code, out, _ = run_cli(capsys, "info", path)
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert r"\x1b]0;owned\x07\x1b[2J" in out and r"a\nfake row" in out


def test_a_model_built_for_other_channels_than_its_inputs_is_refused(tmp_path):
    from geochange.engine.models import create

    model = create("changer_mit_b0", in_chans=4)
    manifest = make_manifest("changer_mit_b0", {"in_chans": 4})  # the registry's 3-band inputs
    path = tmp_path / "m.safetensors"
    with pytest.raises(PackageError, match=r"inputs.pre must be 4 channel\(s\), as arch_kwargs.in_chans"):
        save_package(model, manifest, path)


def test_a_header_nested_past_python_s_stack_or_past_the_bound_is_refused_before_parsing(tmp_path):
    """JSON nested 100,000 deep raised RecursionError, not a package error; a header of up to 100 MB was parsed,
    some 25 times its size in memory (in QGIS's process too, for the dialog's checks)."""
    import struct

    from geochange.engine.header import MAX_HEADER_BYTES, read_metadata

    def package(name, header: bytes):
        path = tmp_path / name
        path.write_bytes(struct.pack("<Q", len(header)) + header)
        return path

    deep = package("deep.safetensors", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(PackageError, match="deep.safetensors: not a valid safetensors file"):
        read_metadata(deep)
    big = package("big.safetensors", b'{"__metadata__": {}, "x": "' + b"y" * MAX_HEADER_BYTES + b'"}')
    with memory_limit(2 * MAX_HEADER_BYTES):  # read, never parsed
        with pytest.raises(PackageError, match=r"big.safetensors: not a model package; its header claims \d+ bytes, "
                                               r"past the 8 MiB any package's takes"):
            read_metadata(big)
