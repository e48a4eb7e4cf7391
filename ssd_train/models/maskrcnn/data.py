"""COCO instance-segmentation data for Mask R-CNN (pure PyTorch): images with their boxes, labels and
masks; training batches grouped by aspect ratio; evaluation batches of every image of a split.

The boxes are those ssd_train.data.annotations keeps (the one box-sanitising decision, shared with
SSD); crowd regions are left out, as maskrcnn-benchmark does. Masks come from each kept annotation's
`segmentation` -- polygons, or RLE compressed or not -- decoded by pycocotools at the image size.
A kept annotation without a usable segmentation is a DatasetError before training starts.

Training data is a function of (seed, epoch): the order comes from GroupedBatchSampler, each sample's
random flip from (seed, epoch, index), so any number of workers, and a run resumed mid-epoch, see the
batches of an uninterrupted run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ssd_common.labels import LabelMap
from ssd_common.layout import CocoSplit, DatasetError, load_annotations
from ssd_common.masks import decode_mask
from ssd_train.data import default_workers
from ssd_train.data.annotations import check_enough_images, read_boxes
from ssd_train.data.coco import CocoImages, dataset_label_map, read_image
from ssd_train.data.seeding import SeededSamples


class InstanceDataset(torch.utils.data.Dataset):
    """Samples (image float32 (3, H, W) in [0, 1], target) with target {"boxes": float32 (N, 4) xyxy
    pixels, "labels": int64 (N,) contiguous, "masks": uint8 (N, H, W), "image_id": int}.

    `train`: only images with a kept object are samples; `augment` (training only) flips images, boxes
    and masks together with probability 0.5."""

    def __init__(self, root, split: str, label_map: LabelMap | None = None, train: bool = True,
                 augment: bool = True):
        coco_split = CocoSplit(Path(root), split)
        data = load_annotations(coco_split)
        self.annotation_file = coco_split.annotation_file
        self.label_map = dataset_label_map(data, label_map, self.annotation_file)
        self.annotations = read_boxes(coco_split, data, skip_empty=train)
        self.images = self.annotations.images
        self.aspect_ratios = [image["width"] / image["height"] for image in self.images]
        label_of = self.label_map.label_of()
        self._labels = {k: [label_of[c] for c in v] for k, v in self.annotations.category_ids.items()}
        for image in self.images:
            for annotation_id, segmentation in zip(self.annotations.annotation_ids.get(image["id"], []),
                                                   self.annotations.segmentations.get(image["id"], [])):
                problem = segmentation_problem(segmentation, image["height"], image["width"])
                if problem:
                    raise DatasetError(f"{self.annotation_file.name}: annotation {annotation_id} (image "
                                       f"{image['id']}) has {problem}")
        self.flip = v2.RandomHorizontalFlip(0.5) if train and augment else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        info = self.images[index]
        image_id, width, height = info["id"], info["width"], info["height"]
        path = self.annotations.image_path(info)
        pil = read_image(path)
        if pil.size != (width, height):
            raise DatasetError(f"image {path} is {pil.width}x{pil.height}, but {self.annotation_file.name} "
                               f"says {width}x{height}")
        boxes = torch.tensor(self.annotations.boxes.get(image_id, []), dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(self._labels.get(image_id, []), dtype=torch.int64)
        masks = torch.from_numpy(decode_masks(self.annotations.segmentations.get(image_id, []), height, width))
        image = F.pil_to_tensor(pil)
        if self.flip is not None:
            image, boxes, masks = self.flip(
                tv_tensors.Image(image),
                tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
                tv_tensors.Mask(masks),
            )
        target = {"boxes": boxes.as_subclass(torch.Tensor), "labels": labels,
                  "masks": masks.as_subclass(torch.Tensor), "image_id": image_id}
        return F.to_dtype(image.as_subclass(torch.Tensor), torch.float32, scale=True), target


def decode_masks(segmentations: list, height: int, width: int) -> np.ndarray:
    """COCO segmentations (checked by segmentation_problem) -> uint8 masks (N, height, width)."""
    from pycocotools import mask as mask_utils  # here, not at the top: the toolkit imports without pycocotools

    masks = np.zeros((len(segmentations), height, width), dtype=np.uint8)
    for i, segmentation in enumerate(segmentations):
        if isinstance(segmentation, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:  # compressed RLE
            rle = segmentation
        masks[i] = mask_utils.decode(rle)
    return masks


def segmentation_problem(segmentation, height: int, width: int) -> str | None:
    """What is wrong with a COCO `segmentation` for an image of that size, or None. pycocotools does
    not check: a malformed RLE decodes to garbage rather than failing."""
    if segmentation is None:
        return "no segmentation"
    if isinstance(segmentation, list):
        if not segmentation:
            return "an empty segmentation"
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                return "a malformed polygon (expected a list of at least 3 x, y pairs)"
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in polygon):
                return "a polygon with non-numeric or non-finite coordinates"
        return None
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        return "a malformed segmentation (neither polygons nor an RLE with 'counts' and 'size')"
    if segmentation["size"] != [height, width]:
        return f"an RLE of size {segmentation['size']}, not the image's [{height}, {width}]"
    try:
        decode_mask(segmentation)  # checks that the runs are whole and cover the image
    except ValueError as err:
        return str(err)
    return None


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of images of one aspect group (landscape or square: w >= h; portrait: w < h), as
    torchvision's detection references group them, so padding a batch to its largest image wastes
    little. A function of (seed, epoch): the epoch's shuffled order fills one batch per group at a
    time (a group's last, incomplete batch is dropped); the batches are dealt to the `world_size`
    ranks in turn, each rank getting as many. Yields lists of (epoch, index) keys for
    ssd_train.data.seeding.SeededSamples.

    `set_epoch(epoch, start_batch)` skips the epoch's first `start_batch` batches without loading them:
    a run resumed mid-epoch goes on with exactly the batches an uninterrupted run would have had."""

    def __init__(self, aspect_ratios, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, not {batch_size}, {rank}, {world_size}")
        self.groups = [0 if ratio >= 1 else 1 for ratio in aspect_ratios]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        full_batches = sum(self.groups.count(group) // batch_size for group in (0, 1))
        self.num_batches = full_batches // world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} is outside the epoch's {self.num_batches} batches")
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches (dataset indices) of `epoch`, in order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
        pending: dict[int, list[int]] = {0: [], 1: []}
        batches = []
        for index in order.tolist():
            group = self.groups[index]
            pending[group].append(index)
            if len(pending[group]) == self.batch_size:
                batches.append(pending[group])
                pending[group] = []
        return batches[:self.num_batches * self.world_size][self.rank::self.world_size]

    def __iter__(self):
        epoch = self.epoch
        for batch in self.epoch_batches(epoch)[self.start_batch:]:
            yield [(epoch, index) for index in batch]

    def __len__(self) -> int:
        return self.num_batches


class TrainLoader:
    """Training batches (images: tuple of (3, H, W) tensors, targets: tuple of dicts); `len()` is the
    batches of a full epoch on this rank, whatever `set_epoch`'s start_batch."""

    def __init__(self, dataset: InstanceDataset, sampler: GroupedBatchSampler, seed: int, num_workers: int):
        self.dataset, self.sampler = dataset, sampler
        self.annotations, self.label_map = dataset.annotations, dataset.label_map
        # The loader's own generator: drawing its worker seeds leaves the global one (the run's) alone.
        self.loader = DataLoader(SeededSamples(dataset, seed), batch_sampler=sampler, num_workers=num_workers,
                                 collate_fn=_collate, persistent_workers=num_workers > 0,
                                 generator=torch.Generator().manual_seed(seed))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        return iter(self.loader)


def build_train_loader(data_dir, split: str = "train2017", batch_size: int = 2, label_map: LabelMap | None = None,
                       seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int | None = None,
                       augment: bool = True) -> TrainLoader:
    dataset = InstanceDataset(data_dir, split, label_map, train=True, augment=augment)
    check_enough_images(split, len(dataset), batch_size, world_size)
    sampler = GroupedBatchSampler(dataset.aspect_ratios, batch_size, seed, rank, world_size)
    if len(sampler) == 0:
        raise DatasetError(f"{split} has no full batch of {batch_size} images of one orientation (landscape "
                           f"or portrait) for each of {world_size} processes")
    return TrainLoader(dataset, sampler, seed, default_workers() if num_workers is None else num_workers)


def build_eval_loader(data_dir, split: str = "val2017", batch_size: int = 2, label_map: LabelMap | None = None,
                      rank: int = 0, world_size: int = 1,
                      num_workers: int | None = None) -> tuple[DataLoader, LabelMap, Path]:
    """Batches (images: list of float (3, H, W) in [0, 1], image_ids: list[int]) of every image of the
    split (annotated or not; this rank's: index % world_size == rank), the split's label map (checked
    against `label_map` when given) and its annotation file."""
    images = CocoImages(data_dir, split, _to_tensor, label_map)  # validates layout, labels and image files
    shard = torch.utils.data.Subset(images, range(rank, len(images), world_size))
    # Its own generator: drawing worker seeds from the global one would move the run's random state.
    loader = DataLoader(shard, batch_size, num_workers=default_workers() if num_workers is None else num_workers,
                        collate_fn=_collate_eval, generator=torch.Generator())
    return loader, images.label_map, images.annotation_file


def _to_tensor(image) -> torch.Tensor:
    return F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)


def _collate(samples):
    return tuple(zip(*samples))


def _collate_eval(samples):
    images, _sizes, image_ids = zip(*samples)
    return list(images), list(image_ids)
