"""The boxes of a COCO annotation file that training uses -- one decision for both data backends --
and the check of a split's image files before training starts. No torch.

Kept: non-crowd boxes with finite coordinates that are at least a pixel wide and high once clipped
to the image. The other non-crowd boxes are dropped, counted by reason and reported in one warning
per split: a box with NaN coordinates turns the loss into NaN, and one outside the image or without
area has no default box to match. Crowd regions are not objects to detect (the reference skips them
too). An annotation of a category the file does not list is an error: its label would be a guess.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ssd_common.layout import CocoSplit, DatasetError

log = logging.getLogger(__name__)

MIN_BOX_PIXELS = 1.0
EXIF_ORIENTATION = 0x0112  # the EXIF tag


@dataclass
class SplitBoxes:
    """What training reads of a split: its images (`id`, `file_name`, `width`, `height`, sorted by
    id) and, per image id, the kept boxes (x1, y1, x2, y2 in pixels) and their category ids -- and,
    in the same order, their annotations' ids and `segmentation` entries (None where absent) for
    instance segmentation, which turns them into masks (ssd_train.models.maskrcnn.data)."""

    split: CocoSplit
    images: list[dict]
    boxes: dict[int, list[tuple[float, float, float, float]]]
    category_ids: dict[int, list[int]]
    dropped: Counter  # reason -> boxes
    annotation_ids: dict[int, list[int]] = field(default_factory=dict)
    segmentations: dict[int, list] = field(default_factory=dict)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def image_path(self, image: dict) -> Path:
        return self.split.image_dir / image["file_name"]

    def to_coco(self, categories: list[dict]) -> dict:
        """The kept boxes as a COCO instances file (for readers that take only a file: DALI's)."""
        annotations = []
        for image in self.images:
            for (x1, y1, x2, y2), category_id in zip(self.boxes.get(image["id"], []),
                                                     self.category_ids.get(image["id"], [])):
                annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": category_id,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                    "iscrowd": 0})
        return {"images": self.images, "annotations": annotations, "categories": categories}


def read_boxes(split: CocoSplit, data: dict, skip_empty: bool) -> SplitBoxes:
    """The usable boxes of `data` (the split's annotation file, from layout.load_annotations) and its
    images -- only those with a usable box when `skip_empty` -- whose files are then checked."""
    source = split.annotation_file.name
    boxes: dict[int, list] = {}
    category_ids: dict[int, list] = {}
    annotation_ids: dict[int, list] = {}
    segmentations: dict[int, list] = {}
    dropped: Counter = Counter()
    try:
        known_categories = {int(c["id"]) for c in data["categories"]}
        images = sorted(({"id": int(img["id"]), "file_name": str(img["file_name"]), "width": int(img["width"]),
                          "height": int(img["height"])} for img in data["images"]), key=lambda img: img["id"])
        sizes = {img["id"]: (img["width"], img["height"]) for img in images}
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            category_id, image_id = int(ann["category_id"]), int(ann["image_id"])
            if category_id not in known_categories:
                raise DatasetError(f"{source}: annotation {ann.get('id')} has category id {category_id}, "
                                   f"which is not in the file's categories")
            box, reason = _clip(ann["bbox"], sizes.get(image_id))
            if reason:
                dropped[reason] += 1
                continue
            boxes.setdefault(image_id, []).append(box)
            category_ids.setdefault(image_id, []).append(category_id)
            annotation_ids.setdefault(image_id, []).append(ann.get("id"))
            segmentations.setdefault(image_id, []).append(ann.get("segmentation"))
    except DatasetError:
        raise
    except (KeyError, ValueError, TypeError) as err:
        raise DatasetError(f"{split.annotation_file}: malformed entry ({type(err).__name__}: {err})") from None
    for img in images:
        if img["width"] <= 0 or img["height"] <= 0:
            raise DatasetError(f"{source}: image {img['id']} has size {img['width']}x{img['height']}")
    if skip_empty:
        images = [img for img in images if img["id"] in boxes]
    result = SplitBoxes(split, images, boxes, category_ids, dropped, annotation_ids, segmentations)
    if dropped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(dropped.items()))
        log.warning("%s: dropped %d of %d boxes (%s)", split.annotation_file, result.num_dropped,
                    result.num_dropped + sum(map(len, boxes.values())), reasons)
    check_image_files([result.image_path(img) for img in images], [(img["width"], img["height"]) for img in images])
    return result


def _clip(bbox, size) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """A COCO box (x, y, w, h) clipped to its image, as (x1, y1, x2, y2), or the reason to drop it."""
    x, y, w, h = (float(v) for v in bbox)
    if size is None:
        return None, "for images not in the file"
    if not all(map(math.isfinite, (x, y, w, h))):
        return None, "with non-finite coordinates"
    width, height = size
    if w > 0 and h > 0 and (x >= width or y >= height or x + w <= 0 or y + h <= 0):
        return None, "outside the image"
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x2 - x1 < MIN_BOX_PIXELS or y2 - y1 < MIN_BOX_PIXELS:
        return None, "empty or under a pixel"
    return (x1, y1, x2, y2), None


def check_image_files(paths, sizes=None) -> None:
    """Each file exists and starts like an image PIL can read (its header only: nothing is decoded),
    so a bad file stops the run before training rather than hours into it. With `sizes` (the annotation
    file's (width, height) of each image), a warning counts the images whose upright size differs."""
    from PIL import Image, UnidentifiedImageError

    mismatched = []
    for path, size in zip(paths, sizes or itertools.repeat(None)):
        try:
            with Image.open(path) as image:
                if size is not None and upright_size(image) != tuple(size):
                    mismatched.append((path, size, upright_size(image), image.size))
        except FileNotFoundError:
            raise DatasetError(f"image file not found: {path}") from None
        except UnidentifiedImageError:
            raise DatasetError(f"cannot read image {path}: not an image file") from None
        except OSError as err:
            raise DatasetError(f"cannot read image {path}: {err.strerror or err}") from None
    if mismatched:
        path, (width, height), upright, stored = mismatched[0]
        why = (": its annotations were made on the stored pixels, which its EXIF orientation turns"
               if stored == (width, height) else "")
        log.warning("%d images are not the size their annotations give, so their boxes will not line up "
                    "(images are read upright, as DALI and the servers read them); e.g. %s: annotated %dx%d, "
                    "%dx%d upright%s", len(mismatched), path, width, height, *upright, why)


def upright_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image once its EXIF orientation is applied (5-8 turn it a quarter)."""
    width, height = image.size
    return (height, width) if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)


def check_enough_images(split: str, images: int, batch_size: int, num_shards: int) -> None:
    if images < batch_size * num_shards:
        raise DatasetError(f"{split} has {images} annotated images, fewer than one batch "
                           f"({batch_size} x {num_shards} processes)")
