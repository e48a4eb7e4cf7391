"""Checkpoints: atomic writes, safe loading, clear errors, and exact resume of a training run."""

import json

import pytest
import torch

from ssd_train.checkpoint import CheckpointError, load_checkpoint, load_for_inference, save_checkpoint
from ssd_train.train import FitConfig, fit


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
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def test_other_architecture_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="do not fit the model.*backbone resnet50"):
        load_for_inference(tiny_checkpoint, backbone="resnet50")


def test_records_architecture_and_labels(tiny_checkpoint):
    model, label_map, info = load_for_inference(tiny_checkpoint)
    assert info["backbone"] == "resnet18"
    assert [name for _, name in label_map.categories] == ["circle", "rectangle", "triangle"]
    assert model.label_num == 4


def _config(shapes_dir, save, **overrides):
    options = dict(data=shapes_dir, save=save, epochs=2, batch_size=4, eval_batch_size=8, learning_rate=0.02,
                   multistep=(1,), warmup=3, evaluation=(), backbone="resnet18", pretrained_backbone=False,
                   num_workers=0, data_backend="pytorch", channels_last=False, progress=False)
    options.update(overrides)
    return FitConfig(**options)


@pytest.mark.slow
def test_resume_continues_exactly(shapes_dir, tmp_path):
    """Two epochs in one go == one epoch, a crash, then a resume from epoch_0.pt."""
    straight = tmp_path / "straight"
    fit(_config(shapes_dir, straight))
    first = tmp_path / "resumed"
    fit(_config(shapes_dir, first, epochs=1))
    fit(_config(shapes_dir, first, checkpoint=first / "epoch_0.pt"))

    a, b = load_checkpoint(straight / "epoch_1.pt"), load_checkpoint(first / "epoch_1.pt")
    assert a["iteration"] == b["iteration"] == 12 and a["epoch"] == b["epoch"] == 2
    assert a["scheduler"] == b["scheduler"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(state_a["momentum_buffer"], state_b["momentum_buffer"])
    events = [json.loads(line)["event"] for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 2 and "eval" in events  # the last epoch is always evaluated
