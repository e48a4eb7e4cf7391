"""COCO-layout datasets (pure PyTorch): `DIR/annotations/instances_{split}.json` + `DIR/{split}/`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ssd_train.data.layout import CocoSplit, DatasetError, load_annotations
from ssd_train.labels import LabelMap, LabelMapError

__all__ = ["CocoDetection", "CocoImages", "CocoSplit", "DatasetError", "dataset_label_map", "load_annotations"]


def dataset_label_map(data: dict, expected: LabelMap | None, source: Path) -> LabelMap:
    """The label map of an annotation file; when `expected` is given (a checkpoint's), they must agree."""
    try:
        found = LabelMap.from_coco_categories(data["categories"])
    except (KeyError, ValueError, TypeError, LabelMapError) as err:
        raise DatasetError(f"{source}: malformed categories ({err})") from None
    if expected is not None and found != expected:
        raise DatasetError(f"label map mismatch: {source} has {found.num_classes - 1} categories "
                           f"({_preview(found)}) but the model was trained on {expected.num_classes - 1} "
                           f"({_preview(expected)})")
    return found


def _preview(label_map: LabelMap) -> str:
    names = [name for _, name in label_map.categories]
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


class CocoDetection(torch.utils.data.Dataset):
    """Images with their boxes (xyxy, pixels) and contiguous labels, through `transform`.

    `transform(image: PIL RGB, boxes: float32 (G, 4) xyxy normalised, labels: int64 (G,))` makes the
    sample. Crowd annotations and boxes under a pixel are dropped; with `skip_empty` so are images left
    without boxes (training).
    """

    def __init__(self, root, split: str, transform=None, label_map: LabelMap | None = None,
                 skip_empty: bool = True):
        self.split = CocoSplit(Path(root), split)
        data = load_annotations(self.split)
        self.label_map = dataset_label_map(data, label_map, self.split.annotation_file)
        label_of = self.label_map.label_of()
        boxes: dict[int, list] = {}
        labels: dict[int, list] = {}
        try:
            for ann in data["annotations"]:
                x, y, w, h = (float(v) for v in ann["bbox"])
                if ann.get("iscrowd", 0) or w < 1 or h < 1:
                    continue
                boxes.setdefault(ann["image_id"], []).append((x, y, x + w, y + h))
                labels.setdefault(ann["image_id"], []).append(label_of[ann["category_id"]])
            self.images = [
                {"id": int(img["id"]), "file_name": img["file_name"], "width": int(img["width"]),
                 "height": int(img["height"])}
                for img in data["images"] if not skip_empty or img["id"] in boxes
            ]
        except (KeyError, ValueError, TypeError) as err:
            raise DatasetError(f"{self.split.annotation_file}: malformed entry ({type(err).__name__}: {err})") from None
        self.images.sort(key=lambda img: img["id"])
        self._boxes = {k: np.asarray(v, dtype=np.float32) for k, v in boxes.items()}
        self._labels = {k: np.asarray(v, dtype=np.int64) for k, v in labels.items()}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.split.image_dir / self.images[index]["file_name"]

    def load_image(self, index: int) -> Image.Image:
        path = self.image_path(index)
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise DatasetError(f"cannot read image {path}: {err}") from None

    def target(self, index: int, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_id = self.images[index]["id"]
        boxes = self._boxes.get(image_id, np.zeros((0, 4), np.float32)) / np.float32([width, height, width, height])
        labels = self._labels.get(image_id, np.zeros((0,), np.int64))
        return torch.from_numpy(boxes.clip(0, 1)), torch.from_numpy(labels)

    def __getitem__(self, index: int):
        image = self.load_image(index)
        boxes, labels = self.target(index, *image.size)
        if self.transform is None:
            return image, boxes, labels
        return self.transform(image, boxes, labels)


class CocoImages(torch.utils.data.Dataset):
    """Every image of a split (annotated or not) for evaluation: (tensor, (height, width), image id)."""

    def __init__(self, root, split: str, transform, label_map: LabelMap | None = None):
        self.dataset = CocoDetection(root, split, None, label_map, skip_empty=False)
        self.transform = transform

    @property
    def label_map(self) -> LabelMap:
        return self.dataset.label_map

    @property
    def annotation_file(self) -> Path:
        return self.dataset.split.annotation_file

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image = self.dataset.load_image(index)
        size = torch.tensor([image.height, image.width], dtype=torch.int32)
        return self.transform(image), size, self.dataset.images[index]["id"]
