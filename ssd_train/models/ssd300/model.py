"""SSD300 v1.1: a torchvision ResNet cut after layer3 (stride-1 layer3), five extra blocks and six
heads. Module and parameter names follow NVIDIA's DeepLearningExamples SSD code, so the `model` entry
of their checkpoints loads unchanged."""

from __future__ import annotations

import logging
import warnings

import torch
import torchvision
from torch import nn

from ssd_train.models.backbones import BackboneError, load_resnet_weights
from ssd_train.models.ssd300.boxes import SSD300 as BOX_SPEC

log = logging.getLogger(__name__)

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Channels of the six feature maps (38, 19, 10, 5, 3, 1) for each backbone family.
_FEATURE_CHANNELS = {
    "resnet18": (256, 512, 512, 256, 256, 128),  # sic: the reference's last map has 128 channels here
    "resnet34": (256, 512, 512, 256, 256, 256),
    "resnet50": (1024, 512, 512, 256, 256, 256),
    "resnet101": (1024, 512, 512, 256, 256, 256),
    "resnet152": (1024, 512, 512, 256, 256, 256),
}
_EXTRA_MID_CHANNELS = (256, 256, 128, 128, 128)
COCO_NUM_CLASSES = 81


class ResNetBackbone(nn.Module):
    """conv1..layer3 of a torchvision ResNet with layer3's stride removed: 300x300 -> 38x38."""

    def __init__(self, name: str = "resnet50", weights_path: str | None = None, pretrained: bool = True):
        super().__init__()
        if name not in BACKBONES:
            raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        resnet = getattr(torchvision.models, name)(weights=None)
        if weights_path is not None:
            load_resnet_weights(resnet, weights_path, name)
        elif pretrained:
            _try_imagenet_weights(resnet, name)
        self.out_channels = _FEATURE_CHANNELS[name]
        self.feature_extractor = nn.Sequential(*list(resnet.children())[:7])
        first_block = self.feature_extractor[-1][0]
        first_block.conv1.stride = (1, 1)
        first_block.conv2.stride = (1, 1)
        first_block.downsample[0].stride = (1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_extractor(x)


def _try_imagenet_weights(resnet: nn.Module, name: str) -> None:
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        resnet.load_state_dict(weights.get_state_dict(progress=False))
    except Exception as err:  # offline machines: URLError, timeouts, ...
        warnings.warn(
            f"could not get the ImageNet weights of {name} ({type(err).__name__}); the backbone starts "
            "from random weights. Pass --backbone-path with a torchvision state dict to avoid this.",
            stacklevel=3,
        )


class SSD300(nn.Module):
    def __init__(self, backbone: ResNetBackbone | None = None, num_classes: int = COCO_NUM_CLASSES):
        super().__init__()
        self.feature_extractor = backbone if backbone is not None else ResNetBackbone(pretrained=False)
        self.label_num = num_classes
        channels = self.feature_extractor.out_channels
        self.additional_blocks = nn.ModuleList(
            _extra_block(c_in, mid, c_out, downsample=i < 3)
            for i, (c_in, mid, c_out) in enumerate(zip(channels[:-1], _EXTRA_MID_CHANNELS, channels[1:]))
        )
        self.num_defaults = BOX_SPEC.boxes_per_location
        self.loc = nn.ModuleList(
            nn.Conv2d(c, n * 4, kernel_size=3, padding=1) for n, c in zip(self.num_defaults, channels)
        )
        self.conf = nn.ModuleList(
            nn.Conv2d(c, n * num_classes, kernel_size=3, padding=1) for n, c in zip(self.num_defaults, channels)
        )
        for layer in (*self.additional_blocks, *self.loc, *self.conf):
            for param in layer.parameters():
                if param.dim() > 1:
                    nn.init.xavier_uniform_(param)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, 300, 300) -> (locs (N, 4, 8732), scores (N, num_classes, 8732))."""
        features = [self.feature_extractor(x)]
        for block in self.additional_blocks:
            features.append(block(features[-1]))
        n = x.shape[0]
        # Head channels are (box, coordinate) major; reshaping to (N, 4, -1) orders each level's
        # boxes as (box size, row, column), the order of ssd_train.models.ssd300.boxes.default_boxes.
        locs = [head(f).reshape(n, 4, -1) for head, f in zip(self.loc, features)]
        scores = [head(f).reshape(n, self.label_num, -1) for head, f in zip(self.conf, features)]
        return torch.cat(locs, 2).contiguous(), torch.cat(scores, 2).contiguous()


def _extra_block(c_in: int, mid: int, c_out: int, downsample: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, mid, kernel_size=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, c_out, kernel_size=3, padding=1 if downsample else 0, stride=2 if downsample else 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def build_model(
    backbone: str = "resnet50",
    num_classes: int = COCO_NUM_CLASSES,
    backbone_path: str | None = None,
    pretrained_backbone: bool = False,
) -> SSD300:
    """The SSD300. For training pass `pretrained_backbone=True` (ImageNet weights, when they can be
    had) or a local `backbone_path`; checkpoints bring all weights, so loading needs neither."""
    return SSD300(ResNetBackbone(backbone, backbone_path, pretrained_backbone), num_classes)
