"""`ssd-train import-weights`: torchvision-format Mask R-CNN weights, made as torchvision makes its COCO-trained
maskrcnn_resnet50_fpn (FrozenBatchNorm2d ResNet-50, FPN, 91 classes), become a checkpoint whose model gives
torchvision's own model's detections exactly, labelled with COCO's category ids, and which exports; weights
or categories that do not fit get one line and no file."""

from __future__ import annotations

import json
import shutil

import pytest
import skimage.data
import torch
import torchvision
from click.testing import CliRunner
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from ssd_common import io
from ssd_common.labels import COCO_CATEGORIES, LabelMap
from ssd_train.cli import cli
from ssd_train.models.maskrcnn.model import make_decisive
from ssd_train.models.maskrcnn.train import load_for_inference


def torchvision_maskrcnn(resnet: str, num_classes: int, min_size: int, max_size: int) -> MaskRCNN:
    """A Mask R-CNN built by torchvision's own pieces as `maskrcnn_resnet50_fpn` builds its COCO-trained one
    (FrozenBatchNorm2d, three trainable stages), with random weights and normalisation statistics."""
    torch.manual_seed(0)
    resnet_model = getattr(torchvision.models, resnet)(weights=None, norm_layer=FrozenBatchNorm2d)
    model = MaskRCNN(_resnet_fpn_extractor(resnet_model, 3), num_classes=num_classes, min_size=min_size,
                     max_size=max_size)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0, 0.1)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return make_decisive(model).eval()


def photos() -> list[torch.Tensor]:
    return [torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255
            for array in (skimage.data.chelsea(), skimage.data.coffee()[:300])]


def run(*args: str):
    return CliRunner().invoke(cli, ["import-weights", *map(str, args)])


def test_torchvisions_coco_format_imports_and_detects_exactly_as_torchvision(tmp_path):
    reference = torchvision_maskrcnn("resnet50", 91, 320, 480)
    torch.save(reference.state_dict(), tmp_path / "maskrcnn_resnet50_fpn_coco.pth")
    result = run(tmp_path / "maskrcnn_resnet50_fpn_coco.pth", "--output", tmp_path / "coco.pt", "--min-size", "320",
                 "--max-size", "480")
    assert result.exit_code == 0, result.output
    assert "resnet50-FPN (frozen normalisation), 90 categories, images 320/480" in result.output

    model, label_map, info = load_for_inference(tmp_path / "coco.pt")
    assert (info["spec"].backbone, info["spec"].num_classes, info["spec"].norm) == ("resnet50", 91, "frozen")
    # torchvision's COCO labels are the category ids; the ten ids without a category are "N/A"
    assert [label_map.category_id(k) for k in range(1, 91)] == list(range(1, 91))
    assert (label_map.name(1), label_map.name(12), label_map.name(90)) == ("person", "N/A", "toothbrush")

    with torch.no_grad():
        expected, got = reference(photos()), model(photos())
    assert sum(len(e["scores"]) for e in expected) > 0
    for e, g in zip(expected, got):
        for key in ("boxes", "labels", "scores", "masks"):
            assert torch.equal(e[key], g[key]), key


@pytest.mark.slow
def test_an_imported_checkpoint_exports_with_cocos_category_ids(tmp_path):
    from ssd_train.export import export_model_repository

    torch.save(torchvision_maskrcnn("resnet18", 91, 128, 160).state_dict(), tmp_path / "weights.pth")
    assert run(tmp_path / "weights.pth", "--output", tmp_path / "coco.pt", "--min-size", "128",
               "--max-size", "160").exit_code == 0
    export_model_repository(tmp_path / "coco.pt", tmp_path / "repository", precisions=["fp32"])
    labels = LabelMap.load(tmp_path / "repository" / io.MASKRCNN_POSTPROCESS / "1" / io.LABELS_FILE)
    assert labels.category_ids() == list(range(1, 91))
    resize = json.loads((tmp_path / "repository" / io.MASKRCNN_PREPROCESS / "1" / io.RESIZE_FILE).read_text())
    assert (resize["min_size"], resize["max_size"]) == (128, 160)


