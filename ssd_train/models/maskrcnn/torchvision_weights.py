"""torchvision-format Mask R-CNN weights -> a checkpoint of this toolkit, which `evaluate`, `predict` and
`export` take as they take one `fit` wrote.

    ssd-train import-weights maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --output runs/maskrcnn_coco.pt

torchvision's `MaskRCNN` has the module names and the settings of model.py, so its state dicts load
unchanged (torchvision's COCO-trained `maskrcnn_resnet50_fpn` file among them). What a checkpoint records
besides the weights is read from them: the ResNet from its blocks, the normalisation (FrozenBatchNorm2d
keeps no `num_batches_tracked`), the number of classes. torchvision's COCO models have 91 outputs, label
k being COCO category id k (the ten ids COCO left without a category are "N/A" there and here); weights
with another number of classes need the categories of the dataset they were trained on.
"""

from __future__ import annotations

from pathlib import Path

from ssd_common.labels import COCO_CATEGORIES, LabelMap
from ssd_train import checkpoint as ckpt
from ssd_train.models.maskrcnn.model import MaskRCNNSpec, build_maskrcnn

DETECTOR = "maskrcnn"
MASK_LOGITS = "roi_heads.mask_predictor.mask_fcn_logits.weight"
CLASS_LOGITS = "roi_heads.box_predictor.cls_score.weight"
# (bottleneck blocks, blocks per stage) -> the ResNet
RESNETS = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34",
           (True, (3, 4, 6, 3)): "resnet50", (True, (3, 4, 23, 3)): "resnet101"}
COCO_91_CLASSES = 91  # torchvision's COCO detection models: background + category ids 1..90
NOT_A_CATEGORY = "N/A"


def coco_91_label_map() -> LabelMap:
    """Label k = COCO category id k, for k in 1..90, as torchvision's COCO models label."""
    names = dict(COCO_CATEGORIES)
    return LabelMap(tuple((cid, names.get(cid, NOT_A_CATEGORY)) for cid in range(1, COCO_91_CLASSES)))


def spec_of(weights: dict, min_size: int, max_size: int, source) -> MaskRCNNSpec:
    """The spec that rebuilds the model these torchvision-format weights came from."""
    if MASK_LOGITS not in weights or CLASS_LOGITS not in weights or "backbone.body.conv1.weight" not in weights:
        raise ckpt.CheckpointError(f"{source} is not a torchvision Mask R-CNN state dict (no {MASK_LOGITS})")
    bottleneck = "backbone.body.layer1.0.conv3.weight" in weights
    blocks = tuple(len({key.split(".")[3] for key in weights if key.startswith(f"backbone.body.layer{stage}.")})
                   for stage in range(1, 5))
    backbone = RESNETS.get((bottleneck, blocks))
    if backbone is None:
        raise ckpt.CheckpointError(f"{source}: a ResNet of {'bottleneck' if bottleneck else 'basic'} blocks "
                                   f"{blocks} is none of {', '.join(RESNETS.values())}")
    norm = "batch" if any(key.endswith("num_batches_tracked") for key in weights) else "frozen"
    return MaskRCNNSpec(backbone, int(weights[CLASS_LOGITS].shape[0]), min_size, max_size, norm=norm)


def import_weights(weights_path: Path, output: Path, label_map: LabelMap | None = None, min_size: int = 800,
                   max_size: int = 1333) -> dict:
    """Write a checkpoint of this toolkit (atomically) holding the torchvision-format Mask R-CNN weights of
    `weights_path`; `label_map` gives the categories (default: torchvision's COCO labels, for 91 classes).
    `min_size`/`max_size`: the image sizes the model was trained at (torchvision's COCO models: 800/1333).
    Returns what was recorded."""
    state = ckpt.load_checkpoint(weights_path)  # weights_only; a bare state dict comes back as {"model": it}
    weights = state["model"]
    if not isinstance(weights, dict):
        raise ckpt.CheckpointError(f"{weights_path} holds no state dict")
    spec = spec_of(weights, min_size, max_size, weights_path)
    if label_map is None:
        if spec.num_classes != COCO_91_CLASSES:
            raise ckpt.CheckpointError(
                f"{weights_path} has {spec.num_classes} classes (background included), not torchvision's COCO "
                f"{COCO_91_CLASSES}: pass the categories it was trained on (--categories)")
        label_map = coco_91_label_map()
    if label_map.num_classes != spec.num_classes:
        raise ckpt.CheckpointError(f"{weights_path} has {spec.num_classes} classes (background included) but the "
                                   f"categories give {label_map.num_classes}")
    # the weights must rebuild the model exactly (names and shapes), or nothing is written
    ckpt.load_model_weights(build_maskrcnn(spec), weights, f"{weights_path} ({spec.backbone}, "
                                                           f"{spec.num_classes} classes)")
    ckpt.save_checkpoint(output, {"model": weights, "detector": DETECTOR, "spec": spec.to_json(),
                                  "backbone": spec.backbone, "categories": label_map.to_json(),
                                  "label_map": label_map.to_nvidia(), "source": str(weights_path)})
    return {"checkpoint": str(output), "spec": spec.to_json(), "categories": len(label_map.categories)}
