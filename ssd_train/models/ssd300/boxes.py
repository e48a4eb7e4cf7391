"""THE default-box spec of SSD300 v1.1, and everything that depends on it: matching, box coding,
decoding and batched NMS. Training, evaluation, prediction, export and the served postprocess all
import this module; nothing else defines default boxes.

All functions are vectorised and device-agnostic (no Python loops over boxes or images).
Conventions: boxes are normalised to [0, 1]; `xyxy` = (x1, y1, x2, y2), `xywh` = (cx, cy, w, h).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
from torchvision.ops import box_iou, nms


@dataclass(frozen=True)
class DefaultBoxSpec:
    fig_size: int = 300
    feature_sizes: tuple[int, ...] = (38, 19, 10, 5, 3, 1)
    steps: tuple[int, ...] = (8, 16, 32, 64, 100, 300)
    scales: tuple[int, ...] = (21, 45, 99, 153, 207, 261, 315)
    aspect_ratios: tuple[tuple[int, ...], ...] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
    # Variances of the box coding (torchvision's BoxCoder weights 10, 10, 5, 5).
    scale_xy: float = 0.1
    scale_wh: float = 0.2

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        """Two square boxes plus a pair per aspect ratio: (4, 6, 6, 6, 4, 4)."""
        return tuple(2 + 2 * len(ar) for ar in self.aspect_ratios)

    @property
    def num_boxes(self) -> int:
        return sum(n * f * f for n, f in zip(self.boxes_per_location, self.feature_sizes))


SSD300 = DefaultBoxSpec()

# Evaluation decode settings of the reference.
SCORE_THRESHOLD = 0.05
TOPK_PER_CLASS = 200
NMS_IOU = 0.5
MAX_DETECTIONS = 200
MATCH_IOU = 0.5


def _box_sizes(spec: DefaultBoxSpec, level: int) -> list[tuple[float, float]]:
    small = spec.scales[level] / spec.fig_size
    large = spec.scales[level + 1] / spec.fig_size
    sizes = [(small, small), (math.sqrt(small * large),) * 2]
    for ratio in spec.aspect_ratios[level]:
        w, h = small * math.sqrt(ratio), small / math.sqrt(ratio)
        sizes += [(w, h), (h, w)]
    return sizes


@lru_cache(maxsize=16)
def _default_boxes_cpu(spec: DefaultBoxSpec) -> torch.Tensor:
    levels = []
    for level, (fsize, step) in enumerate(zip(spec.feature_sizes, spec.steps)):
        cells = spec.fig_size / step
        centres = (torch.arange(fsize, dtype=torch.float64) + 0.5) / cells
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        for w, h in _box_sizes(spec, level):
            # Order: level, box size, row, column -- the order the heads' outputs are flattened in.
            wh = torch.tensor([w, h], dtype=torch.float64).expand(fsize * fsize, 2)
            levels.append(torch.cat([cx.reshape(-1, 1), cy.reshape(-1, 1), wh], dim=1))
    return torch.cat(levels).clamp_(0, 1).float()


def default_boxes(spec: DefaultBoxSpec = SSD300, device=None, order: str = "xywh") -> torch.Tensor:
    """The (num_boxes, 4) default boxes, clamped to [0, 1]. Do not modify the returned tensor."""
    boxes = _default_boxes_cpu(spec)
    if order == "xyxy":
        boxes = _default_boxes_xyxy_cpu(spec)
    elif order != "xywh":
        raise ValueError(f"order must be 'xywh' or 'xyxy', not {order!r}")
    return boxes if device is None else boxes.to(device)


@lru_cache(maxsize=16)
def _default_boxes_xyxy_cpu(spec: DefaultBoxSpec) -> torch.Tensor:
    return xywh_to_xyxy(_default_boxes_cpu(spec))


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    centre, size = boxes[..., :2], boxes[..., 2:]
    return torch.cat([centre - 0.5 * size, centre + 0.5 * size], dim=-1)


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    low, high = boxes[..., :2], boxes[..., 2:]
    return torch.cat([0.5 * (low + high), high - low], dim=-1)


def match(
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    spec: DefaultBoxSpec = SSD300,
    iou_threshold: float = MATCH_IOU,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign ground truth to default boxes for one image.

    gt_boxes: (G, 4) xyxy; gt_labels: (G,) contiguous labels >= 1.
    Returns (boxes (D, 4) xyxy, labels (D,) int64): a default box with IoU >= threshold with some
    ground truth takes the best one; each ground truth's best default box is positive regardless.
    Unmatched default boxes get label 0 and keep their own coordinates.
    """
    dboxes = default_boxes(spec, gt_boxes.device, order="xyxy")
    if gt_boxes.numel() == 0:
        return dboxes.clone(), torch.zeros(len(dboxes), dtype=torch.int64, device=gt_boxes.device)
    ious = box_iou(gt_boxes, dboxes)  # (G, D)
    best_iou, best_gt = ious.max(dim=0)
    best_default = ious.argmax(dim=1)  # (G,)
    best_iou.index_fill_(0, best_default, 2.0)
    best_gt[best_default] = torch.arange(len(gt_boxes), device=gt_boxes.device)
    positive = best_iou >= iou_threshold
    labels = torch.where(positive, gt_labels.long()[best_gt], torch.zeros_like(best_gt))
    boxes = torch.where(positive[:, None], gt_boxes[best_gt], dboxes)
    return boxes, labels


