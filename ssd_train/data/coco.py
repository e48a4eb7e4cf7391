"""COCO-layout datasets (pure PyTorch): `DIR/annotations/instances_{split}.json` + `DIR/{split}/`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ssd_common.labels import LabelMap, LabelMapError
from ssd_common.layout import CocoSplit, DatasetError, load_annotations, split_images
from ssd_train.data.annotations import check_image_files, read_boxes

__all__ = ["CocoDetection", "CocoImages", "CocoSplit", "DatasetError", "dataset_label_map", "load_annotations"]


def dataset_label_map(data: dict, expected: LabelMap | None, source: Path, covered: bool = False) -> LabelMap:
    """The label map of an annotation file; when `expected` is given (a checkpoint's), they must agree. With
    `covered` (evaluation), `expected` may also hold more categories than the file: then it is returned (a
    model labels by its own map; torchvision's COCO models know ten "N/A" ids no annotation file has)."""
    try:
        found = LabelMap.from_coco_categories(data["categories"])
    except (KeyError, ValueError, TypeError, LabelMapError) as err:
        raise DatasetError(f"{source}: malformed categories ({err})") from None
    if covered and expected is not None and set(found.categories) <= set(expected.categories):
        return expected
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
    sample. The boxes are those ssd_train.data.annotations keeps; with `skip_empty` only images with
    such boxes are samples (training). `annotations` tells what was read and what was dropped.
    """

    def __init__(self, root, split: str, transform=None, label_map: LabelMap | None = None,
                 skip_empty: bool = True):
        self.split = CocoSplit(Path(root), split)
        data = load_annotations(self.split)
        self.label_map = dataset_label_map(data, label_map, self.split.annotation_file)
        self.annotations = read_boxes(self.split, data, skip_empty)
        label_of = self.label_map.label_of()
        self.images = self.annotations.images
        self._boxes = {k: np.asarray(v, dtype=np.float32) for k, v in self.annotations.boxes.items()}
        self._labels = {k: np.asarray([label_of[c] for c in v], dtype=np.int64)
                        for k, v in self.annotations.category_ids.items()}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.split.image_dir / self.images[index]["file_name"]

    def load_image(self, index: int) -> Image.Image:
        return read_image(self.image_path(index))

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
    """Every image of a split (annotated or not) for evaluation: (tensor, (height, width), image id).
    Its boxes are not read here: evaluation compares with the annotation file itself."""

    def __init__(self, root, split: str, transform, label_map: LabelMap | None = None):
        split = CocoSplit(Path(root), split)
        data = load_annotations(split)
        self.label_map = dataset_label_map(data, label_map, split.annotation_file, covered=True)
        self.annotation_file = split.annotation_file
        self.images = split_images(split, data)
        check_image_files(path for _, path in self.images)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image_id, path = self.images[index]
        image = read_image(path)
        size = torch.tensor([image.height, image.width], dtype=torch.int32)
        return self.transform(image), size, image_id


def read_image(path: Path) -> Image.Image:
    """The image upright (its EXIF orientation applied), as DALI's decoder reads it: training, evaluation,
    predict and the servers all see the same pixels."""
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from None
