"""`make-dataset shapes --style demo`: the dataset of `make demo` keeps its promises (valid COCO,
300x300 images, 2-4 separate objects of the sizes SSD300's default boxes cover, one colour family per
shape, deterministic), and the default style is untouched by it."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ssd_train.cli import cli
from ssd_train.data import shapes
from ssd_train.data.shapes import make_shapes_dataset

# The dominant channel of each category's colour family: circle red, rectangle green, triangle blue.
DOMINANT = {1: 0, 3: 1, 7: 2}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "shapes"
    result = CliRunner().invoke(cli, ["make-dataset", "shapes", str(out), "--train", "12", "--val", "4",
                                      "--seed", "5", "--style", "demo"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_demo_style_is_valid_coco_with_the_promised_objects(demo_dir, split):
    data = json.loads((demo_dir / "annotations" / f"instances_{split}.json").read_text())
    assert [c["id"] for c in data["categories"]] == [1, 3, 7]
    assert len(data["images"]) == (12 if split == "train2017" else 4)
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    by_image = {image["id"]: [] for image in data["images"]}
    for annotation in data["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    for image in data["images"]:
        pixels = Image.open(demo_dir / split / image["file_name"]).convert("RGB")
        assert pixels.size == (image["width"], image["height"]) == (300, 300)
        pixels = np.asarray(pixels, dtype=np.int32)
        objects = by_image[image["id"]]
        assert 2 <= len(objects) <= 4
        boxes = []
        for annotation in objects:
            x, y, w, h = annotation["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 300 and y + h <= 300
            assert 50 <= w <= 170 and 50 <= h <= 170, annotation["bbox"]
            assert annotation["area"] == pytest.approx(w * h) and annotation["iscrowd"] == 0
            # Inside every shape (a triangle too: its apex is in the middle third of the top edge).
            colour = pixels[int(y + 0.7 * h), int(x + w / 2)]
            assert int(np.argmax(colour)) == DOMINANT[annotation["category_id"]], (annotation, colour)
            boxes.append((x, y, x + w, y + h))
        for i, a in enumerate(boxes):  # objects never touch
            for b in boxes[i + 1:]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def test_demo_style_is_deterministic_and_differs_from_default(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", train=2, val=1, seed=3, style="demo")
    b = make_shapes_dataset(tmp_path / "b", train=2, val=1, seed=3, style="demo")
    c = make_shapes_dataset(tmp_path / "c", train=2, val=1, seed=3)
    d = make_shapes_dataset(tmp_path / "d", train=2, val=1, seed=3, style="default")
    for split in ("train2017", "val2017"):
        name = f"annotations/instances_{split}.json"
        assert (a / name).read_bytes() == (b / name).read_bytes() != (c / name).read_bytes()
        assert (c / name).read_bytes() == (d / name).read_bytes()
    assert (a / "train2017" / "000001.jpg").read_bytes() == (b / "train2017" / "000001.jpg").read_bytes()
    assert (c / "train2017" / "000001.jpg").read_bytes() == (d / "train2017" / "000001.jpg").read_bytes()


def test_unknown_style_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown shapes style"):
        make_shapes_dataset(tmp_path, train=1, val=1, style="fancy")
    result = CliRunner().invoke(cli, ["make-dataset", "shapes", str(tmp_path / "x"), "--style", "fancy"])
    assert result.exit_code != 0 and "fancy" in result.output
    assert shapes.STYLES == ("default", "demo")
