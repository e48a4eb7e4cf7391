"""SSD300 transforms of the pure-PyTorch data path: the training augmentations of the reference
recipe and the evaluation transform. A training sample ends as the model's targets:
(image (3, 300, 300), offsets (8732, 4), labels (8732,)) via ssd_train.models.ssd300.boxes.match/encode."""

from __future__ import annotations

import torch
from PIL import Image, ImageOps
from torchvision.ops import box_iou
from torchvision.transforms import ColorJitter
from torchvision.transforms import functional as TF

from ssd_train.models.ssd300.boxes import SSD300, encode, match
from ssd_train.data import IMAGENET_MEAN, IMAGENET_STD

INPUT_SIZE = SSD300.fig_size


def to_model_input(image: Image.Image) -> torch.Tensor:
    """Resize to 300x300 (aspect ratio not kept), scale to [0, 1], ImageNet-normalise."""
    image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR)
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


class SSDRandomCrop:
    """The SSD crop: pick a minimum IoU (or no crop), then try crops of 30-100% width/height with
    aspect ratio in [0.5, 2] until every box overlaps the crop by more than that IoU and at least one
    box centre lies inside; keep the boxes whose centres lie inside, clipped to the crop."""

    MIN_IOUS = (None, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9)  # None = keep the whole image
    ATTEMPTS = 50

    def __call__(self, image: Image.Image, boxes: torch.Tensor, labels: torch.Tensor):
        while True:
            min_iou = self.MIN_IOUS[int(torch.randint(len(self.MIN_IOUS), ()))]
            if min_iou is None or len(boxes) == 0:
                return image, boxes, labels
            for _ in range(self.ATTEMPTS):
                w, h = (0.3 + 0.7 * torch.rand(2)).tolist()
                if not 0.5 <= w / h <= 2:
                    continue
                left, top = (torch.rand(2) * torch.tensor([1 - w, 1 - h])).tolist()
                crop = torch.tensor([[left, top, left + w, top + h]])
                if min_iou > 0 and not (box_iou(boxes, crop) > min_iou).all():
                    continue
                centres = 0.5 * (boxes[:, :2] + boxes[:, 2:])
                inside = ((centres > crop[:, :2]) & (centres < crop[:, 2:])).all(dim=1)
                if not inside.any():
                    continue
                kept = boxes[inside]
                kept = (torch.min(torch.max(kept, crop[:, :2].repeat(1, 2)), crop[:, 2:].repeat(1, 2))
                        - crop[:, :2].repeat(1, 2)) / torch.tensor([w, h, w, h])
                width, height = image.size
                image = image.crop((round(left * width), round(top * height),
                                    round((left + w) * width), round((top + h) * height)))
                return image, kept, labels[inside]


class TrainTransform:
    """PIL image + normalised xyxy boxes + labels -> (image tensor, target offsets, target labels)."""

    def __init__(self, augment: bool = True):
        self.augment = augment
        self.crop = SSDRandomCrop()
        self.jitter = ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05)

    def __call__(self, image: Image.Image, boxes: torch.Tensor, labels: torch.Tensor):
        if self.augment:
            image, boxes, labels = self.crop(image, boxes, labels)
            if torch.rand(()) < 0.5:
                image = ImageOps.mirror(image)
                boxes = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], dim=1)
            image = self.jitter(image)
        matched, target_labels = match(boxes, labels)
        return to_model_input(image), encode(matched), target_labels
