"""`ssd-train fit` guarding a run: resuming with other settings is refused (unless asked for), a run
whose loss stops being finite is stopped with the last good checkpoint intact, and checkpoints that
record no settings (NVIDIA's, ours from before) still resume."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from click.testing import CliRunner

from ssd_train.checkpoint import save_checkpoint
from ssd_train.cli import cli
from ssd_train.data.shapes import make_shapes_dataset


def fit(data, save, *args):
    options = ["--data", data, "--save", save, "--bs", 4, "--ebs", 2, "--backbone", "resnet18",
               "--no-pretrained-backbone", "--evaluation", "", "--data-backend", "pytorch", "-j", 0, *args]
    return CliRunner().invoke(cli, ["fit", *map(str, options)])


def error_line(result) -> str:
    """The one error line (the output also holds progress bars), without a traceback."""
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory):
    """A dataset of 12 images (3 steps per epoch) and the checkpoint of a good first epoch on it."""
    root = tmp_path_factory.mktemp("guards")
    data = make_shapes_dataset(root / "data", train=12, val=2, seed=0)
    result = fit(data, root / "run", "--epochs", 1, "--lr", 0.02)
    assert result.exit_code == 0, result.output
    return data, root / "run" / "epoch_0.pt"


@pytest.mark.slow
def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(first_epoch, tmp_path, caplog):
    """A learning rate of 1e30 (a real way to get NaN): the first step's update is absurd, the next
    losses are not finite; two in a row stop the run inside epoch 1, before anything is saved."""
    data, good = first_epoch
    save = tmp_path / "run"
    save.mkdir()
    checkpoint = shutil.copy(good, save / "epoch_0.pt")
    before = checkpoint.read_bytes()
    diverging = ["--checkpoint", checkpoint, "--epochs", 3, "--lr", 1e30, "--max-nonfinite-steps", 2]

    refused = error_line(fit(data, save, *diverging))
    assert "learning rate 0.02 (now 1e+30)" in refused and "--resume-anyway" in refused

    with caplog.at_level(logging.WARNING):
        stopped = error_line(fit(data, save, *diverging, "--resume-anyway"))
    assert stopped.startswith("Error: training stopped: the loss was not finite for 2 steps in a row, "
                              "since epoch 1, iteration 5;")
    assert f"nothing was saved after {checkpoint}" in stopped
    skipped = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert skipped == ["epoch 1, iteration 5: the loss is not finite, step skipped (1 in a row)",
                       "epoch 1, iteration 6: the loss is not finite, step skipped (2 in a row)"]
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in save.glob("*.pt")) == ["epoch_0.pt"]


@pytest.mark.slow
def test_checkpoint_without_settings_still_resumes(first_epoch, tmp_path, caplog):
    data, good = first_epoch
    state = torch.load(good, weights_only=True)
    del state["settings"], state["random"]  # as written before they were recorded
    old = save_checkpoint(tmp_path / "old.pt", state)
    with caplog.at_level(logging.WARNING):
        result = fit(data, tmp_path / "run", "--checkpoint", old, "--epochs", 2, "--bs", 2, "--lr", 0.01)
    assert result.exit_code == 0, result.output
    assert any("old.pt does not record its run's settings" in r.getMessage() for r in caplog.records)
    resumed = torch.load(tmp_path / "run" / "epoch_1.pt", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["iteration"] == 3 + 6  # epoch 1 at batch 2: 6 steps