def encode(boxes: torch.Tensor, spec: DefaultBoxSpec = SSD300) -> torch.Tensor:
    """xyxy boxes (..., D, 4) matched to the default boxes -> regression targets (..., D, 4)."""
    dboxes = default_boxes(spec, boxes.device)
    xywh = xyxy_to_xywh(boxes)
    centre = (xywh[..., :2] - dboxes[:, :2]) / dboxes[:, 2:] / spec.scale_xy
    size = torch.log(xywh[..., 2:] / dboxes[:, 2:]) / spec.scale_wh
    return torch.cat([centre, size], dim=-1)


def decode(locs: torch.Tensor, spec: DefaultBoxSpec = SSD300, dboxes: torch.Tensor | None = None) -> torch.Tensor:
    """Model locations (N, 4, D) -> xyxy boxes (N, D, 4). `dboxes`: `spec`'s default boxes where the
    caller keeps them (a traced module's buffer: a trace would freeze the device they are created on)."""
    dboxes = default_boxes(spec, locs.device) if dboxes is None else dboxes
    offsets = locs.float().transpose(1, 2)
    centre = offsets[..., :2] * spec.scale_xy * dboxes[:, 2:] + dboxes[:, :2]
    size = torch.exp(offsets[..., 2:] * spec.scale_wh) * dboxes[:, 2:]
    return xywh_to_xyxy(torch.cat([centre, size], dim=-1))


