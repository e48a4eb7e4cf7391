"""SSD300 checkpoints: which backbone a checkpoint holds and the model it describes (NVIDIA's
checkpoints record neither backbone nor format: they load as ResNet-50 unless told otherwise)."""

from __future__ import annotations

import warnings
from pathlib import Path

from ssd_common.labels import LabelMap
from ssd_train.checkpoint import CheckpointError, checkpoint_label_map, load_checkpoint, load_model_weights
from ssd_train.models.ssd300.model import BACKBONES, SSD300, build_model

DEFAULT_BACKBONE = "resnet50"


def checkpoint_backbone(state: dict, override: str | None = None) -> str:
    if override is not None:
        return override
    backbone = state.get("backbone")
    if backbone is None:
        return DEFAULT_BACKBONE
    if backbone not in BACKBONES:
        raise CheckpointError(f"checkpoint names an unknown backbone {backbone!r}")
    return backbone


def model_from_state(state: dict, backbone: str | None = None, path: str | Path = "checkpoint"
                     ) -> tuple[SSD300, LabelMap, str]:
    """Build the SSD300 a checkpoint describes and load its weights (strictly)."""
    label_map = checkpoint_label_map(state)
    backbone = checkpoint_backbone(state, backbone)
    model = build_model(backbone, num_classes=label_map.num_classes)
    load_model_weights(model, state["model"], f"{path} (backbone {backbone}, {label_map.num_classes} classes)")
    return model, label_map, backbone


def load_for_inference(path: str | Path, backbone: str | None = None, map_location="cpu"
                       ) -> tuple[SSD300, LabelMap, dict]:
    """The eval-mode model of a checkpoint, its label map and {backbone, epoch, format}."""
    state = load_checkpoint(path, map_location)
    if "backbone" not in state and backbone is None:
        warnings.warn(f"{path} does not record its backbone: assuming {DEFAULT_BACKBONE} (pass --backbone)",
                      stacklevel=2)
    model, label_map, backbone = model_from_state(state, backbone, path)
    info = {"backbone": backbone, "epoch": state.get("epoch"), "format": state.get("format", "nvidia")}
    return model.eval(), label_map, info
