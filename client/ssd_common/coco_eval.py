"""COCO evaluation with pycocotools, shared by `ssd-train fit/evaluate` and `ssd-client evaluate`:
boxes ("bbox") for every detector, instance masks ("segm") for Mask R-CNN.
No torch here: detections are plain dicts in COCO result format."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

# The 12 numbers COCOeval.summarize() prints, in order.
STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)
IOU_TYPES = ("bbox", "segm")


def detection_records(image_id: int, boxes_xyxy, scores, category_ids) -> list[dict]:
    """COCO result records ({image_id, category_id, bbox [x, y, w, h], score}) for one image."""
    records = []
    for (x1, y1, x2, y2), score, cid in zip(np.asarray(boxes_xyxy).tolist(), np.asarray(scores).tolist(),
                                             np.asarray(category_ids).tolist()):
        records.append({"image_id": int(image_id), "category_id": int(cid),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return records


def segmentation_records(image_id: int, masks_rle: list[dict], scores, category_ids) -> list[dict]:
    """COCO segm result records ({image_id, category_id, segmentation (RLE), score}) for one image."""
    records = []
    for rle, score, cid in zip(masks_rle, np.asarray(scores).tolist(), np.asarray(category_ids).tolist()):
        records.append({"image_id": int(image_id), "category_id": int(cid),
                        "segmentation": rle, "score": float(score)})
    return records


def coco_evaluate(annotations, detections: list[dict], image_ids=None, iou_type: str = "bbox") -> dict:
    """Evaluate COCO-format `detections` against `annotations` (a path or a loaded COCO object).

    Returns {"mAP": AP@[.5:.95], "stats": {name: value for the 12 stats}, "summary": printed text}.
    Only `image_ids` (default: all images of the annotation file) are scored. `iou_type` "bbox" matches
    boxes; "segm" matches masks (records from `segmentation_records`, ground truth with segmentations).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, not {iou_type!r}")
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        gt = annotations if isinstance(annotations, COCO) else COCO(str(Path(annotations)))
    if iou_type == "segm" and any("segmentation" not in a for a in gt.dataset.get("annotations", [])):
        raise ValueError("mask (segm) evaluation needs a 'segmentation' on every ground-truth annotation")
    with contextlib.redirect_stdout(quiet):
        if not detections:
            stats = np.zeros(len(STAT_NAMES))
            summary = "no detections: every AP and AR is 0\n"
        else:
            dt = gt.loadRes([dict(d) for d in detections])  # copies: loadRes adds fields to each record
            evaluator = COCOeval(gt, dt, iouType=iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted(int(i) for i in image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            summary_out = io.StringIO()
            with contextlib.redirect_stdout(summary_out):
                evaluator.summarize()
            stats, summary = evaluator.stats, summary_out.getvalue()
    stats = [float(s) for s in stats]  # -1 where pycocotools found no ground truth of that size
    return {"mAP": stats[0], "stats": dict(zip(STAT_NAMES, stats)), "summary": summary}


def write_summary(path, result: dict, **extra) -> None:
    Path(path).write_text(json.dumps({"mAP": result["mAP"], **result["stats"], **extra}, indent=1) + "\n")


def instance_summary(bbox: dict, segm: dict, **extra) -> dict:
    """Box and mask results of one evaluation (two `coco_evaluate` results) as one JSON-able dict."""
    return {"bbox_mAP": bbox["mAP"], "segm_mAP": segm["mAP"],
            "bbox_stats": [bbox["stats"][name] for name in STAT_NAMES],
            "segm_stats": [segm["stats"][name] for name in STAT_NAMES],
            "stat_names": list(STAT_NAMES), **extra}


def write_instance_summary(path, bbox: dict, segm: dict, **extra) -> None:
    Path(path).write_text(json.dumps(instance_summary(bbox, segm, **extra), indent=1) + "\n")