class Detections(NamedTuple):
    """Fixed-size, zero-padded detections of a batch, best first."""

    boxes: torch.Tensor  # (N, K, 4) xyxy, normalised
    scores: torch.Tensor  # (N, K)
    labels: torch.Tensor  # (N, K) int64 contiguous labels (>= 1; 0 in padding)
    counts: torch.Tensor  # (N,) int64 valid detections per image

    def per_image(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [
            (self.boxes[i, :n], self.scores[i, :n], self.labels[i, :n])
            for i, n in enumerate(self.counts.tolist())
        ]


def _nms_per_group(boxes: torch.Tensor, scores: torch.Tensor, group: torch.Tensor, iou_threshold: float
                   ) -> torch.Tensor:
    """Indices kept by NMS within each group (an (image, class) pair); `group` is non-decreasing and
    each group's boxes come best first.

    On CUDA: one NMS call for the whole batch, each group shifted to its own region of the plane
    (boxes lie in [0, 1], so an offset of 2 x group index separates them; float64 keeps the boxes'
    precision at offsets of thousands). The GPU kernel compares all pairs in parallel.
    On CPU the kernel is a sequential O(n^2) scan over all candidates, so one call over a batch grows
    with the square of the batch (4 s for 8 images of an untrained model's 16k candidates each):
    there, one call per group (at most 200 boxes each) on contiguous slices keeps it linear."""
    if boxes.device.type == "cuda":
        return _nms_one_call(boxes, scores, group, iou_threshold)
    return _nms_group_slices(boxes, scores, group, iou_threshold)


def _nms_one_call(boxes, scores, group, iou_threshold: float) -> torch.Tensor:
    shifted = boxes.double() + (group.double() * 2.0)[:, None]
    return nms(shifted, scores.double(), iou_threshold)


def _nms_group_slices(boxes, scores, group, iou_threshold: float) -> torch.Tensor:
    if len(group) == 0:
        return group
    _, sizes = torch.unique_consecutive(group, return_counts=True)
    kept, start = [], 0
    for size in sizes.tolist():
        kept.append(nms(boxes[start:start + size], scores[start:start + size], iou_threshold) + start)
        start += size
    return torch.cat(kept)


def candidates(
    locs: torch.Tensor,
    scores: torch.Tensor,
    spec: DefaultBoxSpec = SSD300,
    topk_per_class: int = TOPK_PER_CLASS,
    dboxes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first half of `postprocess`, fixed-size and traceable (the exported model ends with it):
    model outputs (N, 4, D) and (N, C, D) -> each class's `topk_per_class` best boxes, background
    dropped: scores (N, C-1, K) best first and their xyxy boxes (N, C-1, K, 4), clipped to [0, 1]
    like torchvision's SSD. 1/9 of the bytes of the raw outputs for COCO (K = 200 of D = 8732).
    `dboxes`: as for `decode`."""
    boxes = decode(locs, spec, dboxes).clamp(0, 1)  # (N, D, 4)
    probs = torch.softmax(scores.float(), dim=1)[:, 1:, :]  # (N, C-1, D)
    top_scores, top_index = probs.topk(min(topk_per_class, probs.shape[2]), dim=2)
    n, classes, k = top_index.shape
    top_boxes = torch.gather(boxes, 1, top_index.reshape(n, classes * k, 1).expand(n, classes * k, 4))
    return top_scores, top_boxes.reshape(n, classes, k, 4)


def select(
    top_scores: torch.Tensor,
    top_boxes: torch.Tensor,
    score_threshold: float = SCORE_THRESHOLD,
    iou_threshold: float = NMS_IOU,
    max_detections: int = MAX_DETECTIONS,
) -> Detections:
    """The second half of `postprocess`: `candidates`' (N, C-1, K) scores and (N, C-1, K, 4) boxes ->
    detections: the candidates above `score_threshold`, per-class NMS, then the `max_detections` best
    per image."""
    n, classes, _ = top_scores.shape
    device = top_scores.device
    image, cls, rank = (top_scores > score_threshold).nonzero(as_tuple=True)
    cand_scores = top_scores[image, cls, rank]
    cand_boxes = top_boxes[image, cls, rank]
    group = image * classes + cls  # non-decreasing: nonzero() walks (image, class) in order
    keep = _nms_per_group(cand_boxes, cand_scores, group, iou_threshold)
    keep = keep[torch.sort(cand_scores[keep], descending=True, stable=True).indices]
    keep = keep[torch.sort(image[keep], stable=True).indices]  # by image, best first within
    kept_image = image[keep]
    per_image = torch.bincount(kept_image, minlength=n)
    first = torch.cumsum(per_image, 0) - per_image
    position = torch.arange(len(keep), device=device) - first[kept_image]
    keep, kept_image, position = (t[position < max_detections] for t in (keep, kept_image, position))

    out_boxes = torch.zeros(n, max_detections, 4, device=device)
    out_scores = torch.zeros(n, max_detections, device=device)
    out_labels = torch.zeros(n, max_detections, dtype=torch.int64, device=device)
    out_boxes[kept_image, position] = cand_boxes[keep]
    out_scores[kept_image, position] = cand_scores[keep]
    out_labels[kept_image, position] = cls[keep] + 1
    return Detections(out_boxes, out_scores, out_labels, per_image.clamp(max=max_detections))


def postprocess(
    locs: torch.Tensor,
    scores: torch.Tensor,
    spec: DefaultBoxSpec = SSD300,
    score_threshold: float = SCORE_THRESHOLD,
    topk_per_class: int = TOPK_PER_CLASS,
    iou_threshold: float = NMS_IOU,
    max_detections: int = MAX_DETECTIONS,
) -> Detections:
    """Model outputs (N, 4, D) and (N, C, D) -> detections: softmax, drop background, keep the
    `topk_per_class` best boxes per class above `score_threshold`, per-class NMS, then the
    `max_detections` best per image. Boxes are clipped to [0, 1]. The served ensemble runs the same
    two halves: `candidates` inside the TorchScript model, `select` in the Python postprocess."""
    top_scores, top_boxes = candidates(locs, scores, spec, topk_per_class)
    return select(top_scores, top_boxes, score_threshold, iou_threshold, max_detections)
