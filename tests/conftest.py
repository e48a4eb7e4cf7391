"""Shared fixtures: a small generated dataset (session-wide) and a tiny checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from ssd_train.data.shapes import make_shapes_dataset


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """A small deterministic COCO-layout dataset (24 training, 8 validation images)."""
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), train=24, val=8, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, shapes_dir) -> Path:
    """An untrained resnet18 SSD300 checkpoint for the shapes label map, in our format."""
    from ssd_common.labels import LabelMap
    from ssd_train.checkpoint import save_checkpoint
    from ssd_train.models.ssd300.model import build_model
    import json

    categories = json.loads((shapes_dir / "annotations" / "instances_val2017.json").read_text())["categories"]
    label_map = LabelMap.from_coco_categories(categories)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("resnet18", label_map.num_classes)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, {"epoch": 0, "iteration": 0, "model": model.state_dict(), "backbone": "resnet18",
                           "label_map": label_map.to_nvidia(), "categories": label_map.to_json()})
    return path


@pytest.fixture(scope="session")
def tiny_maskrcnn_checkpoint(tmp_path_factory, shapes_dir) -> Path:
    """An untrained resnet18 Mask R-CNN checkpoint for the shapes label map (min/max size 128/160), made
    decisive (`make_decisive`)."""
    import json

    from ssd_common.labels import LabelMap
    from ssd_train.checkpoint import save_checkpoint
    from ssd_train.models.maskrcnn.model import MaskRCNNSpec, build_maskrcnn, make_decisive

    categories = json.loads((shapes_dir / "annotations" / "instances_val2017.json").read_text())["categories"]
    label_map = LabelMap.from_coco_categories(categories)
    spec = MaskRCNNSpec("resnet18", label_map.num_classes, min_size=128, max_size=160, norm="batch",
                        trainable_layers=5)
    torch.manual_seed(0)
    model = make_decisive(build_maskrcnn(spec).eval())
    path = tmp_path_factory.mktemp("maskrcnn") / "tiny_maskrcnn.pt"
    save_checkpoint(path, {"epoch": 0, "iteration": 0, "model": model.state_dict(), "backbone": "resnet18",
                           "label_map": label_map.to_nvidia(), "categories": label_map.to_json(),
                           "detector": "maskrcnn", "spec": spec.to_json()})
    return path
