"""Where the files of a COCO-layout dataset live, and reading its annotation file. No torch: the
client's `ssd-client evaluate` reads datasets through this module too."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """A dataset that is missing, malformed or does not fit the model."""


@dataclass(frozen=True)
class CocoSplit:
    """Where one split of a COCO-layout dataset lives."""

    root: Path
    split: str

    @property
    def annotation_file(self) -> Path:
        return self.root / "annotations" / f"instances_{self.split}.json"

    @property
    def image_dir(self) -> Path:
        return self.root / self.split

    def check(self) -> "CocoSplit":
        if not self.root.is_dir():
            what = "is a file, not a directory" if self.root.exists() else "not found"
            raise DatasetError(f"dataset directory {what}: {self.root}")
        if not self.annotation_file.is_file():
            raise DatasetError(f"not a COCO-layout dataset: {self.annotation_file} is missing "
                               f"(expected DIR/annotations/instances_{self.split}.json and DIR/{self.split}/)")
        if not self.image_dir.is_dir():
            raise DatasetError(f"not a COCO-layout dataset: image folder {self.image_dir} is missing")
        return self


def load_annotations(split: CocoSplit) -> dict:
    split.check()
    try:
        data = json.loads(split.annotation_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot read {split.annotation_file}: {err}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{split.annotation_file} is not a COCO instances file: not a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{split.annotation_file} is not a COCO instances file: no '{key}' list")
    return data


def split_images(split: CocoSplit, data: dict | None = None) -> list[tuple[int, Path]]:
    """(image id, file) of every image of the split, sorted by id (`data`: its annotation file,
    when already loaded)."""
    data = load_annotations(split) if data is None else data
    try:
        return sorted((int(e["id"]), split.image_dir / e["file_name"]) for e in data["images"])
    except (KeyError, ValueError, TypeError) as err:
        raise DatasetError(f"{split.annotation_file}: malformed image entry ({type(err).__name__}: {err})") from None
