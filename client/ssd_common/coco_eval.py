"""COCO bbox evaluation with pycocotools, shared by `ssd-train fit/evaluate` and `ssd-client evaluate`.
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


def detection_records(image_id: int, boxes_xyxy, scores, category_ids) -> list[dict]:
    """COCO result records ({image_id, category_id, bbox [x, y, w, h], score}) for one image."""
    records = []
    for (x1, y1, x2, y2), score, cid in zip(np.asarray(boxes_xyxy).tolist(), np.asarray(scores).tolist(),
                                             np.asarray(category_ids).tolist()):
        records.append({"image_id": int(image_id), "category_id": int(cid),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return records


def coco_evaluate(annotations, detections: list[dict], image_ids=None) -> dict:
    """Evaluate COCO-format `detections` against `annotations` (a path or a loaded COCO object).

    Returns {"mAP": AP@[.5:.95], "stats": {name: value for the 12 stats}, "summary": printed text}.
    Only `image_ids` (default: all images of the annotation file) are scored.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        gt = annotations if isinstance(annotations, COCO) else COCO(str(Path(annotations)))
        if not detections:
            stats = np.zeros(len(STAT_NAMES))
            summary = "no detections: every AP and AR is 0\n"
        else:
            dt = gt.loadRes(detections)
            evaluator = COCOeval(gt, dt, iouType="bbox")
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
