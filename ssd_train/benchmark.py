"""What every detector's benchmark shares: timing iterations on a device."""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(step, warmup: int, iterations: int, device: torch.device) -> list[float]:
    """The seconds of each of `iterations` calls of `step` after `warmup` untimed ones (CUDA work
    included: the device is synchronised before each clock reading)."""
    for _ in range(warmup):
        step()
    sync(device)
    seconds = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds
