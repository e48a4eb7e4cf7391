"""Mask R-CNN: torchvision's `MaskRCNN` on a ResNet-FPN backbone, configured as maskrcnn-benchmark's
`e2e_mask_rcnn_R_50_FPN_1x` (the settings below, each named once). Module and parameter names are
torchvision's, so torchvision-format Mask R-CNN and ResNet weights load unchanged.

A `MaskRCNNSpec` is what a checkpoint records to rebuild the model (plain JSON types)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torchvision
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from ssd_train.models.backbones import BackboneError, first_line, load_resnet_weights

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
# The ResNet's normalisation: FrozenBatchNorm2d (statistics never updated: batches of 2-8 images per
# GPU are too small to estimate them) or a trained BatchNorm2d (from scratch; see MaskRCNNSpec.norm).
NORMS = ("frozen", "batch")

# RPN (maskrcnn-benchmark's MODEL.RPN): one anchor size per FPN level, three aspect ratios.
ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
ANCHOR_ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES)
RPN_FG_IOU = 0.7
RPN_BG_IOU = 0.3
RPN_ANCHORS_PER_IMAGE = 256
RPN_POSITIVE_FRACTION = 0.5
RPN_NMS = 0.7
# Proposals per image before and after NMS. The FPN config `e2e_mask_rcnn_R_50_FPN_1x` sets 2000/2000
# for training and 1000/1000 for testing (per FPN level before NMS, as torchvision counts them); the
# 12000/6000 pre-NMS figures in NVIDIA's README are maskrcnn-benchmark's non-FPN defaults.
RPN_PRE_NMS_TOP_N_TRAIN = 2000
RPN_POST_NMS_TOP_N_TRAIN = 2000
RPN_PRE_NMS_TOP_N_TEST = 1000
RPN_POST_NMS_TOP_N_TEST = 1000
# RoI heads (MODEL.ROI_HEADS): sampling for the box head, then the detections kept.
ROI_FG_IOU = 0.5
ROI_BG_IOU = 0.5
ROIS_PER_IMAGE = 512
ROI_POSITIVE_FRACTION = 0.25
BOX_SCORE_THRESHOLD = 0.05
BOX_NMS = 0.5
DETECTIONS_PER_IMAGE = 100
# Mask head: RoIAlign to 14x14, four convolutions, then a 2x transposed convolution: 28x28 masks.
MASK_ROI_SIZE = 14
MASK_SIZE = 2 * MASK_ROI_SIZE


class SpecError(ValueError):
    """A model spec that is malformed."""


@dataclass(frozen=True)
class MaskRCNNSpec:
    """What a checkpoint records to rebuild the model (plain JSON types)."""

    backbone: str = "resnet50"
    num_classes: int = 81  # background + categories (contiguous labels 1..K, as LabelMap gives them)
    min_size: int = 800  # shorter image side after resizing
    max_size: int = 1333  # longer side at most
    trainable_layers: int = 3  # ResNet stages trained (0-5); 3: the stem and layer1 frozen, as the reference
    # The ResNet's normalisation (NORMS). "frozen" (with trainable_layers=3) is the reference's and right
    # with pretrained weights. From scratch it is the identity and the ResNet has no normalisation: use
    # "batch" with trainable_layers=5 there, as torchvision's maskrcnn_resnet50_fpn does without weights.
    # Measured on the demo shapes dataset from scratch (resnet18, min/max size 256/320, batch 2, SGD
    # momentum 0.9, 20 warmup steps from 1/3, 100 steps), the mean total loss of steps 1-10 -> 91-100:
    # lr 0.0025 (the recipe's 0.02 scaled to batch 2): frozen/3 2.93 -> 0.55, batch/5 3.38 -> 0.46;
    # lr 0.01: frozen/3 2.83 -> 0.80 (a spike to 1.59 at steps 51-60), batch/5 3.50 -> 0.51.
    norm: str = "frozen"

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise BackboneError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.norm not in NORMS:
            raise SpecError(f"unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        for name in ("num_classes", "min_size", "max_size", "trainable_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise SpecError(f"model spec: {name} must be an integer, not {value!r}")
        if self.num_classes < 2:
            raise SpecError(f"model spec: num_classes is {self.num_classes}; background and a category need 2")
        if not 0 < self.min_size <= self.max_size:
            raise SpecError(f"model spec: need 0 < min_size <= max_size, not {self.min_size} and {self.max_size}")
        if not 0 <= self.trainable_layers <= 5:
            raise SpecError(f"model spec: trainable_layers must be 0-5, not {self.trainable_layers}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data) -> "MaskRCNNSpec":
        if not isinstance(data, dict):
            raise SpecError(f"model spec must be a JSON object, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"model spec has unknown keys: {', '.join(map(str, unknown))} "
                            f"(known: {', '.join(sorted(known))})")
        return cls(**data)


def build_maskrcnn(spec: MaskRCNNSpec, backbone_path=None, pretrained_backbone: bool = False) -> MaskRCNN:
    """The model of `spec`. For training, the ResNet starts from `backbone_path` (a torchvision ResNet
    state dict) or, with `pretrained_backbone`, torchvision's ImageNet weights; checkpoints bring all
    weights, so loading one needs neither."""
    norm_layer = FrozenBatchNorm2d if spec.norm == "frozen" else torch.nn.BatchNorm2d
    resnet = getattr(torchvision.models, spec.backbone)(weights=None, norm_layer=norm_layer)
    if backbone_path is not None:
        load_resnet_weights(resnet, str(backbone_path), spec.backbone)
    elif pretrained_backbone:
        _imagenet_weights(resnet, spec.backbone)
    backbone = _resnet_fpn_extractor(resnet, spec.trainable_layers)
    return MaskRCNN(
        backbone,
        num_classes=spec.num_classes,
        min_size=spec.min_size,
        max_size=spec.max_size,
        rpn_anchor_generator=AnchorGenerator(ANCHOR_SIZES, ANCHOR_ASPECT_RATIOS),
        rpn_pre_nms_top_n_train=RPN_PRE_NMS_TOP_N_TRAIN,
        rpn_pre_nms_top_n_test=RPN_PRE_NMS_TOP_N_TEST,
        rpn_post_nms_top_n_train=RPN_POST_NMS_TOP_N_TRAIN,
        rpn_post_nms_top_n_test=RPN_POST_NMS_TOP_N_TEST,
        rpn_nms_thresh=RPN_NMS,
        rpn_fg_iou_thresh=RPN_FG_IOU,
        rpn_bg_iou_thresh=RPN_BG_IOU,
        rpn_batch_size_per_image=RPN_ANCHORS_PER_IMAGE,
        rpn_positive_fraction=RPN_POSITIVE_FRACTION,
        box_score_thresh=BOX_SCORE_THRESHOLD,
        box_nms_thresh=BOX_NMS,
        box_detections_per_img=DETECTIONS_PER_IMAGE,
        box_fg_iou_thresh=ROI_FG_IOU,
        box_bg_iou_thresh=ROI_BG_IOU,
        box_batch_size_per_image=ROIS_PER_IMAGE,
        box_positive_fraction=ROI_POSITIVE_FRACTION,
        mask_roi_pool=torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], MASK_ROI_SIZE, sampling_ratio=2),
    )


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The size GeneralizedRCNNTransform resizes a height x width image to (torchvision's
    `_resize_image_and_masks`): scale = min(min_size / shorter side, max_size / longer side) in
    double precision, each side floor(side * scale). A side of 0 means the image is too thin to resize."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


def make_decisive(model: torch.nn.Module) -> torch.nn.Module:
    """An untrained model made decisive, for checks and tests that compare two runs of it: class and mask
    logits scaled tenfold spread its scores over (0, 1) and push mask probabilities away from 0.5, so
    detections exist and no detection or mask pixel hangs on the last bit a kernel rounds differently."""
    with torch.no_grad():
        for layer in (model.roi_heads.box_predictor.cls_score, model.roi_heads.mask_predictor.mask_fcn_logits):
            layer.weight.mul_(10)
            layer.bias.mul_(10)
    return model


def _imagenet_weights(resnet: torch.nn.Module, name: str) -> None:
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as err:  # offline machines: URLError, timeouts, ...
        raise BackboneError(f"could not get the ImageNet weights of {name} ({type(err).__name__}: "
                            f"{first_line(err)}); pass a local torchvision state dict as the backbone "
                            f"weights instead") from None
    resnet.load_state_dict(state)
