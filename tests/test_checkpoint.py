"""Checkpoints: atomic writes, safe loading, clear errors, and exact, checked resume of a training run."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd_train.checkpoint import CheckpointError, load_checkpoint, random_states, save_checkpoint, set_random_states
from ssd_train.data.shapes import make_shapes_dataset
from ssd_train.models.ssd300.checkpoint import load_for_inference
from ssd_train.models.ssd300.train import RESUME_CHECKED, FitConfig, fit
from ssd_train.train import check_resume


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "epoch_0.pt"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(2)}})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2, "model": {"w": torch.zeros(2)}})
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_0.pt"]  # no temp file left behind


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*bad.pt: not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt: the file is empty"):
        load_checkpoint(tmp_path / "empty.pt")
    torch.save({"model": {"w": torch.zeros(100)}}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cut.pt: a damaged or truncated zip archive"):
        load_checkpoint(tmp_path / "cut.pt")


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: it holds Python objects beyond tensors") as error:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only=False" not in str(error.value)  # torch's advice, wrong for a file nobody vouches for


def test_other_architecture_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="do not fit the model.*backbone resnet50"):
        load_for_inference(tiny_checkpoint, backbone="resnet50")


def test_records_architecture_and_labels(tiny_checkpoint):
    model, label_map, info = load_for_inference(tiny_checkpoint)
    assert info["backbone"] == "resnet18"
    assert [name for _, name in label_map.categories] == ["circle", "rectangle", "triangle"]
    assert model.label_num == 4


def test_random_states_survive_a_safe_save_and_load(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # numpy and Python cache a second gaussian: that is state too
    random.gauss(0, 1)
    save_checkpoint(tmp_path / "c.pt", {"model": {}, "random": random_states()})

    def draws():
        return torch.rand(3).tolist(), np.random.normal(size=3).tolist(), [random.gauss(0, 1) for _ in range(3)]

    expected = draws()
    set_random_states(load_checkpoint(tmp_path / "c.pt")["random"])  # weights_only loading
    assert draws() == expected


def test_resume_settings_are_checked():
    saved = {"batch_size": 4, "world_size": 1, "train_images": 24, "learning_rate": 0.02, "multistep": [1],
             "warmup": 3, "momentum": 0.9, "weight_decay": 5e-4, "seed": 0, "augment": True, "epochs": 2}
    check_resume(saved, {**saved, "epochs": 5, "save": "elsewhere"}, "run/epoch_1.pt", anyway=False,
                 checked=RESUME_CHECKED)
    changed = {**saved, "batch_size": 8, "train_images": 20, "multistep": [1, 2]}
    with pytest.raises(CheckpointError) as error:
        check_resume(saved, changed, "run/epoch_1.pt", anyway=False, checked=RESUME_CHECKED)
    message = str(error.value)
    assert "\n" not in message and "--resume-anyway" in message
    for difference in ("batch size 4 (now 8)", "training images 24 (now 20)", "multistep [1] (now [1, 2])"):
        assert difference in message


def test_resume_anyway_and_old_checkpoints_warn(caplog):
    saved = {"batch_size": 4, "seed": 0}
    with caplog.at_level(logging.WARNING):
        check_resume(saved, {"batch_size": 8, "seed": 0}, "a.pt", anyway=True, checked=RESUME_CHECKED)
        check_resume(None, {"batch_size": 8, "seed": 0}, "nvidia.pt", anyway=False, checked=RESUME_CHECKED)
    first, second = (r.getMessage() for r in caplog.records)
    assert "a.pt with changed settings: batch size 4 (now 8)" in first
    assert "nvidia.pt does not record its run's settings" in second


def test_weights_only_checkpoint_cannot_be_resumed(shapes_dir, tiny_checkpoint, tmp_path):
    cfg = FitConfig(data=shapes_dir, save=tmp_path, checkpoint=tiny_checkpoint, data_backend="pytorch")
    with pytest.raises(CheckpointError, match="holds no training state .* not resumed"):
        fit(cfg)


def fit_command(*args) -> list[str]:
    return [sys.executable, "-m", "ssd_train.cli", "fit", *map(str, args)]


def run_fit(*args) -> None:
    result = subprocess.run(fit_command(*args), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def events(run_dir: Path) -> list[dict]:
    """The complete lines of a run's metrics.jsonl (it may be being written)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch_is_exact(tmp_path):
    """`ssd-train fit` killed with SIGKILL (data-loader workers and all) in the middle of epoch 1 and
    resumed from epoch_0.pt ends exactly where an uninterrupted run does: same weights, optimizer
    state and random states. PyTorch backend with 2 persistent workers and augmentation on: the
    workers used to carry their random state from epoch to epoch, which a resumed run's fresh
    workers could not reproduce (1.07 max weight difference)."""
    data = make_shapes_dataset(tmp_path / "data", train=12, val=2, seed=0)
    common = ["--data", data, "--epochs", 2, "--bs", 4, "--ebs", 2, "--lr", 0.02, "--warmup", 2, "--multistep", 1,
              "--evaluation", "", "--backbone", "resnet18", "--no-pretrained-backbone", "--data-backend", "pytorch",
              "-j", 2, "--log-interval", 1]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_fit(*common, "--save", straight)

    process = subprocess.Popen(fit_command(*common, "--save", killed), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any(e["event"] == "train" and e["epoch"] == 1 for e in events(killed)):  # a step of epoch 1
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the process group: the data-loader workers too
        process.wait()
    assert not (killed / "epoch_1.pt").exists(), "killed too late: epoch 1 was over"
    run_fit(*common, "--save", killed, "--checkpoint", killed / "epoch_0.pt")

    a, b = load_checkpoint(straight / "epoch_1.pt"), load_checkpoint(killed / "epoch_1.pt")
    assert a["iteration"] == b["iteration"] == 6 and a["epoch"] == b["epoch"] == 2
    assert a["scheduler"] == b["scheduler"]
    assert all(a["settings"][key] == b["settings"][key] for key in RESUME_CHECKED)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(state_a["momentum_buffer"], state_b["momentum_buffer"])
    assert torch.equal(a["random"]["torch"], b["random"]["torch"])
    assert a["settings"]["train_images"] == 12 and a["settings"]["num_workers"] == 2
    starts = [e for e in events(killed) if e["event"] == "start"]
    assert [e["start_epoch"] for e in starts] == [0, 1] and starts[1]["resumed_from"].endswith("epoch_0.pt")
    assert starts[0]["train_images"] == 12 and starts[0]["dropped_boxes"] == 0
