import json

import pytest

from ssd_common.coco_eval import STAT_NAMES, coco_evaluate, detection_records, write_summary


@pytest.fixture
def annotations(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100}],
        "categories": [{"id": 5, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [100, 20, 60, 60], "area": 3600, "iscrowd": 0},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_perfect_detections(annotations):
    records = detection_records(1, [[10, 10, 60, 50], [100, 20, 160, 80]], [0.9, 0.8], [5, 5])
    result = coco_evaluate(annotations, records)
    assert result["mAP"] == pytest.approx(1.0)
    assert list(result["stats"]) == list(STAT_NAMES)
    assert "Average Precision" in result["summary"]


def test_one_of_two_found(annotations):
    # recall stops at 0.5: 101-point interpolated AP = 51 / 101 at every IoU threshold
    records = detection_records(1, [[10, 10, 60, 50]], [0.9], [5])
    assert coco_evaluate(annotations, records)["mAP"] == pytest.approx(51 / 101)


def test_wrong_category_scores_zero(annotations):
    records = detection_records(1, [[10, 10, 60, 50]], [0.9], [7])  # right box, wrong category id
    assert coco_evaluate(annotations, records)["mAP"] == 0
    assert coco_evaluate(annotations, [])["mAP"] == 0


def test_summary_file(annotations, tmp_path):
    result = coco_evaluate(annotations, detection_records(1, [[10, 10, 60, 50]], [0.9], [5]))
    write_summary(tmp_path / "s.json", result, split="val2017")
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["mAP"] == result["mAP"] and saved["split"] == "val2017" and set(STAT_NAMES) <= set(saved)
