"""Per-sample seeding of random augmentation, shared by every detector's PyTorch data path."""

from __future__ import annotations

import numpy as np
import torch


class SeededSamples(torch.utils.data.Dataset):
    """Samples whose random augmentation is seeded from (seed, epoch, index): the same in whichever
    worker process loads them, with any number of workers, so a run resumed at an epoch boundary
    sees the data of an uninterrupted one. DataLoader's own seeding is once per worker process, and
    persistent workers carry their random state from epoch to epoch: a resumed run's fresh workers
    augmented differently. (The transforms draw from torch's generator only.)"""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):  # leaves the caller's generator alone (num_workers=0)
            torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))
            return self.dataset[index]
