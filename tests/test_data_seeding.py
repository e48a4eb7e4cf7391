"""The PyTorch training loader's data is a function of (seed, epoch) alone: an epoch reads the same
whatever came before it and however many worker processes load it -- what an exact resume needs."""

import pytest
import torch

from ssd_train.data.loaders import build_train_loader
from ssd_train.data.shapes import make_shapes_dataset


def epoch_batches(loader, epoch: int) -> list[torch.Tensor]:
    loader.set_epoch(epoch)
    return [torch.cat(parts) for parts in zip(*loader)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), train=8, val=0, seed=2)


def test_an_epoch_does_not_depend_on_the_epochs_before_or_on_workers(data):
    def loader(num_workers):
        return build_train_loader("pytorch", data, batch_size=4, seed=5, num_workers=num_workers)

    persistent = loader(2)
    first = epoch_batches(persistent, 0)
    after_epoch_0 = epoch_batches(persistent, 1)  # the same two worker processes, one epoch later
    fresh = epoch_batches(loader(2), 1)  # a resumed run's new workers
    in_process = epoch_batches(loader(0), 1)
    for a, b, c in zip(after_epoch_0, fresh, in_process):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(first[0], after_epoch_0[0])  # shuffle and augmentation do change per epoch


def test_loading_leaves_the_global_generator_alone(data):
    """The run's own random state (saved in checkpoints) is not drawn from by the loader."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    epoch_batches(build_train_loader("pytorch", data, batch_size=4, seed=5, num_workers=0), 0)
    assert torch.equal(torch.rand(3), expected)
