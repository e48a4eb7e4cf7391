"""Distributed training with torchrun: 2 gloo processes on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch

WORKER = Path(__file__).parent / "ddp_worker.py"


def torchrun(*args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(WORKER), *map(str, args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_stay_identical_and_resume(shapes_dir, tmp_path):
    save = tmp_path / "run"
    torchrun(shapes_dir, tmp_path / "first.json", save, 1)
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["world_size"] == 2
    assert first["checksums"][0] == first["checksums"][1]
    # 24 images, batch 4 per process, 2 processes: 3 iterations per epoch
    assert first["iterations"] == 3
    start = json.loads((save / "metrics.jsonl").read_text().splitlines()[0])
    assert start["lr"] == pytest.approx(0.02 * 2 * 4 / 32)  # scaled by world size and batch/32
    assert sorted(p.name for p in save.glob("*.pt")) == ["epoch_0.pt"]  # only rank 0 writes

    torchrun(shapes_dir, tmp_path / "second.json", save, 2, save / "epoch_0.pt")
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["checksums"][0] == second["checksums"][1]
    assert second["iterations"] == 6
    resumed = torch.load(save / "epoch_1.pt", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["iteration"] == 6
