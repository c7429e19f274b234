"""TinyCD with the authors' weights gives the authors' predictions; the importer is strict."""
import numpy as np
import pytest
import torch

from geochange.engine.checkpoints import read_checkpoint
from geochange.engine.errors import CheckpointError, OptionError
from geochange.engine.evaluate import evaluate_folder
from geochange.engine.importers import import_weights
from geochange.engine.models import create
from geochange.engine.models.stats import count_gflops, count_params
from geochange.engine.package import load_package


def test_parameter_count_and_gflops_match_the_paper():
    model = create("tinycd")
    params = count_params(model)
    assert params == 285_128  # the authors' file holds exactly these trainable tensors
    assert abs(params / 1e6 - 0.285) / 0.285 < 0.02
    assert abs(count_gflops(model, size=256) / 1.448 - 1) < 0.10  # M2CD's Table I


def test_authors_weights_reproduce_authors_confusion_on_levir(tinycd_package, shared_data):
    summary = evaluate_folder(load_package(tinycd_package), shared_data / "levir_cd", device="cpu", precision="fp32")
    # The authors' code (test_ondata.py: sigmoid > 0.5, whole 256x256 images) gives on these pixels:
    # TN 602175, FP 7807, FN 8196, TP 102718.
    assert summary["confusion"] == {"tn": 602175, "fp": 7807, "fn": 8196, "tp": 102718}
    assert summary["global"]["f1"] == pytest.approx(0.9277, abs=0.002)
    assert summary["global"]["iou"] == pytest.approx(0.8652, abs=0.003)
    assert summary["images"] == 11
    assert summary["per_image"]["f1"] < summary["global"]["f1"]  # a different, named average


def test_later_whu_key_layout_is_accepted(shared_data, tmp_path):
    state = read_checkpoint(shared_data / "weights" / "tinycd_levir_official.pth")
    renamed = {k.replace("_mixing_mask.2._convmix", "_mixing_mask.2._mixing._convmix"): v for k, v in state.items()}
    assert renamed != state
    torch.save(renamed, tmp_path / "whu_style.pth")
    ours = load_package(import_weights("tinycd", tmp_path / "whu_style.pth", tmp_path / "a.safetensors"))
    theirs = load_package(import_weights("tinycd", shared_data / "weights" / "tinycd_levir_official.pth",
                                         tmp_path / "b.safetensors"))
    for (k, v), (k2, v2) in zip(ours.model.state_dict().items(), theirs.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_import_refuses_missing_unknown_and_misshaped_keys(shared_data, tmp_path):
    state = read_checkpoint(shared_data / "weights" / "tinycd_levir_official.pth")
    broken = dict(state)
    del broken["_classify._linears.2.0.weight"]
    broken["_extra.weight"] = torch.zeros(3)
    broken["_up.0._convolution.3.bias"] = torch.zeros(7)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as err:
        import_weights("tinycd", tmp_path / "broken.pth", tmp_path / "out.safetensors")
    message = str(err.value)
    assert "_extra.weight" in message
    assert "classifier.4.weight" in message  # the missing target, named in our model's terms
    assert "_up.0._convolution.3.bias (7,)" in message
    assert message.startswith(f"{tmp_path / 'broken.pth'} does not fit tinycd: ") and message.count("broken.pth") == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_import_refuses_unknown_format_and_non_checkpoint(tmp_path):
    with pytest.raises(OptionError, match="unknown format"):
        import_weights("nope", tmp_path / "x.pth", tmp_path / "y.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth is not a checkpoint of tensors"):
        import_weights("tinycd", tmp_path / "junk.pth", tmp_path / "y.safetensors")


def test_forward_shape_and_eval_determinism():
    model = create("tinycd").eval()
    pre, post = torch.randn(2, 3, 96, 128), torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        out = model(pre, post)
        assert out.shape == (2, 1, 96, 128)
        assert torch.equal(out, model(pre, post))
    assert np.isfinite(out.numpy()).all()
