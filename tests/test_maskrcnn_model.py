"""Mask R-CNN is torchvision's model with the reference's settings: it trains (five finite losses that
a few steps reduce), predicts masks at the input size, freezes what the spec says, keeps torchvision's
parameter names (so torchvision weights load) and is rebuilt from the spec a checkpoint records."""

from __future__ import annotations

import socket

import pytest
import torch
import torchvision

from ssd_train.models.maskrcnn import model as maskrcnn
from ssd_train.models.maskrcnn.model import BackboneError, MaskRCNNSpec, SpecError, build_maskrcnn

TINY = MaskRCNNSpec("resnet18", num_classes=4, min_size=64, max_size=96)
LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def tiny_batch():
    """Two images (different sizes) with a bright rectangle and a bright disc each: boxes and masks."""
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for height, width in ((72, 96), (96, 80)):
        image = torch.rand(3, height, width, generator=generator) * 0.2
        masks = torch.zeros(2, height, width, dtype=torch.uint8)
        masks[0, 10:40, 8:50] = 1
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        masks[1] = ((ys - 55) ** 2 + (xs - 60) ** 2 <= 14**2).to(torch.uint8)
        image[0] += masks[0] * 0.8
        image[2] += masks[1] * 0.8
        boxes = torch.tensor([[8, 10, 50, 40], [46, 41, 75, 70]], dtype=torch.float32)
        images.append(image)
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 3]), "masks": masks})
    return images, targets


def test_a_training_step_returns_the_five_losses_all_finite():
    torch.manual_seed(0)
    model = build_maskrcnn(TINY).train()
    losses = model(*tiny_batch())
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) for v in losses.values()), losses


def test_eval_returns_boxes_labels_scores_and_masks_at_the_input_size():
    torch.manual_seed(0)
    model = build_maskrcnn(TINY).eval()
    images, _ = tiny_batch()
    with torch.no_grad():
        detections = model(images)
    for image, found in zip(images, detections):
        n = len(found["boxes"])
        assert 0 < n <= maskrcnn.DETECTIONS_PER_IMAGE
        assert found["labels"].shape == found["scores"].shape == (n,)
        assert found["masks"].shape == (n, 1, *image.shape[1:])
        assert 0 <= found["masks"].min() and found["masks"].max() <= 1  # probabilities, pasted into the image


def test_frozen_stages_really_do_not_train():
    """trainable_layers=3 (the reference): stem and layer1 frozen; FrozenBatchNorm has no parameters."""
    model = build_maskrcnn(TINY)
    body = dict(model.backbone.body.named_parameters())
    assert not any(p.requires_grad for name, p in body.items() if name.startswith(("conv1", "bn1", "layer1")))
    assert all(p.requires_grad for name, p in body.items() if name.startswith(("layer2", "layer3", "layer4")))
    assert all(p.requires_grad for name, p in model.named_parameters() if not name.startswith("backbone.body"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())

    scratch = build_maskrcnn(MaskRCNNSpec("resnet18", 4, 64, 96, trainable_layers=5, norm="batch"))
    assert all(p.requires_grad for p in scratch.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in scratch.modules())


def test_the_reference_settings_are_the_models():
    model = build_maskrcnn(TINY)
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert model.rpn._post_nms_top_n == {"training": 2000, "testing": 1000}
    assert (model.rpn.proposal_matcher.high_threshold, model.rpn.proposal_matcher.low_threshold) == (0.7, 0.3)
    assert (model.rpn.fg_bg_sampler.batch_size_per_image, model.rpn.fg_bg_sampler.positive_fraction) == (256, 0.5)
    assert model.rpn.nms_thresh == 0.7
    heads = model.roi_heads
    assert heads.proposal_matcher.high_threshold == 0.5
    assert (heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction) == (512, 0.25)
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.05, 0.5, 100)
    features = {k: torch.zeros(1, 256, 8, 8) for k in ("0", "1", "2", "3")}
    mask_logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(
        features, [torch.tensor([[0.0, 0.0, 16.0, 16.0]])], [(32, 32)])))
    assert mask_logits.shape == (1, TINY.num_classes, 28, 28)
    assert (model.transform.min_size, model.transform.max_size) == ((64,), 96)


