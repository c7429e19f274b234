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


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_imagenet_backbone_weights_load_into_the_layers_tinycd_keeps(source, tmp_path):
    """The authors start from torchvision's ImageNet EfficientNet-B4 (``pretrained=True``): such a file, or timm's,
    gives TinyCD's stem and stages exactly the file's layers; everything after them in the file is dropped."""
    import timm
    import torchvision

    torch.manual_seed(0)
    if source == "torchvision":
        net = torchvision.models.efficientnet_b4().eval()
        reference = net.features[:4]
    else:
        net = timm.create_model("efficientnet_b4").eval()
        reference = torch.nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:3])
    for module in net.modules():  # statistics unlike a fresh model's, so that they must be carried over
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), tmp_path / "efficientnet_b4.pth")
    model = create("tinycd").eval()
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("stem.", "stages."))}
    report = model.load_backbone_weights(tmp_path / "efficientnet_b4.pth")
    assert report["format"] == source and report["kept_initial"] == [] and report["adapted"] == []
    assert any(".blocks.6." in k or k.startswith(("features.7.", "blocks.6.")) for k in report["dropped"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.stem(x)
        for stage in model.stages:
            ours = stage(ours)
        assert torch.equal(ours, reference(x))
    for key, value in model.state_dict().items():
        if key in decoder_before:
            assert torch.equal(value, decoder_before[key]), key

    # Another EfficientNet is refused, naming the file, and nothing is loaded.
    small = torchvision.models.efficientnet_b0() if source == "torchvision" else timm.create_model("efficientnet_b0")
    torch.save(small.state_dict(), tmp_path / "b0.pth")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="b0.pth .*does not fit TinyCDBackbone.*shape mismatches"):
        model.load_backbone_weights(tmp_path / "b0.pth")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
