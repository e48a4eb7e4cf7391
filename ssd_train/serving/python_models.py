"""What the python-backend models of both ensembles share: the device their instance runs on and the
label map `ssd-train export` wrote into their version folder. `args` is the dict Triton passes to
`initialize`."""

from __future__ import annotations

from pathlib import Path

import torch

from ssd_common import io
from ssd_common.labels import LabelMap


def instance_device(args: dict) -> torch.device:
    """The instance's GPU when its group is KIND_GPU and CUDA works here, else the CPU."""
    gpu = args["model_instance_kind"] == "GPU" and torch.cuda.is_available()
    return torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")


def exported_labels(args: dict) -> LabelMap:
    # model_repository is this model's folder; export writes the label map into the version.
    return LabelMap.load(Path(args["model_repository"]) / args["model_version"] / io.LABELS_FILE)
