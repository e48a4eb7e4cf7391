"""What every detector's training loop shares: the process group and device, math modes, AMP loss
scaling, the guard against non-finite losses and weights, the resume check, metrics as JSON lines.
The loops themselves are the detectors' (ssd_train.models.ssd300.train: by epochs;
ssd_train.models.maskrcnn.train: by iterations)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from ssd_train import checkpoint as ckpt

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that cannot go on (its loss or weights stopped being finite), or cannot start."""


def check_resumable(resume: dict | None, path, detector: str, save: Path, checkpoints: str, how_to_resume: str):
    """Before a run starts: a checkpoint to resume must be this detector's, and a new run must not go into a
    folder holding another run's checkpoints (it would overwrite them one by one; `checkpoints`: their glob)."""
    if resume is not None:
        found = ckpt.checkpoint_detector(resume)
        if found != detector:
            raise ckpt.CheckpointError(f"{path} holds a {found} checkpoint: resume it with --model {found}")
        return
    existing = sorted(save.glob(checkpoints), key=lambda p: p.stat().st_mtime) if save.is_dir() else []
    if existing:
        raise TrainingError(f"{save} already holds a run's checkpoints (the newest: {existing[-1].name}): "
                            f"{how_to_resume}, or give another --save")


def run_settings(cfg, world_size: int, train_images: int, iterations_per_epoch: int) -> dict:
    """The run's settings (the fields of its config dataclass) and dataset size in plain JSON types
    (what a checkpoint records)."""
    def plain(value):
        return str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value

    settings = {f.name: plain(getattr(cfg, f.name)) for f in fields(cfg)}
    return {**settings, "world_size": world_size, "train_images": train_images,
            "iterations_per_epoch": iterations_per_epoch}


def check_resume(saved: dict | None, current: dict, path, anyway: bool, checked: dict) -> None:
    """Refuse (or with `anyway`, warn) when `current` settings differ from the checkpoint's run's in
    one of `checked` (setting -> name: the detector's list of what a resumed run must keep)."""
    if saved is None:
        log.warning("%s does not record its run's settings (an NVIDIA checkpoint, or one of ours from before "
                    "they were recorded): resuming without checking them", path)
        return
    changes = "; ".join(f"{name} {saved[key]} (now {current[key]})" for key, name in checked.items()
                        if key in saved and saved[key] != current[key])
    if changes and not anyway:
        raise ckpt.CheckpointError(f"{path} comes from a run with other settings: {changes}; resume with that run's "
                                   "settings, or pass --resume-anyway to go on with these")
    if changes:
        log.warning("resuming %s with changed settings: %s", path, changes)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> Distributed:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Distributed(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(requested: str | None, local_rank: int = 0) -> str:
    """The requested device; plain `cuda` (or none, where CUDA is) is this process's GPU: its local rank."""
    if requested and requested != "cuda":
        return requested
    if requested == "cuda" or torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return "cpu"


def set_math_modes(tf32: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True


def make_grad_scaler(device: str, amp: bool):
    """Loss scaling for fp16 autocast on CUDA (bf16 on CPU needs none)."""
    enabled = amp and device.startswith("cuda")
    return torch.amp.GradScaler("cuda", enabled=enabled) if enabled else None


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (they must all skip a step, or none)."""
    finite = torch.isfinite(loss).float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


class NonFiniteGuard:
    """Keeps count of the steps skipped for a non-finite loss and stops the run after `limit` in a
    row. A skipped forward pass has already moved BatchNorm's running statistics, maybe to inf or
    NaN: they go back to those of the last good step. `last_checkpoint`: for the error message."""

    def __init__(self, model: torch.nn.Module, limit: int, last_checkpoint: Path | None):
        self.limit, self.in_a_row, self.skipped = limit, 0, 0
        self.since = ""  # where the current run of non-finite losses began
        self.last_checkpoint = last_checkpoint
        self.buffers = list(model.buffers())
        self.saved = [b.clone() for b in self.buffers]

    def good_step(self) -> None:
        torch._foreach_copy_(self.saved, self.buffers)
        self.in_a_row = 0

    def bad_step(self, epoch: int, iteration: int) -> None:
        torch._foreach_copy_(self.buffers, self.saved)
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row == 1:
            self.since = f"epoch {epoch}, iteration {iteration}"
        log.warning("epoch %d, iteration %d: the loss is not finite, step skipped (%d in a row)",
                    epoch, iteration, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise TrainingError(f"training stopped: the loss was not finite for {self.in_a_row} steps in a row, "
                                f"since {self.since}; {self._advice()}")

    def check_weights(self, model: torch.nn.Module, epoch: int) -> None:
        """Never save weights that are not finite (a finite loss can still have non-finite gradients)."""
        if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
            raise TrainingError(f"training stopped after epoch {epoch}: the weights are no longer finite and were "
                                f"not saved; {self._advice()}")

    def _advice(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written. Lower the learning rate or lengthen the warmup"
        return (f"nothing was saved after {self.last_checkpoint}. Resume from it (or an earlier checkpoint) with "
                "a lower learning rate and --resume-anyway")


class MetricsLog:
    """Metrics as JSON lines (`SAVE/metrics.jsonl`), written by rank 0 only."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", buffering=1) if path is not None else None

    def write(self, event: str, **values) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"event": event, "time": round(time.time(), 3), **values}) + "\n")
        log.debug("%s %s", event, values)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ckpt.CheckpointError(f"cannot write checkpoints to {directory}: {err.strerror}") from None
