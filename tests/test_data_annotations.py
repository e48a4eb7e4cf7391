"""Training data that would poison a run: bad boxes are dropped (the same ones by both data backends,
counted in one warning), an unknown category or a missing/unreadable image file is a one-line
error before training starts."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
from click.testing import CliRunner

from ssd_train.cli import cli
from ssd_train.data.annotations import read_boxes
from ssd_train.data.coco import CocoSplit, DatasetError, load_annotations
from ssd_train.data.loaders import build_train_loader
from ssd_train.data.shapes import make_shapes_dataset

BATCH = 4


def edit_annotations(root, edit, split="train2017") -> None:
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))  # NaN and Infinity are written as such, as Python tools do


def bad_boxes(image: dict) -> list[tuple[list[float], str | None]]:
    """(COCO bbox, the reason it is dropped or None) for boxes on `image`."""
    w, h = image["width"], image["height"]
    return [
        ([math.nan, 10, 20, 20], "with non-finite coordinates"),
        ([10, 10, math.inf, 20], "with non-finite coordinates"),
        ([10, 10, -5, 20], "empty or under a pixel"),
        ([10, 10, 20, 0], "empty or under a pixel"),
        ([w - 0.5, 10, 20, 20], "empty or under a pixel"),  # half a pixel once clipped
        ([w + 10, 10, 20, 20], "outside the image"),
        ([-30, -30, 20, 20], "outside the image"),
        ([w - 60, h - 70, 100, 100], None),  # clipped to the image's corner, kept
    ]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """A shapes dataset whose first training image also has every kind of bad box, a crowd region
    (ignored, not counted) and an annotation of an image the file does not list."""
    root = make_shapes_dataset(tmp_path_factory.mktemp("poisoned"), train=8, val=2, seed=1)

    def poison(data):
        image = data["images"][0]
        for i, (bbox, _) in enumerate(bad_boxes(image)):
            data["annotations"].append({"id": 1000 + i, "image_id": image["id"], "category_id": 3, "bbox": bbox,
                                        "area": 1.0, "iscrowd": 0})
        data["annotations"].append({"id": 2000, "image_id": image["id"], "category_id": 1, "bbox": [0, 0, 5, 5],
                                    "area": 25.0, "iscrowd": 1})
        data["annotations"].append({"id": 2001, "image_id": 424242, "category_id": 1, "bbox": [0, 0, 5, 5],
                                    "area": 25.0, "iscrowd": 0})

    edit_annotations(root, poison)
    return root


def test_bad_boxes_are_dropped_counted_and_reported_once(poisoned, caplog):
    split = CocoSplit(poisoned, "train2017")
    data = load_annotations(split)
    image = data["images"][0]
    expected = {}
    for _, reason in bad_boxes(image):
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    expected["for images not in the file"] = 1
    with caplog.at_level(logging.WARNING):
        boxes = read_boxes(split, data, skip_empty=True)
    assert dict(boxes.dropped) == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"dropped {sum(expected.values())} of" in warnings[0], warnings
    w, h = image["width"], image["height"]
    assert (w - 60, h - 70, w, h) in boxes.boxes[image["id"]]  # clipped to the image
    assert all(x2 - x1 >= 1 and y2 - y1 >= 1 and 0 <= x1 and x2 <= w and 0 <= y1 and y2 <= h
               for x1, y1, x2, y2 in boxes.boxes[image["id"]])


def test_both_backends_train_on_the_same_clean_boxes(poisoned):
    """Without random ops, DALI's and PyTorch's targets on the poisoned data are equal and finite:
    neither backend saw a bad box (a NaN box made NaN targets; DALI also kept boxes PyTorch
    dropped). As in test_dali's comparison, equality needs boxes without near-ties for a default
    box (a tiny box in a corner has some): the kept box was chosen so."""
    torch_loader = build_train_loader("pytorch", poisoned, batch_size=BATCH, augment=False, num_workers=0)
    dali_loader = build_train_loader("dali", poisoned, batch_size=BATCH, augment=False)
    assert dali_loader.annotations.dropped == torch_loader.annotations.dropped
    assert torch_loader.annotations.num_dropped == 8
    (_, dali_offsets, dali_labels), (_, offsets, labels) = (
        [torch.cat(parts) for parts in zip(*loader)] for loader in (dali_loader, torch_loader))
    assert torch.isfinite(offsets).all() and torch.isfinite(dali_offsets).all()
    assert torch.equal(dali_labels, labels)
    torch.testing.assert_close(dali_offsets, offsets, atol=1e-4, rtol=1e-4)


@pytest.fixture
def shapes_copy(shapes_dir, tmp_path):
    return shutil.copytree(shapes_dir, tmp_path / "data")


@pytest.mark.parametrize("backend", ["pytorch", "dali"])
def test_unknown_category_is_an_error(shapes_copy, backend):
    def add(data):
        data["annotations"].append({**data["annotations"][0], "id": 777, "category_id": 42})

    edit_annotations(shapes_copy, add)
    with pytest.raises(DatasetError, match="annotation 777 has category id 42, which is not in the file's categories"):
        build_train_loader(backend, shapes_copy, batch_size=BATCH, num_workers=0)


@pytest.mark.parametrize("backend", ["pytorch", "dali"])
def test_missing_or_unreadable_image_files_are_found_first(shapes_copy, backend):
    first, second = sorted((shapes_copy / "train2017").iterdir())[:2]
    first.unlink()
    with pytest.raises(DatasetError, match=f"image file not found: {first}$"):
        build_train_loader(backend, shapes_copy, batch_size=BATCH, num_workers=0)
    shutil.copy(second, first)
    second.write_bytes(b"")
    with pytest.raises(DatasetError, match=f"cannot read image {second}: not an image file"):
        build_train_loader(backend, shapes_copy, batch_size=BATCH, num_workers=0)


def test_fit_reports_a_missing_image_in_one_line_before_training(shapes_copy, tmp_path):
    missing = sorted((shapes_copy / "val2017").iterdir())[-1]
    missing.unlink()  # an evaluation image: its absence would otherwise show after the first epoch
    result = CliRunner().invoke(cli, ["fit", "--data", str(shapes_copy), "--save", str(tmp_path / "run"),
                                      "--epochs", "1", "--bs", "4", "--backbone", "resnet18",
                                      "--no-pretrained-backbone", "--data-backend", "pytorch", "-j", "0"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: image file not found: {missing}"]
    assert not (tmp_path / "run").exists()  # nothing started


def test_images_are_read_upright_and_annotations_of_the_stored_frame_are_warned_about(shapes_copy, caplog):
    """Cameras store photos sideways with an EXIF orientation. Every path reads them upright, as DALI's
    decoder does (the PyTorch backend and Mask R-CNN's loaders too); annotations made on the stored,
    unturned pixels would not line up, and the check before training says so."""
    from PIL import Image

    from ssd_train.data.coco import read_image

    split = CocoSplit(shapes_copy, "train2017")
    data = load_annotations(split)
    first = data["images"][0]
    path = split.image_dir / first["file_name"]
    orientation = Image.Exif()
    orientation[0x0112] = 6  # turn a quarter clockwise to view
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path, "JPEG", exif=orientation.tobytes())
    assert read_image(path).size == (30, 40)  # (width, height): upright
    first["width"], first["height"] = 30, 40  # annotated as one sees it
    with caplog.at_level(logging.WARNING):
        read_boxes(split, data, skip_empty=False)
    assert "not the size their annotations give" not in caplog.text
    first["width"], first["height"] = 40, 30  # annotated on the stored pixels
    with caplog.at_level(logging.WARNING):
        read_boxes(split, data, skip_empty=False)
    assert "1 images are not the size their annotations give" in caplog.text
    assert "annotated 40x30, 30x40 upright: its annotations were made on the stored pixels" in caplog.text
