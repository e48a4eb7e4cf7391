"""Mask R-CNN's data: masks survive the pipeline (read from polygons and RLE, flipped and resized with
their boxes), crowd regions stay out, a bad segmentation is a one-line error before training, and the
batches are a function of (seed, epoch) -- grouped by aspect ratio, split between ranks, resumable
mid-epoch and the same with any number of workers. The generated shapes carry polygons that match
their pixels."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from ssd_common.layout import DatasetError
from ssd_train.data.shapes import make_shapes_dataset
from ssd_train.data.seeding import SeededSamples
from ssd_train.models.maskrcnn.data import (GroupedBatchSampler, InstanceDataset,
                                            build_eval_loader, build_train_loader)
from ssd_train.models.maskrcnn.model import MaskRCNNSpec, build_maskrcnn


def edited_copy(source, target, edit, split="train2017"):
    """A copy of the dataset `source` whose annotation file `edit(data)` has changed."""
    shutil.copytree(source, target)
    path = target / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return target


def mask_box(mask: torch.Tensor) -> list[int]:
    """The pixel extent (x1, y1, x2, y2) of a mask, in the boxes' coordinates (x2 = last column + 1)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def assert_masks_fit_boxes(target, tolerance=1.0):
    assert target["masks"].shape[0] == target["boxes"].shape[0] == target["labels"].shape[0] > 0
    for mask, box in zip(target["masks"], target["boxes"]):
        assert np.allclose(mask_box(mask), box.tolist(), atol=tolerance), (mask_box(mask), box.tolist())


def test_flip_moves_masks_and_boxes_together(shapes_dir):
    plain = InstanceDataset(shapes_dir, "train2017", augment=False)
    augmented = SeededSamples(InstanceDataset(shapes_dir, "train2017", augment=True), seed=0)
    image, target = plain[0]
    assert image.dtype == torch.float32 and image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1
    assert target["masks"].dtype == torch.uint8 and target["boxes"].dtype == torch.float32
    assert target["labels"].dtype == torch.int64 and target["image_id"] == plain.images[0]["id"]
    assert_masks_fit_boxes(target)
    width = image.shape[-1]
    flipped = 0
    for epoch in range(8):
        other_image, other = augmented[(epoch, 0)]
        assert_masks_fit_boxes(other)
        if torch.equal(other_image, image):
            assert torch.equal(other["masks"], target["masks"]) and torch.equal(other["boxes"], target["boxes"])
            continue
        flipped += 1
        assert torch.equal(other_image, image.flip(-1)) and torch.equal(other["masks"], target["masks"].flip(-1))
        assert torch.equal(other["boxes"][:, [2, 0]], width - target["boxes"][:, [0, 2]])
    assert 0 < flipped < 8  # p = 0.5


def test_the_models_transform_resizes_masks_with_boxes(shapes_dir):
    """Resized (enlarged, as COCO's 640x480 images are to a shorter side of 800; shrunk), each mask's
    extent scales as its box does -- to a pixel, or, shrunk, to the rows and columns nearest-neighbour
    sampling skips (a triangle's thin apex can fall between those it keeps)."""
    dataset = InstanceDataset(shapes_dir, "train2017", augment=False)
    samples = [dataset[i] for i in range(2)]
    for min_size, max_size in ((480, 800), (128, 160)):
        model = build_maskrcnn(MaskRCNNSpec("resnet18", dataset.label_map.num_classes, min_size, max_size))
        model.train()
        batch, resized = model.transform([image for image, _ in samples], [target for _, target in samples])
        for (height, width), (image, before), after in zip(batch.image_sizes, samples, resized):
            assert after["masks"].shape[1:] == (height, width)
            scale = torch.tensor([width / image.shape[2], height / image.shape[1]] * 2)
            assert torch.allclose(after["boxes"], before["boxes"] * scale, atol=1e-3)
            for mask_before, mask_after in zip(before["masks"], after["masks"]):
                expected = torch.tensor(mask_box(mask_before)) * scale
                tolerance = max(1.0, 1 / scale.min().item())
                assert np.allclose(mask_box(mask_after), expected, atol=tolerance), (mask_box(mask_after), expected)


