"""`ssd-train export`: a checkpoint -> the weights of a Triton model repository, for the detector the
checkpoint holds (`ssd_train.models.ssd300.export`, `ssd_train.models.maskrcnn.export`). The steps they
share live here:
- a repository without our configs first gets them (and the python/DALI model code) copied from the
  package's `model_repository/`, so any empty directory can be exported into and served;
- every file is written atomically (temp file beside it + rename), after its verification;
- `manifest.json`, last: the SHA-256 of each file the export wrote, so `ssd-serve` can refuse a mixed
  or stale set (`ssd_train.serving.manifest`). One repository holds both detectors: exporting one keeps
  the other's entries.
"""

from __future__ import annotations

import io as bytes_io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ssd_common import io
from ssd_train.serving.manifest import ARTIFACTS, MANIFEST_FILE, write_manifest
from ssd_train.serving.served_repository import PACKAGE_REPOSITORY

log = logging.getLogger(__name__)

# Files of the package repository that export produces or that are build leftovers.
_ARTIFACTS = shutil.ignore_patterns(*ARTIFACTS, io.DALI_FILE, MANIFEST_FILE, "__pycache__", "*.pyc", "*.tmp")


class ExportError(ValueError):
    """The checkpoint cannot be exported, or an exported model disagrees with the eager one."""


def export_model_repository(
    checkpoint: str | Path,
    repository: str | Path,
    precisions: Sequence[str] = ("fp32", "fp16"),
    onnx: bool = False,
    backbone: str | None = None,
    score_threshold: float | None = None,
    detections_per_image: int | None = None,
) -> list[Path]:
    """Export `checkpoint` (SSD300 or Mask R-CNN, as it records) into the model repository `repository`;
    returns the files written. `score_threshold` and `detections_per_image` set what the served Mask R-CNN
    keeps (its checkpoint's by default)."""
    from ssd_train.checkpoint import CheckpointError, detector_of

    try:
        detector = detector_of(checkpoint)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    if detector == "maskrcnn":
        from ssd_train.models.maskrcnn.export import export_repository

        if backbone is not None:
            raise ExportError("--backbone is an option of SSD300 checkpoints: a Mask R-CNN checkpoint records its own")
        return export_repository(checkpoint, repository, precisions, onnx=onnx, score_threshold=score_threshold,
                                 detections_per_image=detections_per_image)
    if score_threshold is not None or detections_per_image is not None:
        raise ExportError("--score-threshold and --detections-per-image are options of Mask R-CNN exports: the "
                          "served SSD300 keeps NVIDIA's 0.05 and 200 (filter the scores on the client)")
    from ssd_train.models.ssd300.export import export_repository

    return export_repository(checkpoint, repository, precisions, onnx=onnx, backbone=backbone)


def write_export_manifest(repository: Path, detector: str, models: Sequence[str], written: list[Path],
                          **details) -> Path:
    """The manifest of `repository` after `detector`'s export wrote `written` into its `models`: this
    export's artifacts replace whatever the manifest listed for those models; another detector's
    entries are kept as they were."""
    from ssd_train.serving.manifest import ManifestError, read_manifest

    try:
        previous = read_manifest(repository)
    except ManifestError:
        previous = {"files": {}}
    kept = {rel: entry for rel, entry in previous["files"].items() if rel.split("/")[0] not in models}
    exports = {name: value for name, value in previous.get("exports", {}).items() if name != detector}
    artifacts = [path for path in written if path.name in ARTIFACTS]
    return write_manifest(repository, artifacts, kept=kept, exports={**exports, detector: details})


# ----------------------------------------------------------------------------------------------
# Repository layout


def install_configs(repository: Path, models: Sequence[str] = io.MODELS,
                    source: Path = PACKAGE_REPOSITORY) -> list[Path]:
    """Give `repository` each model's config and code from `source` where it has none (existing
    files are kept: they may be tuned), and a version folder `1/` per model."""
    written = []
    try:
        same = repository.exists() and repository.resolve() == source.resolve()
    except OSError:
        same = False
    for name in models:
        target = repository / name
        if not same and not (target / "config.pbtxt").is_file():
            if not (source / name / "config.pbtxt").is_file():
                raise ExportError(
                    f"{target} has no config.pbtxt and the package's model repository ({source}) is "
                    "not available: export into a copy of the project's model_repository"
                )
            written += _copy_missing(source / name, target)
        try:
            (target / "1").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ExportError(f"cannot create {target / '1'}: {err.strerror}") from None
    return written


def _copy_missing(source: Path, target: Path) -> list[Path]:
    copied = []

    def copy_if_missing(src, dst):
        dst = Path(dst)
        if not dst.exists():
            with temp_path(dst) as tmp:
                shutil.copy2(src, tmp)
                os.replace(tmp, dst)
            copied.append(dst)
        return dst

    try:
        shutil.copytree(source, target, ignore=_ARTIFACTS, copy_function=copy_if_missing, dirs_exist_ok=True)
    except (OSError, shutil.Error) as err:
        raise ExportError(f"cannot copy the model configs to {target}: {err}") from None
    return copied


# ----------------------------------------------------------------------------------------------
# Verification input


def sample_images() -> list[bytes]:
    """Two JPEG photos of different sizes and aspect ratios with smooth and sharp content: what the
    verification feeds through the real preprocessing (no data files needed)."""
    from PIL import Image, ImageDraw

    images = []
    for height, width, seed in ((480, 640, 0), (375, 260, 1)):
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 17.0 + y / 23.0)], axis=-1)
        image = Image.fromarray((255 * base).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
            x1, y1 = x0 + rng.integers(20, width // 2), y0 + rng.integers(20, height // 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
        buffer = bytes_io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


# ----------------------------------------------------------------------------------------------
# Files


def label_map_json(label_map) -> bytes:
    return (json.dumps(label_map.to_json(), indent=1) + "\n").encode()


@contextmanager
def temp_path(path: Path):
    """A temp file beside `path` (same filesystem, so the final rename is atomic); removed unless
    the caller moved it into place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise ExportError(f"cannot write to {path.parent}: {err.strerror}") from None
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    with temp_path(path) as tmp:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


@contextmanager
def quiet_torch():
    """Tracing and the legacy ONNX exporter warn about their own deprecation and about shape
    arithmetic they record (the batch size stays dynamic: verification runs another one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        yield


def first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
