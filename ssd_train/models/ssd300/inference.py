"""SSD300's forward + decode path, shared by evaluation, prediction, benchmarks and the served
postprocess: preprocessed images in, detections in original-image pixels out."""

from __future__ import annotations

import torch

from ssd_train.inference import autocast
from ssd_train.models.ssd300.boxes import Detections, postprocess


def scale_to_pixels(detections: Detections, sizes: torch.Tensor) -> Detections:
    """Normalised boxes -> original-image pixels; `sizes` (N, 2) holds (height, width)."""
    height, width = sizes[:, 0:1].float(), sizes[:, 1:2].float()
    scale = torch.cat([width, height, width, height], dim=1).to(detections.boxes.device)
    return detections._replace(boxes=detections.boxes * scale[:, None, :])


@torch.no_grad()
def detect(model: torch.nn.Module, images: torch.Tensor, sizes: torch.Tensor, amp: bool = False,
           channels_last: bool = False) -> Detections:
    """Preprocessed images (N, 3, 300, 300) on the model's device -> detections in pixels (labels are
    the model's contiguous labels; map them with `category_lookup`)."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(images.device, amp):
        locs, scores = model(images)
    return scale_to_pixels(postprocess(locs.float(), scores.float()), sizes)
