"""Checkpoints: atomic save, safe (`weights_only`) load, and NVIDIA DeepLearningExamples compatibility.

Format (NVIDIA's keys plus ours): {epoch, iteration, optimizer, scheduler, label_map, model} where
`label_map` is NVIDIA's {label: name}; we add `detector`, `categories` (label order, with dataset ids), `backbone`,
`scaler` (AMP), `settings` (the run's settings and dataset size, which a resumed run is checked
against), `random` (the random number generators' states) and `format`. NVIDIA checkpoints, and ours
from before, lack some of the additions: they load as ResNet-50 with the COCO label map unless told
otherwise, and resume without the checks.
"""

from __future__ import annotations

import logging
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from ssd_common.labels import LabelMap, LabelMapError
from ssd_train.files import atomic_write

log = logging.getLogger(__name__)

FORMAT = "ssd300-triton/1"
DETECTORS = ("ssd300", "maskrcnn")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write `state` to `path` atomically: a crash leaves the previous file (or none), never half of one."""
    path = Path(path)
    try:
        with atomic_write(path) as f:
            torch.save({"format": FORMAT, **state}, f)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint to {path.parent}: {err.strerror}") from None
    return path


def training_state(*, epoch: int, iteration: int, model, optimizer, scheduler, scaler, label_map: LabelMap,
                   backbone: str, settings: dict, detector: str = "ssd300", **extra) -> dict:
    """What a training checkpoint holds; `epoch` = number of finished epochs, `settings` the run's
    (plain JSON types: `weights_only` loading takes nothing else); `extra`: what the detector adds."""
    return {
        "epoch": epoch,
        "iteration": iteration,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "label_map": label_map.to_nvidia(),
        "categories": label_map.to_json(),
        "backbone": backbone,
        "settings": settings,
        "random": random_states(),
        "detector": detector,
        **extra,
    }


def random_states() -> dict:
    """The states of this process's random number generators (torch, its CUDA device's, numpy,
    Python) as tensors and numbers, which `weights_only` loading accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,  # the current device's
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": python_gauss},
    }


def set_random_states(states: dict) -> None:
    """Undo `random_states()` (the CUDA state goes to the current device, if there is one)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint safely. A bare state dict (no `model` key) is accepted as {"model": it}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {unreadable_reason(path, err)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint (it holds a {type(state).__name__})")
    if "model" not in state:
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} has no 'model' entry and is not a state dict")
        state = {"model": state}
    state["model"] = {k.removeprefix("module."): v for k, v in state["model"].items()}
    return state


def unreadable_reason(path: Path, err: Exception) -> str:
    """Why torch.load failed, in one line a user can act on (torch's own messages are paragraphs, or a
    bare byte value, and some advise weights_only=False: never for a file one cannot vouch for)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if not head:
        return "the file is empty"
    if head == b"PK" and not zipfile.is_zipfile(path):
        return "a damaged or truncated zip archive (torch.save's format)"
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):  # neither torch.save's zip nor a pickle
        return "not a PyTorch checkpoint (torch.save writes a zip archive)"
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err):
        return ("it holds Python objects beyond tensors and plain data, which are refused: loading them "
                "would run code from the file")
    text = str(err).strip().split(". ")[0].splitlines()
    return text[0] if text else type(err).__name__


def checkpoint_label_map(state: dict) -> LabelMap:
    try:
        if state.get("categories"):
            return LabelMap.from_json(state["categories"])
        if state.get("label_map"):
            return LabelMap.from_nvidia(state["label_map"])
    except LabelMapError as err:
        raise CheckpointError(f"checkpoint label map: {err}") from None
    return LabelMap.coco()


def load_model_weights(model: torch.nn.Module, weights: dict, what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        details = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                details.append(f"{len(keys)} {name} (e.g. {keys[0]})")
        raise CheckpointError(f"weights do not fit the model of {what}: {', '.join(details)}")
    model.load_state_dict(weights)


def checkpoint_detector(state: dict) -> str:
    """Which detector a checkpoint holds (`detector`; NVIDIA's SSD checkpoints and ours from before
    it was recorded are SSD300's)."""
    detector = state.get("detector", "ssd300")
    if detector not in DETECTORS:
        raise CheckpointError(f"checkpoint holds an unknown detector {detector!r} (known: {', '.join(DETECTORS)})")
    return detector


def detector_of(path: str | Path) -> str:
    """The detector a checkpoint file holds, read without loading its tensors (memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        state = load_checkpoint(path)  # not a zip-format file: read it whole (and report why it fails)
    return checkpoint_detector(state) if isinstance(state, dict) else "ssd300"
