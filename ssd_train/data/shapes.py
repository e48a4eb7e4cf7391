"""`ssd-train make-dataset shapes`: a deterministic synthetic detection dataset in the COCO layout.

Coloured circles, rectangles and triangles (several per image, varied sizes, colours and image sizes)
on noisy backgrounds. Category ids are deliberately not contiguous (1, 3, 7), like COCO's, so the
label-map path is always exercised. The default style is the dataset of the tests.

`style="demo"` is the dataset of `make demo`, made to be learnt from scratch in minutes on a CPU:
300x300 images (SSD300's input size: nothing is resized or distorted), plain grey backgrounds, 2-4
separate objects per image, 55-165 px wide and high (the sizes SSD300's default boxes cover best) and
one colour family per shape (circles red, rectangles green, triangles blue, each with jitter), so the
network tells the classes apart early and spends its few steps on finding and fitting the boxes.

Every object also has a COCO `segmentation` (one polygon: a rectangle's 4 corners, a triangle's 3, a
circle's ELLIPSE_POINTS points), so the same datasets train and test instance segmentation. Polygons are
in COCO's continuous coordinates, where pixel (x, y) covers [x, x + 1) x [y, y + 1): PIL fills the
pixels x1..x2 of a box (x1, y1, x2, y2), so the shape's outline runs to x2 + 1 -- the extent the
`bbox` (width x2 - x1 + 1) has always said. Adding them changed no image, box or area.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ({"id": 1, "name": "circle"}, {"id": 3, "name": "rectangle"}, {"id": 7, "name": "triangle"})


# Points of a circle's (an ellipse's) polygon: its area is then within 0.3% of the ellipse's.
ELLIPSE_POINTS = 48


def _draw_object(draw: ImageDraw.ImageDraw, rng: random.Random, kind: str, box, colour) -> tuple[list, list]:
    """Draw one object; its COCO bbox (x, y, w, h) and segmentation."""
    x1, y1, x2, y2 = box
    apex = None
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "rectangle":
        draw.rectangle(box, fill=colour)
    else:  # triangle, apex anywhere on the top edge: the tight box is still the drawn box
        apex = rng.uniform(x1, x2)
        draw.polygon([(apex, y1), (x2, y2), (x1, y2)], fill=colour)
    return [float(x1), float(y1), float(x2 - x1 + 1), float(y2 - y1 + 1)], _segmentation(kind, box, apex)


def _segmentation(kind: str, box, apex: float | None = None) -> list[list[float]]:
    """The drawn shape as a COCO polygon (see the module docstring for the coordinates)."""
    x1, y1, x2, y2 = box
    right, bottom = x2 + 1, y2 + 1
    if kind == "rectangle":
        points = [(x1, y1), (right, y1), (right, bottom), (x1, bottom)]
    elif kind == "triangle":  # PIL's apex is a pixel centre: half a pixel right in COCO's coordinates
        points = [(apex + 0.5, y1), (right, bottom), (x1, bottom)]
    else:
        cx, cy, rx, ry = (x1 + right) / 2, (y1 + bottom) / 2, (right - x1) / 2, (bottom - y1) / 2
        angles = (2 * math.pi * i / ELLIPSE_POINTS for i in range(ELLIPSE_POINTS))
        points = [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]
    return [[round(float(v), 2) for point in points for v in point]]


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    base = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _colour_far_from(rng: random.Random, background) -> tuple[int, int, int]:
    while True:
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(colour, background)) > 150:
            return colour


def make_split(out: Path, split: str, count: int, seed: int, first_id: int = 1) -> dict:
    rng = random.Random(f"{seed}-{split}")
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(first_id, first_id + count):
        width, height = rng.randint(240, 400), rng.randint(240, 400)
        image = _background(rng, width, height)
        background = image.getpixel((0, 0))
        draw = ImageDraw.Draw(image)
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(rng.randint(1, 4)):
            for _attempt in range(20):
                side = rng.uniform(0.15, 0.5) * min(width, height)
                w, h = side * rng.uniform(0.7, 1.4), side * rng.uniform(0.7, 1.4)
                x1, y1 = rng.uniform(0, width - w - 1), rng.uniform(0, height - h - 1)
                box = (round(x1), round(y1), round(x1 + w), round(y1 + h))
                if all(box[2] < p[0] or box[0] > p[2] or box[3] < p[1] or box[1] > p[3] for p in placed):
                    break
            else:
                continue  # no free place left for another object
            placed.append(box)
            category = rng.choice(CATEGORIES)
            bbox, segmentation = _draw_object(draw, rng, category["name"], box, _colour_far_from(rng, background))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category["id"],
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0,
                                "segmentation": segmentation})
        file_name = f"{image_id:06d}.jpg"
        image.save(image_dir / file_name, quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    return {"images": images, "annotations": annotations, "categories": list(CATEGORIES)}


# The demo style: image side, object sides (before the aspect jitter), objects per image, and the
# colour family of each shape (base RGB; each object's channels are jittered by up to +-DEMO_JITTER).
DEMO_SIZE = 300
DEMO_SIDE = (70, 130)
DEMO_ASPECT = (0.8, 1.25)
DEMO_OBJECTS = (2, 4)
DEMO_COLOURS = {"circle": (220, 50, 40), "rectangle": (40, 190, 60), "triangle": (40, 80, 230)}
DEMO_JITTER = 30
STYLES = ("default", "demo")


def make_demo_split(out: Path, split: str, count: int, seed: int, first_id: int = 1) -> dict:
    """The `demo` style (see the module docstring)."""
    rng = random.Random(f"demo-{seed}-{split}")
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    size = DEMO_SIZE
    for image_id in range(first_id, first_id + count):
        grey = rng.randint(90, 200)
        base = np.array([grey + rng.randint(-10, 10) for _ in range(3)], dtype=np.float32)
        noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 4, (size, size, 3))
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(rng.randint(*DEMO_OBJECTS)):
            for _attempt in range(50):
                side = rng.uniform(*DEMO_SIDE)
                w, h = side * rng.uniform(*DEMO_ASPECT), side * rng.uniform(*DEMO_ASPECT)
                x1, y1 = rng.uniform(2, size - w - 3), rng.uniform(2, size - h - 3)
                box = (round(x1), round(y1), round(x1 + w), round(y1 + h))
                # At least 4 px apart: every object stands alone.
                if all(box[2] + 4 < p[0] or box[0] > p[2] + 4 or box[3] + 4 < p[1] or box[1] > p[3] + 4
                       for p in placed):
                    break
            else:
                continue  # no free place left for another object
            placed.append(box)
            category = rng.choice(CATEGORIES)
            colour = tuple(min(255, max(0, c + rng.randint(-DEMO_JITTER, DEMO_JITTER)))
                           for c in DEMO_COLOURS[category["name"]])
            x1, y1, x2, y2 = box
            if category["name"] == "triangle":  # apex in the middle third of the top edge
                apex = rng.uniform(x1 + (x2 - x1) / 3, x2 - (x2 - x1) / 3)
                draw.polygon([(apex, y1), (x2, y2), (x1, y2)], fill=colour)
                bbox = [float(x1), float(y1), float(x2 - x1 + 1), float(y2 - y1 + 1)]
                segmentation = _segmentation("triangle", box, apex)
            else:
                bbox, segmentation = _draw_object(draw, rng, category["name"], box, colour)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category["id"],
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0,
                                "segmentation": segmentation})
        file_name = f"{image_id:06d}.jpg"
        image.save(image_dir / file_name, quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    return {"images": images, "annotations": annotations, "categories": list(CATEGORIES)}


def make_shapes_dataset(out: str | Path, train: int = 200, val: int = 50, seed: int = 0,
                        style: str = "default") -> Path:
    """Write OUT/train2017, OUT/val2017 and OUT/annotations/instances_{train,val}2017.json.

    `style` is "default" (the tests' dataset) or "demo" (easier to learn; see the module docstring)."""
    if style not in STYLES:
        raise ValueError(f"unknown shapes style {style!r}; choose one of {', '.join(STYLES)}")
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    split_maker = make_demo_split if style == "demo" else make_split
    for split, count, first_id in (("train2017", train, 1), ("val2017", val, 1_000_000)):
        data = split_maker(out, split, count, seed, first_id)
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return out