def test_crowd_regions_are_left_out(shapes_dir, tmp_path):
    def add_crowds(data):
        first, second = data["images"][:2]
        rle = mask_utils.encode(np.asfortranarray(np.ones((first["height"], first["width"]), np.uint8)))
        crowd = {"iscrowd": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400.0,
                 "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != second["id"]]
        data["annotations"] += [{**crowd, "id": 9001, "image_id": first["id"]},
                                {**crowd, "id": 9002, "image_id": second["id"]}]

    root = edited_copy(shapes_dir, tmp_path / "crowd", add_crowds)
    before = InstanceDataset(shapes_dir, "train2017", augment=False)
    after = InstanceDataset(root, "train2017", augment=False)
    assert len(after) == len(before) - 1  # the image with only a crowd region is no training sample
    assert torch.equal(after[0][1]["boxes"], before[0][1]["boxes"])
    assert len(InstanceDataset(root, "train2017", train=False)) == len(before)


def test_rle_and_polygon_segmentations_read_the_same(shapes_dir, tmp_path):
    """COCO stores some objects as RLE, compressed (a string) or not (a list of run lengths)."""
    polygons = InstanceDataset(shapes_dir, "train2017", augment=False)
    index = next(i for i, image in enumerate(polygons.images) if len(polygons.annotations.boxes[image["id"]]) >= 2)
    image_id = polygons.images[index]["id"]

    def to_rle(data):
        image = next(image for image in data["images"] if image["id"] == image_id)
        height, width = image["height"], image["width"]
        objects = [a for a in data["annotations"] if a["image_id"] == image_id]
        for i, annotation in enumerate(objects[:2]):
            rle = mask_utils.merge(mask_utils.frPyObjects(annotation["segmentation"], height, width))
            if i == 0:
                annotation["segmentation"] = {"size": [height, width], "counts": rle["counts"].decode()}
            else:  # run lengths of the column-major mask, starting with a run of zeros
                mask = mask_utils.decode(rle).flatten(order="F")
                starts = np.flatnonzero(np.diff(np.concatenate([[0], mask, [1 - mask[-1]]])))
                annotation["segmentation"] = {"size": [height, width],
                                              "counts": np.diff(np.concatenate([[0], starts])).tolist()}

    rle = InstanceDataset(edited_copy(shapes_dir, tmp_path / "rle", to_rle), "train2017", augment=False)
    assert rle.images[index]["id"] == image_id
    assert torch.equal(rle[index][1]["masks"], polygons[index][1]["masks"])


@pytest.mark.parametrize("segmentation, message", [
    (None, "no segmentation"),
    ([], "an empty segmentation"),
    ([[10, 10, 20, 10]], "malformed polygon"),
    ([[10, 10, 20, "x", 20, 20]], "non-numeric or non-finite"),
    ([[10, 10, 20, float("nan"), 20, 20]], "non-numeric or non-finite"),
    ({"size": [5, 5], "counts": [25]}, "an RLE of size [5, 5]"),
    ("polygon", "neither polygons nor an RLE"),
    ({"size": "IMAGE", "counts": "zzzz"}, "malformed RLE"),
    ({"size": "IMAGE", "counts": [3, 4]}, "runs cover 7 pixels"),
    ({"size": "IMAGE", "counts": [1.5]}, "malformed RLE"),
])
def test_a_malformed_segmentation_is_a_one_line_dataset_error(shapes_dir, tmp_path, segmentation, message):
    def spoil(data):
        image, annotation = data["images"][0], data["annotations"][0]
        assert annotation["image_id"] == image["id"]
        value = segmentation
        if isinstance(value, dict) and value["size"] == "IMAGE":
            value = {**value, "size": [image["height"], image["width"]]}
        if value is None:
            del annotation["segmentation"]
        else:
            annotation["segmentation"] = value
        annotation["id"] = 4242

    root = edited_copy(shapes_dir, tmp_path / "bad", spoil)
    with pytest.raises(DatasetError, match="instances_train2017.json: annotation 4242") as error:
        InstanceDataset(root, "train2017")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_segmentation_of_a_dropped_box_does_not_matter(shapes_dir, tmp_path):
    """Only kept objects need masks: a crowd region or an unusable box is left out with its segmentation."""
    def spoil(data):
        annotation = data["annotations"][0]
        annotation["bbox"], annotation["segmentation"] = [10, 10, 0, 0], "nonsense"

    InstanceDataset(edited_copy(shapes_dir, tmp_path / "dropped", spoil), "train2017")


# Aspect ratios of a made-up split: 22 landscape or square, 15 portrait.
RATIOS = [1.5, 0.75, 1.0, 0.6, 1.33] * 7 + [2.0, 0.5]


def test_every_batch_is_one_aspect_group_and_an_epoch_is_a_function_of_seed_and_epoch():
    sampler = GroupedBatchSampler(RATIOS, batch_size=3, seed=4)
    assert len(sampler) == 22 // 3 + 15 // 3
    batches = sampler.epoch_batches(0)
    assert len(batches) == len(sampler) and all(len(b) == 3 for b in batches)
    assert all(len({RATIOS[i] >= 1 for i in batch}) == 1 for batch in batches)
    assert len({i for batch in batches for i in batch}) == 3 * len(batches)  # no image twice
    assert GroupedBatchSampler(RATIOS, 3, seed=4).epoch_batches(0) == batches
    assert sampler.epoch_batches(1) != batches and GroupedBatchSampler(RATIOS, 3, seed=5).epoch_batches(0) != batches
    sampler.set_epoch(7)
    assert list(sampler) == [[(7, i) for i in batch] for batch in sampler.epoch_batches(7)]


def test_ranks_get_disjoint_batches_of_equal_number():
    ranks = [GroupedBatchSampler(RATIOS, 2, seed=1, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in ranks}) == 1 and len(ranks[0]) == (11 + 7) // 3
    for epoch in (0, 1):
        seen = [i for s in ranks for batch in s.epoch_batches(epoch) for i in batch]
        assert len(seen) == len(set(seen)) == 3 * len(ranks[0]) * 2
        assert all(len(s.epoch_batches(epoch)) == len(s) for s in ranks)


def test_start_batch_yields_exactly_the_tail_of_the_epoch():
    sampler = GroupedBatchSampler(RATIOS, 2, seed=3, rank=1, world_size=2)
    sampler.set_epoch(2)
    full = list(sampler)
    for k in (0, 1, 4, len(sampler)):
        sampler.set_epoch(2, start_batch=k)
        assert list(sampler) == full[k:] and len(sampler) == len(full)
    with pytest.raises(ValueError, match="outside the epoch"):
        sampler.set_epoch(2, start_batch=len(sampler) + 1)


def flat(batches):
    """A loader's batches as comparable tensors: images, boxes, labels and masks in order."""
    out = []
    for images, targets in batches:
        out += list(images)
        for target in targets:
            out += [target["boxes"], target["labels"], target["masks"], torch.tensor(target["image_id"])]
    return out


def test_loaders_with_0_and_2_workers_and_a_resumed_one_yield_the_same_batches(shapes_dir):
    def loader(num_workers):
        return build_train_loader(shapes_dir, batch_size=2, seed=7, num_workers=num_workers)

    in_process, workers = loader(0), loader(2)
    assert len(in_process) == len(workers) > 3 and len(in_process.annotations.images) == 24
    in_process.set_epoch(1)
    workers.set_epoch(1)
    expected, got = list(in_process), list(workers)
    for a, b in zip(flat(expected), flat(got), strict=True):
        assert torch.equal(a, b)
    for images, targets in expected:
        assert len({image.shape[2] >= image.shape[1] for image in images}) == 1  # one aspect group
    workers.set_epoch(1, start_batch=3)
    assert len(workers) == len(in_process)
    for a, b in zip(flat(expected[3:]), flat(list(workers)), strict=True):
        assert torch.equal(a, b)


def test_the_eval_loader_gives_every_image_once_across_ranks(shapes_dir):
    seen = []
    for rank in range(3):
        loader, label_map, annotation_file = build_eval_loader(shapes_dir, batch_size=2, rank=rank, world_size=3,
                                                               num_workers=0)
        for images, image_ids in loader:
            assert all(image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1 for image in images)
            assert isinstance(images, list) and len(images) == len(image_ids)
            seen += image_ids
    data = json.loads(annotation_file.read_text())
    assert sorted(seen) == sorted(image["id"] for image in data["images"])
    assert label_map.category_ids() == [1, 3, 7]


@pytest.mark.parametrize("style", ["default", "demo"])
def test_shapes_polygons_match_the_drawn_pixels(tmp_path, style):
    """Each object's polygon, rasterised by pycocotools, covers the pixels that look like the object
    rather than the background around it (the images are JPEGs: edges are soft)."""
    root = make_shapes_dataset(tmp_path, train=6, val=0, seed=1, style=style)
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    for image in data["images"]:
        pixels = np.asarray(Image.open(root / "train2017" / image["file_name"]).convert("RGB"), dtype=np.int32)
        height, width = pixels.shape[:2]
        objects = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        background = np.ones((height, width), bool)
        for annotation in objects:
            x, y, w, h = (int(v) for v in annotation["bbox"])
            background[max(0, y - 3):y + h + 3, max(0, x - 3):x + w + 3] = False
        background_colour = np.median(pixels[background], axis=0)
        for annotation in objects:
            x, y, w, h = (int(v) for v in annotation["bbox"])
            window = (slice(max(0, y - 2), y + h + 2), slice(max(0, x - 2), x + w + 2))
            rle = mask_utils.merge(mask_utils.frPyObjects(annotation["segmentation"], height, width))
            polygon = mask_utils.decode(rle)[window].astype(bool)
            region = pixels[window]
            colour = np.median(region[polygon], axis=0)
            drawn = np.abs(region - colour).sum(-1) < np.abs(region - background_colour).sum(-1)
            iou = (drawn & polygon).sum() / (drawn | polygon).sum()
            assert iou > 0.9, (style, annotation["id"], iou)


def test_an_image_of_another_size_than_its_annotation_says_is_a_one_line_error(shapes_dir, tmp_path):
    """Masks are drawn at the annotation file's size: an image of another size would misplace them."""
    def resize(data):
        data["images"][0]["width"] += 1

    dataset = InstanceDataset(edited_copy(shapes_dir, tmp_path / "resized", resize), "train2017")
    with pytest.raises(DatasetError, match="but instances_train2017.json says") as error:
        dataset[0]
    assert "\n" not in str(error.value)
