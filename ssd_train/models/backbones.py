"""What the detectors' ResNet backbones share: loading a torchvision ResNet state dict, and its error."""

from __future__ import annotations

from pathlib import Path

import torch

from ssd_train.checkpoint import unreadable_reason


class BackboneError(ValueError):
    """The backbone is unknown or its weights cannot be loaded (the message is one line)."""


def load_resnet_weights(resnet: torch.nn.Module, path: str, name: str = "ResNet") -> None:
    """A torchvision ResNet state dict (its `fc` may be left out: detection does not use it) into `resnet`,
    a torchvision `name` (resnet50, ...)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BackboneError(f"backbone weights not found: {path}") from None
    except Exception as err:  # pickle/zip errors of a bad file
        raise BackboneError(f"cannot read backbone weights {path}: {unreadable_reason(Path(path), err)}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    what = f"{path} is not a torchvision {name} state dict"
    if not isinstance(state, dict):
        raise BackboneError(f"{what}: it holds a {type(state).__name__}")
    try:
        missing, unexpected = resnet.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise BackboneError(f"{what}: {first_line(err)}") from None
    missing = [key for key in missing if not key.startswith("fc.")]
    if missing or unexpected:
        keys = (missing or unexpected)[:3]
        raise BackboneError(f"{what}: {'missing' if missing else 'unexpected'} keys {', '.join(keys)}"
                            f"{', ...' if len(missing or unexpected) > 3 else ''}")


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
