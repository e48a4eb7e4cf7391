"""Label maps: contiguous training labels (0 = background) <-> dataset category ids and names.

COCO's category ids are not contiguous (1..90 with gaps), the model's labels are (1..80), so every
place that turns a label into a category (evaluation, prediction, the served postprocess, the
client) goes through a `LabelMap`. Pure Python: the client imports it without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BACKGROUND = "background"

# (category id, name) of the 80 COCO 2017 detection categories, in id order.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
    (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"),
    (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"),
    (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"),
    (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"),
    (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
)


class LabelMapError(ValueError):
    """A label map that cannot be read or does not fit."""


@dataclass(frozen=True)
class LabelMap:
    """Categories in label order: label i (1-based) is `categories[i - 1]`; label 0 is background."""

    categories: tuple[tuple[int, str], ...]

    def __post_init__(self):
        if not self.categories:
            raise LabelMapError("label map has no categories")
        ids = [cid for cid, _ in self.categories]
        if len(set(ids)) != len(ids):
            raise LabelMapError("label map repeats a category id")

    @classmethod
    def coco(cls) -> "LabelMap":
        return cls(COCO_CATEGORIES)

    @classmethod
    def from_coco_categories(cls, categories: list[dict]) -> "LabelMap":
        """From a COCO annotation file's `categories` list; labels follow ascending category id."""
        return cls(tuple(sorted((int(c["id"]), str(c["name"])) for c in categories)))

    @classmethod
    def from_json(cls, data) -> "LabelMap":
        """From `to_json()` output: a list of {"id", "name"} in label order."""
        try:
            return cls(tuple((int(c["id"]), str(c["name"])) for c in data))
        except (TypeError, KeyError, ValueError) as err:
            raise LabelMapError(f"malformed label map: {err}") from None

    @classmethod
    def from_nvidia(cls, label_info: dict) -> "LabelMap":
        """From NVIDIA's checkpoint `label_map` ({label: name}, 0 = background), ids taken from COCO."""
        names = [str(label_info[k]) for k in sorted(label_info, key=int) if int(k) != 0]
        coco_ids = {name: cid for cid, name in COCO_CATEGORIES}
        if all(name in coco_ids for name in names):
            return cls(tuple((coco_ids[n], n) for n in names))
        return cls(tuple((i + 1, n) for i, n in enumerate(names)))

    @classmethod
    def load(cls, path: str | Path) -> "LabelMap":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise LabelMapError(f"cannot read label map {path}: {err}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    def to_json(self) -> list[dict]:
        return [{"id": cid, "name": name} for cid, name in self.categories]

    def to_nvidia(self) -> dict[int, str]:
        """NVIDIA's format, kept in our checkpoints so their tools can read them too."""
        return {0: BACKGROUND, **{i + 1: name for i, (_, name) in enumerate(self.categories)}}

    @property
    def num_classes(self) -> int:
        """Model classes, background included."""
        return len(self.categories) + 1

    def category_id(self, label: int) -> int:
        return self.categories[label - 1][0]

    def category_ids(self) -> list[int]:
        return [cid for cid, _ in self.categories]

    def name(self, label: int) -> str:
        return self.categories[label - 1][1]

    def names_by_id(self) -> dict[int, str]:
        return dict(self.categories)

    def label_of(self) -> dict[int, int]:
        """Category id -> contiguous label."""
        return {cid: i + 1 for i, (cid, _) in enumerate(self.categories)}
