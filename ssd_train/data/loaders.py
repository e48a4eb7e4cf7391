"""Data loaders of both backends, with one interface.

Training loaders yield (images (N, 3, 300, 300) float32, target_offsets (N, 8732, 4) float32,
target_labels (N, 8732) int64); evaluation loaders yield (images, sizes (N, 2) int32 (height, width),
image_ids (N,) int64) over every image of the split. Both have `len()` = batches per epoch. Training
loaders also have `set_epoch(e)` -- with this module's backend the data of an epoch is a function
of (seed, epoch), so a resumed run sees the batches of an uninterrupted one (DALI's: see its
DaliLoader) -- and `annotations` (ssd_train.data.annotations.SplitBoxes: the images and boxes
trained on, and the boxes dropped). `backend="dali"` is ssd_train.data.dali;
`backend="pytorch"` is defined here.
"""

from __future__ import annotations


import torch
from torch.utils.data import DataLoader, DistributedSampler

from ssd_common.labels import LabelMap
from ssd_train.data import default_workers
from ssd_train.data.annotations import SplitBoxes, check_enough_images
from ssd_train.data.coco import CocoDetection, CocoImages
from ssd_train.data.seeding import SeededSamples
from ssd_train.models.ssd300.transforms import TrainTransform, to_model_input

BACKENDS = ("dali", "pytorch")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def default_backend() -> str:
    return "dali" if dali_available() else "pytorch"


class _EpochSampler(DistributedSampler):
    """A DistributedSampler (also for one process: it makes the order a function of seed and epoch)
    whose indices come with their epoch, for SeededSamples."""

    def __iter__(self):
        return ((self.epoch, index) for index in super().__iter__())


class _EpochLoader:
    """A DataLoader over SeededSamples in _EpochSampler's order, with `set_epoch`."""

    def __init__(self, loader: DataLoader, sampler: _EpochSampler, annotations: SplitBoxes):
        self.loader, self.sampler, self.annotations = loader, sampler, annotations

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def build_train_loader(backend: str, data_dir, split: str = "train2017", batch_size: int = 32,
                       label_map: LabelMap | None = None, seed: int = 0, shard_id: int = 0, num_shards: int = 1,
                       device: str = "cpu", num_workers: int | None = None, augment: bool = True,
                       shuffle: bool | None = None):
    """`augment=False` turns the random augmentations off and, unless `shuffle` says otherwise, shuffling."""
    num_workers = default_workers() if num_workers is None else num_workers
    shuffle = augment if shuffle is None else shuffle
    if backend == "dali":
        from ssd_train.data import dali

        return dali.build_train_loader(data_dir, split, batch_size, label_map=label_map, seed=seed,
                                       shard_id=shard_id, num_shards=num_shards, device=_dali_device(device),
                                       num_threads=max(1, num_workers), augment=augment, shuffle=shuffle)
    _check_backend(backend)
    dataset = CocoDetection(data_dir, split, TrainTransform(augment), label_map, skip_empty=True)
    check_enough_images(split, len(dataset), batch_size, num_shards)
    sampler = _EpochSampler(dataset, num_shards, shard_id, shuffle=shuffle, seed=seed, drop_last=True)
    # The loader's own generator: drawing its worker seeds leaves the global one (the run's) alone.
    loader = DataLoader(SeededSamples(dataset, seed), batch_size, sampler=sampler, num_workers=num_workers,
                        drop_last=True, pin_memory=device != "cpu", persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    return _EpochLoader(loader, sampler, dataset.annotations)


def build_eval_loader(backend: str, data_dir, split: str = "val2017", batch_size: int = 32,
                      label_map: LabelMap | None = None, shard_id: int = 0, num_shards: int = 1,
                      device: str = "cpu", num_workers: int | None = None):
    """Evaluation batches and the split's `label_map` (checked against `label_map` when given)."""
    num_workers = default_workers() if num_workers is None else num_workers
    images = CocoImages(data_dir, split, to_model_input, label_map)  # validates layout and labels
    if backend == "dali":
        from ssd_train.data import dali

        loader = dali.build_eval_loader(data_dir, split, batch_size, device=_dali_device(device),
                                        num_threads=max(1, num_workers), shard_id=shard_id,
                                        num_shards=num_shards)
        return loader, images.label_map
    _check_backend(backend)
    indices = list(range(shard_id, len(images), num_shards))
    # Its own generator: drawing worker seeds from the global one would move the run's random state.
    loader = DataLoader(torch.utils.data.Subset(images, indices), batch_size, num_workers=num_workers,
                        collate_fn=_collate_eval, generator=torch.Generator())
    return loader, images.label_map


def _collate_eval(samples):
    images, sizes, ids = zip(*samples)
    return torch.stack(images), torch.stack(sizes), torch.tensor(ids, dtype=torch.int64)


def _dali_device(device: str) -> str:
    return "gpu" if str(device).startswith("cuda") else "cpu"


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown data backend {backend!r}; choose one of {', '.join(BACKENDS)}")