def test_an_imported_coco_model_evaluates_on_a_split_of_fewer_categories(tmp_path, shapes_dir):
    """A COCO split has 80 categories, the model's label map 90 ("N/A" included): evaluation takes a split
    whose categories the model knows (the shapes split with COCO's first three names here); one category
    the model does not know is still a one-line error."""
    torch.save(torchvision_maskrcnn("resnet18", 91, 128, 160).state_dict(), tmp_path / "weights.pth")
    assert run(tmp_path / "weights.pth", "--output", tmp_path / "coco.pt", "--min-size", "128",
               "--max-size", "160").exit_code == 0
    data = tmp_path / "coco_named"
    shutil.copytree(shapes_dir, data)
    annotation_file = data / "annotations" / "instances_val2017.json"
    annotations = json.loads(annotation_file.read_text())
    names = dict(COCO_CATEGORIES)
    for category in annotations["categories"]:
        category["name"] = names[category["id"]]
    annotation_file.write_text(json.dumps(annotations))

    result = CliRunner().invoke(cli, ["evaluate", "--data", str(data), "--checkpoint", str(tmp_path / "coco.pt"),
                                      "--json-summary", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= summary["bbox_mAP"] <= 1 and 0 <= summary["segm_mAP"] <= 1

    annotations["categories"][0]["name"] = "ellipse"
    annotation_file.write_text(json.dumps(annotations))
    result = CliRunner().invoke(cli, ["evaluate", "--data", str(data), "--checkpoint", str(tmp_path / "coco.pt")])
    assert result.exit_code == 1 and "label map mismatch" in result.output.strip().splitlines()[-1]


def test_other_classes_need_the_categories_they_were_trained_on(tmp_path, shapes_dir):
    annotations = shapes_dir / "annotations" / "instances_val2017.json"
    expected = LabelMap.from_coco_categories(json.loads(annotations.read_text())["categories"])
    torch.save(torchvision_maskrcnn("resnet18", expected.num_classes, 128, 160).state_dict(), tmp_path / "w.pth")

    result = run(tmp_path / "w.pth", "--output", tmp_path / "out.pt")
    assert result.exit_code == 1 and not (tmp_path / "out.pt").exists()
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {tmp_path / 'w.pth'} has {expected.num_classes} classes (background included), not torchvision's "
        "COCO 91: pass the categories it was trained on (--categories)")

    result = run(tmp_path / "w.pth", "--output", tmp_path / "out.pt", "--categories", annotations)
    assert result.exit_code == 0, result.output
    _, label_map, info = load_for_inference(tmp_path / "out.pt")
    assert label_map == expected and info["spec"].backbone == "resnet18"


@pytest.mark.parametrize("case", ["an SSD300 checkpoint", "categories of another size", "a wrong shape",
                                  "not a file"])
def test_what_does_not_fit_gets_one_line_and_no_file(tmp_path, shapes_dir, tiny_checkpoint, case):
    annotations = shapes_dir / "annotations" / "instances_val2017.json"
    weights = tmp_path / "w.pth"
    if case == "an SSD300 checkpoint":
        weights, options, message = tiny_checkpoint, [], "is not a torchvision Mask R-CNN state dict"
    elif case == "categories of another size":
        torch.save(torchvision_maskrcnn("resnet18", 91, 128, 160).state_dict(), weights)
        options, message = ["--categories", annotations], "has 91 classes (background included) but the categories"
    elif case == "a wrong shape":
        state = torchvision_maskrcnn("resnet18", 91, 128, 160).state_dict()
        state["roi_heads.mask_predictor.mask_fcn_logits.weight"] = torch.zeros(90, 256, 1, 1)
        torch.save(state, weights)
        options, message = [], "weights do not fit the model of"
    else:
        weights, options, message = tmp_path / "missing.pth", [], "checkpoint not found"
    result = run(weights, "--output", tmp_path / "out.pt", *options)
    assert result.exit_code == 1 and not (tmp_path / "out.pt").exists()
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and message in line
