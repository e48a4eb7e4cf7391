"""COCO evaluation of a model over a split, shared by `ssd-train fit` (periodic) and `ssd-train evaluate`.
In a distributed run each rank scores its shard and rank 0 gathers the detections."""

from __future__ import annotations

import torch
import torch.distributed as dist
from tqdm import tqdm

from ssd_common.coco_eval import coco_evaluate, detection_records
from ssd_common.labels import LabelMap
from ssd_train.inference import category_lookup
from ssd_train.models.ssd300.inference import detect


@torch.no_grad()
def collect_detections(model, loader, label_map: LabelMap, device, amp: bool = False,
                       channels_last: bool = False, progress: bool = True) -> list[dict]:
    """COCO result records of every image the loader yields."""
    model.eval()
    to_category = category_lookup(label_map, device)
    records: list[dict] = []
    for images, sizes, image_ids in tqdm(loader, desc="evaluate", unit="batch", disable=not progress,
                                         mininterval=2, leave=False):
        found = detect(model, images.to(device, non_blocking=True), sizes, amp, channels_last)
        for image_id, (boxes, scores, labels) in zip(image_ids.tolist(), found.per_image()):
            records += detection_records(image_id, boxes.cpu(), scores.cpu(), to_category[labels].cpu())
    return records


def evaluate_model(model, loader, label_map: LabelMap, annotation_file, device, amp: bool = False,
                   channels_last: bool = False, progress: bool = True) -> dict | None:
    """{"mAP", "stats", "summary"} on rank 0 (None on other ranks)."""
    records = collect_detections(model, loader, label_map, device, amp, channels_last, progress)
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(records, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        records = [r for part in gathered for r in part]
    return coco_evaluate(annotation_file, records)
