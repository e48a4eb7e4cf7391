"""What every detector's evaluation, prediction and benchmarks share: mixed precision and the
contiguous label -> dataset category id lookup."""

from __future__ import annotations

import contextlib

import torch

from ssd_common.labels import LabelMap


def autocast(device: torch.device | str, enabled: bool):
    """Mixed precision: fp16 on CUDA, bf16 on CPU; a no-op when disabled."""
    device_type = torch.device(device).type
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    return torch.autocast(device_type, dtype=dtype)


def category_lookup(label_map: LabelMap, device) -> torch.Tensor:
    """Tensor mapping contiguous labels to dataset category ids (index 0, background/padding -> 0)."""
    return torch.tensor([0, *label_map.category_ids()], dtype=torch.int64, device=device)
