"""The CPU runtimes (engine/backends.py): which one runs and why, OpenVINO's export made once per model, checked
against PyTorch and kept in the user's cache, torch.compile's graphs per shape with their code on disk, and
eager PyTorch wherever a runtime cannot run a model. (Their accuracy on real data: test_precision.py.)"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from geochange.engine import backends
from geochange.engine.backends import compile_refusal, model_digest, resolve_backend
from geochange.engine.compiled import CompiledForward
from geochange.engine.detect import prepare
from geochange.engine.errors import OptionError
from geochange.engine.models.moe import MixtureOfExperts
from geochange.engine.options import DetectOptions
from geochange.engine.package import ModelPackage, load_package, save_router
from geochange.engine.predictor import Predictor
from geochange.engine.progress import Progress


def pair(batch: int = 2, side: int = 96):
    rng = np.random.default_rng(0)
    return tuple(rng.integers(0, 255, (batch, 3, side, side), dtype=np.uint8) for _ in range(2))


def test_auto_takes_openvino_where_installed_and_a_gpu_runs_eagerly(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(backends, "openvino_installed", lambda: True)
    assert resolve_backend("auto", cpu)[0] == "openvino"
    monkeypatch.setattr(backends, "openvino_installed", lambda: False)
    assert resolve_backend("auto", cpu) == ("eager", "OpenVINO is not installed (pip install openvino: a faster "
                                                     "CPU forward)")
    with pytest.raises(OptionError, match="^--backend openvino: OpenVINO is not installed for "):
        resolve_backend("openvino", cpu)
    assert resolve_backend("compile", cpu) == ("compile", "asked for")
    assert resolve_backend("auto", gpu) == ("eager", "the model runs as CUDA graphs on the GPU")
    with pytest.raises(OptionError, match="^--backend compile is for the CPU"):
        resolve_backend("compile", gpu)
    with pytest.raises(OptionError, match="^backend must be one of auto, eager, compile, openvino"):
        resolve_backend("onnx", cpu)


def test_sparse_expert_routing_is_not_compiled_and_says_why(random_package, monkeypatch):
    assert "sparse expert routing" in compile_refusal(torch.nn.Sequential(MixtureOfExperts(16)))
    assert compile_refusal(torch.nn.Sequential(MixtureOfExperts(16, every_expert_in_graphs=True))) is None
    package = load_package(random_package)
    assert compile_refusal(package.model) is None
    monkeypatch.setattr(backends, "compile_refusal", lambda model: "a reason")
    logged = []
    assert Predictor(package, "cpu", backend="compile", log=logged.append).backend == "eager"
    assert logged == ["tinycd runs eagerly: a reason"]


@pytest.mark.heavy
def test_sparse_expert_routing_runs_in_openvino(tmp_path, monkeypatch):
    """M2CD-ConvNeXt's mixtures route each token to its k experts: exported with that routing (not every
    expert, as compile needs), OpenVINO gives eager PyTorch's probabilities."""
    pytest.importorskip("openvino")
    from geochange.engine.manifest import make_manifest
    from geochange.engine.models import create
    from geochange.engine.models.m2cd import ConvNeXtMoEBlock

    monkeypatch.setenv("GEOCHANGE_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = create("m2cd_convnext_t").eval()
    with torch.no_grad():  # the blocks' scale starts at 1e-6, under which a wrong mixture would not show
        for block in model.modules():
            if isinstance(block, ConvNeXtMoEBlock):
                block.gamma.fill_(1.0)
    package = ModelPackage(model, make_manifest("m2cd_convnext_t"))
    assert not any(m.every_expert_in_graphs for m in model.modules() if isinstance(m, MixtureOfExperts))
    exported = Predictor(package, "cpu", backend="openvino")
    assert exported.backend == "openvino"
    assert "NonZero" in {op.get_type_name() for op in exported.forward.model.get_ops()}  # routed, in the graph
    windows = pair(batch=1, side=128)
    np.testing.assert_allclose(exported(*windows), Predictor(package, "cpu")(*windows), atol=1e-4)


def test_the_digest_follows_every_tensor(random_package):
    one, two = load_package(random_package), load_package(random_package)
    assert model_digest(one) == model_digest(two)
    with torch.no_grad():
        next(two.model.parameters()).view(-1)[0] += 1e-6
    assert model_digest(one) != model_digest(two)


def test_the_digest_follows_the_architectures_code(random_package, monkeypatch):
    package = load_package(random_package)
    before = model_digest(package)
    monkeypatch.setattr(backends, "architectures_code_digest", lambda: "a changed forward")
    assert model_digest(package) != before


def test_openvino_exports_once_agrees_with_pytorch_and_refuses_an_export_that_does_not(random_package, tmp_path,
                                                                                       monkeypatch):
    pytest.importorskip("openvino")
    from geochange.engine import exported

    monkeypatch.setenv("GEOCHANGE_CACHE_DIR", str(tmp_path / "cache"))
    pre, post = pair()
    logged = []
    fast = Predictor(load_package(random_package), "cpu", backend="openvino", log=logged.append)
    exports = list((tmp_path / "cache" / "openvino").iterdir())
    assert fast.backend == "openvino" and [p.suffix for p in sorted(exports)] == [".bin", ".xml"]
    xml = next(p for p in exports if p.suffix == ".xml")
    assert logged == [f"tinycd: exported to OpenVINO and checked against PyTorch in {logged[0].split(' in ')[1]}"]
    assert logged[0].endswith(f"({xml})")
    eager = Predictor(load_package(random_package), "cpu")
    np.testing.assert_allclose(fast(pre, post), eager(pre, post), atol=1e-3)
    small = pair(1, 64)  # a second window shape, compiled when met
    np.testing.assert_allclose(fast(*small), eager(*small), atol=1e-3)
    assert sorted(fast.forward.requests) == [((1, 3, 64, 64),) * 2, ((1, 3, 96, 96),) * 2]  # a window at a time
    logged.clear()
    Predictor(load_package(random_package), "cpu", backend="openvino", log=logged.append)
    assert logged == [f"tinycd: OpenVINO export from the cache ({xml})"]

    monkeypatch.setenv("GEOCHANGE_CACHE_DIR", str(tmp_path / "other"))
    monkeypatch.setattr(exported, "VERIFY_TOLERANCE", -1.0)  # as an export that freezes a shape would differ
    logged.clear()
    assert Predictor(load_package(random_package), "cpu", backend="openvino", log=logged.append).backend == "eager"
    assert logged[0].startswith("tinycd runs eagerly: OpenVINO could not run it (its export gives probabilities up "
                                "to ") and logged[0].endswith(" away from PyTorch's)")
    assert not list((tmp_path / "other" / "openvino").iterdir())  # nothing kept, no partial file left


@pytest.mark.parametrize("name,arch_kwargs", [("m2cd_mit_b0", {}), ("m2cd_mit_b0", {"head": "upernet"}),
                                               ("changer_mit_b0", {})])
def test_the_heads_export_for_every_window_size(name, arch_kwargs, tmp_path, monkeypatch):
    """Traced at 64 px, checked at 96 x 128: a shortcut taken for the trace's sizes only (a resize to the same
    size, UPerNet's pooling to 2 x 2 at 64 px) would differ there, and the export be refused."""
    pytest.importorskip("openvino")
    from geochange.engine.exported import exported_model
    from geochange.engine.manifest import make_manifest
    from geochange.engine.models import create

    monkeypatch.setenv("GEOCHANGE_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    package = ModelPackage(create(name, **arch_kwargs).eval(), make_manifest(name, arch_kwargs))
    assert exported_model(package, lambda message: None).exists()


def test_a_process_compiles_an_export_once_for_all_its_runs_each_with_its_own_requests(random_package, tmp_path,
                                                                                      monkeypatch):
    """detect-many's pairs on a worker: the next run of the same model and window compiles nothing; runs in two
    threads at once each get their own windows' logits; only the last compiled model is kept."""
    pytest.importorskip("openvino")
    import threading

    from geochange.engine import exported
    from geochange.engine.manifest import make_manifest
    from geochange.engine.models import create

    monkeypatch.setenv("GEOCHANGE_CACHE_DIR", str(tmp_path))
    package = load_package(random_package)
    one, two = (Predictor(package, "cpu", backend="openvino") for _ in range(2))
    inputs = [pair(2, 64), tuple(x[::-1].copy() for x in pair(2, 64))]  # two batches, of other windows
    eager = Predictor(package, "cpu")
    expected = [eager(*x) for x in inputs]
    np.testing.assert_allclose(one(*inputs[0]), expected[0], atol=1e-3)
    compiled = dict(exported._compiled)
    got = {}

    def run(name, predictor, x):
        got[name] = [predictor(*x) for _ in range(3)]

    threads = [threading.Thread(target=run, args=(i, p, x)) for i, (p, x) in enumerate(zip((one, two), inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(2):
        for result in got[i]:
            np.testing.assert_allclose(result, expected[i], atol=1e-3)
    assert exported._compiled.keys() == compiled.keys()
    assert all(exported._compiled[key] is compiled[key] for key in compiled)  # compiled once, run by both

    assert len(compiled) == 1
    one(*pair(1, 32))  # another window shape: compiled, and the only one kept
    assert len(exported._compiled) == 1 and not exported._compiled.keys() & compiled.keys()
    np.testing.assert_allclose(one(*inputs[0]), expected[0], atol=1e-3)  # its own request still runs the first

    torch.manual_seed(1)
    other = ModelPackage(create("tinycd").eval(), make_manifest("tinycd", {}))
    Predictor(other, "cpu", backend="openvino")(*inputs[0])
    assert [key[0] for key in exported._compiled] != [key[0] for key in compiled]


def test_the_export_cache_keeps_the_most_recently_used_up_to_its_size(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    import os

    from geochange.engine import exported

    for age, name in enumerate(["newest", "middle", "oldest"]):
        for suffix in (".xml", ".bin"):
            (tmp_path / f"{name}{suffix}").write_bytes(b"x" * 50)
            os.utime(tmp_path / f"{name}{suffix}", (1e9 - age, 1e9 - age))
    (tmp_path / ".partial.xml").write_bytes(b"x")  # another run's export in progress
    monkeypatch.setattr(exported, "CACHE_BYTES", 250)
    exported.prune(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial.xml", "middle.bin", "middle.xml", "newest.bin",
                                                          "newest.xml"]
    monkeypatch.setattr(exported, "CACHE_BYTES", 0)
    exported.prune(tmp_path)  # the newest stays whatever its size
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial.xml", "newest.bin", "newest.xml"]


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 1, 3, padding=1)

    def forward(self, pre, post):
        return self.conv(torch.cat([pre, post], dim=1))


def test_compile_makes_a_graph_per_shape_keeps_its_code_in_the_user_cache_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOCHANGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # so that the test's end restores it as it was
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    package, logged = ModelPackage(Toy().eval(), {"architecture": "toy"}), []
    forward = CompiledForward(package, logged.append)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        for batch in (2, 2, 1):
            torch.testing.assert_close(forward(x[:batch], x[:batch]), package.model(x[:batch], x[:batch]))
    assert [line.split(" in ")[0] for line in logged] == ["toy compiled for inputs [2, 3, 32, 32]",
                                                        "toy compiled for inputs [1, 3, 32, 32]"]
    assert logged[0].endswith(f"(cached in {tmp_path / 'inductor'})") and any((tmp_path / "inductor").iterdir())

    def no_compiler(*inputs):
        raise RuntimeError("no C++ compiler found\ndetails")

    forward, logged = CompiledForward(package, logged.append), []
    forward.log, forward.compiled = logged.append, no_compiler
    with torch.inference_mode():
        torch.testing.assert_close(forward(x, x), package.model(x, x))
        forward(x, x)
    assert logged == ["toy runs eagerly: torch.compile failed (no C++ compiler found)"]


def test_compile_keeps_inductor_s_folder_where_the_user_cache_cannot_be_made(tmp_path, monkeypatch):
    from torch._inductor.runtime.runtime_utils import default_cache_dir

    blocked = tmp_path / "a file"
    blocked.write_text("")
    monkeypatch.setenv("GEOCHANGE_CACHE_DIR", str(blocked))  # its "inductor" folder cannot be made
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    logged = []
    CompiledForward(ModelPackage(Toy().eval(), {"architecture": "toy"}), logged.append)
    default = os.path.abspath(default_cache_dir())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default
    assert logged == [f"compiled code kept in {default}, emptied at each boot: the user's cache folder cannot be "
                      "made (Not a directory)"]


def test_a_router_decides_its_precision_and_backend_once(tinycd_package, shared_data, tmp_path):
    """One line each, not one per member (the original model and each teacher)."""
    router = save_router(tmp_path / "router.safetensors", tinycd_package,
                         [("small", tinycd_package), ("large", tinycd_package)], [0.1])

    class Log(Progress):
        lines: list = []

        def log(self, message):
            self.lines.append(message)

    tile = shared_data / "levir_tile_georef"
    prepare(tile / "pre.tif", tile / "post.tif", router, DetectOptions(device="cpu", backend="eager"), progress=Log())
    assert [line.split(" ")[0] for line in Log.lines if line.startswith(("precision", "backend"))] == \
        ["precision", "backend"]