def test_parameter_names_are_torchvisions_so_its_weights_load():
    ours = build_maskrcnn(MaskRCNNSpec(num_classes=91))
    theirs = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    ours.load_state_dict(theirs.state_dict())  # strict: same names and shapes
    assert list(ours.state_dict()) == [k for k in theirs.state_dict() if "num_batches_tracked" not in k]


def test_backbone_weights_load_from_a_torchvision_state_dict(tmp_path):
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model = build_maskrcnn(TINY, backbone_path=tmp_path / "resnet18.pth")
    assert torch.equal(model.backbone.body.conv1.weight, resnet.conv1.weight)
    assert torch.equal(model.backbone.body.layer4[1].bn2.running_var, resnet.layer4[1].bn2.running_var)


@pytest.mark.parametrize("make, message", [
    (lambda path: torch.save(torchvision.models.resnet34(weights=None).state_dict(), path),
     f"not a torchvision {TINY.backbone} state dict: unexpected keys"),
    (lambda path: torch.save({"conv1.weight": torch.zeros(1)}, path), f"not a torchvision {TINY.backbone} state dict"),
    (lambda path: path.write_bytes(b"not a checkpoint"), "cannot read backbone weights"),
    (lambda path: None, "not found"),
])
def test_backbone_weights_that_do_not_fit_are_a_one_line_error(tmp_path, make, message):
    path = tmp_path / "weights.pth"
    make(path)
    with pytest.raises(BackboneError, match=message) as error:
        build_maskrcnn(TINY, backbone_path=path)
    assert "\n" not in str(error.value)


def test_pretrained_backbone_without_network_is_a_one_line_error(tmp_path, monkeypatch):
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
        pytest.skip("the network is reachable here: the ImageNet weights would download")
    except OSError:
        pass
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    with pytest.raises(BackboneError, match="ImageNet weights of resnet18") as error:
        build_maskrcnn(TINY, pretrained_backbone=True)
    assert "\n" not in str(error.value)


def test_the_spec_round_trips_through_json():
    spec = MaskRCNNSpec("resnet34", 5, 320, 512, trainable_layers=5, norm="batch")
    assert MaskRCNNSpec.from_json(spec.to_json()) == spec
    assert MaskRCNNSpec.from_json({}) == MaskRCNNSpec()
    assert (MaskRCNNSpec().min_size, MaskRCNNSpec().max_size, MaskRCNNSpec().trainable_layers) == (800, 1333, 3)


@pytest.mark.parametrize("data, error, message", [
    ({"backbone": "vgg16"}, BackboneError, "unknown backbone 'vgg16'"),
    ({"backbone": "resnet50", "depth": 3}, SpecError, "unknown keys: depth"),
    ({"norm": "group"}, SpecError, "unknown norm"),
    ({"min_size": 900, "max_size": 800}, SpecError, "min_size <= max_size"),
    ({"num_classes": "81"}, SpecError, "num_classes must be an integer"),
    ({"trainable_layers": 6}, SpecError, "trainable_layers must be 0-5"),
    (["resnet50"], SpecError, "must be a JSON object"),
])
def test_a_bad_spec_is_a_one_line_error(data, error, message):
    with pytest.raises(error, match=message) as raised:
        MaskRCNNSpec.from_json(data)
    assert "\n" not in str(raised.value)


def test_a_few_steps_on_a_fixed_batch_reduce_the_loss():
    torch.manual_seed(0)
    model = build_maskrcnn(TINY).train()
    images, targets = tiny_batch()
    # A small step: from scratch, with no warmup, lr 0.01 already diverges on this batch.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0005, momentum=0.9)
    totals = []
    for _ in range(5):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    assert totals[-1] < 0.6 * totals[0], totals
