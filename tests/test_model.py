"""The SSD300 itself: output shapes and compatibility with NVIDIA's checkpoints."""

import json
from pathlib import Path

import pytest
import torch

from ssd_train.models.ssd300.checkpoint import load_for_inference
from ssd_train.models.ssd300.model import BackboneError, build_model

FIXTURE = Path(__file__).parent / "fixtures" / "nvidia_ssd300_state_dict_shapes.json"


def test_forward_shapes():
    model = build_model("resnet18", num_classes=5).eval()
    with torch.no_grad():
        locs, scores = model(torch.randn(2, 3, 300, 300))
    assert locs.shape == (2, 4, 8732) and scores.shape == (2, 5, 8732)


def test_feature_map_sizes():
    """conv4 stride surgery: 300x300 -> 38x38 backbone map; extra blocks 19, 10, 5, 3, 1."""
    model = build_model("resnet50").eval()
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        sizes = [model.feature_extractor(x)]
        for block in model.additional_blocks:
            sizes.append(block(sizes[-1]))
    assert [tuple(f.shape[1:]) for f in sizes] == [
        (1024, 38, 38), (512, 19, 19), (512, 10, 10), (256, 5, 5), (256, 3, 3), (256, 1, 1)]


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50"])
def test_parameter_names_match_nvidia(backbone):
    """Key names and shapes recorded from NVIDIA DeepLearningExamples' SSD300 (see the fixture's source)."""
    reference = json.loads(FIXTURE.read_text())["models"][backbone]
    ours = {k: list(v.shape) for k, v in build_model(backbone).state_dict().items()}
    assert ours == reference


def test_nvidia_checkpoint_loads_and_predicts_the_same(tmp_path):
    """An NVIDIA-format checkpoint (their keys, their label_map, no backbone recorded) loads into a
    ResNet-50 SSD300 with the COCO label map and gives the outputs of the model that saved it."""
    torch.manual_seed(0)
    source = build_model("resnet50").eval()
    nvidia = {"epoch": 65, "iteration": 100, "optimizer": {}, "scheduler": {},
              "label_map": {0: "background", 1: "person", 2: "bicycle"} | {i: f"x{i}" for i in range(3, 81)},
              "model": {f"module.{k}": v for k, v in source.state_dict().items()}}  # saved from DDP
    torch.save(nvidia, tmp_path / "nvidia.pt")
    with pytest.warns(UserWarning, match="assuming resnet50"):
        model, label_map, info = load_for_inference(tmp_path / "nvidia.pt")
    assert info["backbone"] == "resnet50" and label_map.num_classes == 81
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        for a, b in zip(source(x), model(x)):
            assert torch.equal(a, b)


def test_missing_backbone_weights_file():
    with pytest.raises(BackboneError, match="not found"):
        build_model("resnet18", backbone_path="/nonexistent/resnet18.pth")


def test_backbone_weights_of_another_network(tmp_path):
    torch.save(build_model("resnet18").state_dict(), tmp_path / "ssd.pt")
    with pytest.raises(BackboneError, match="is not a torchvision resnet18 state dict"):
        build_model("resnet18", backbone_path=str(tmp_path / "ssd.pt"))


def test_backbone_weights_are_loaded(tmp_path):
    import torchvision

    resnet = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(resnet.conv1.weight, 0.5)
    torch.save(resnet.state_dict(), tmp_path / "r18.pth")
    model = build_model("resnet18", backbone_path=str(tmp_path / "r18.pth"))
    assert (model.feature_extractor.feature_extractor[0].weight == 0.5).all()


def test_offline_pretrained_falls_back_with_warning(monkeypatch):
    """Without network access the ImageNet download fails: a warning, random weights, no crash."""
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.warns(UserWarning, match="random weights"):
        build_model("resnet18", pretrained_backbone=True)


def test_unknown_backbone():
    with pytest.raises(BackboneError, match="unknown backbone"):
        build_model("vgg16")
