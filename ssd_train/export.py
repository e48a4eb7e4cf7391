"""`ssd-train export`: a checkpoint -> the weights of a Triton model repository.

Writes, each verified before it replaces anything (temp file + rename):
- `ssd300_fp32/1/model.pt` and `ssd300_fp16/1/model.pt`: traced TorchScript. Both take and return
  float32 (`io.MODEL_INPUT` -> `io.MODEL_LOCS`, `io.MODEL_SCORES`); the fp16 module casts inside.
  Each traced file is reloaded and compared with the eager fp32 model on real preprocessed images
  (synthetic photos run through the DALI preprocessing the server uses), at another batch size
  than it was traced with.
- `ssd300_postprocess/1/labels.json`: the label map (contiguous label -> dataset category id).
- `manifest.json`, last: the SHA-256 of each file above, so `ssd-serve` can refuse a mixed or stale
  set (`ssd_train.serving.manifest`).
- with `onnx=True`, `ssd300_fp32/1/model.onnx` (float32, dynamic batch, the same tensor names):
  checked by `onnx.checker` and, when onnxruntime is installed, against the TorchScript outputs.
  It sits beside the served model.pt as a hand-off artifact (TensorRT's trtexec, onnxruntime,
  other servers) rather than as a sixth served model: one served graph, nothing to keep in step.

No `model.dali` is written: the DALI backend serialises `ssd300_preprocess/1/dali.py` with its own
DALI at load time, and a pipeline serialised by a newer DALI fails to load in an older server.

A repository without our configs first gets them (and the python/DALI model code) copied from the
package's `model_repository/`, so any empty directory can be exported into and served.
"""

from __future__ import annotations

import copy
import io as bytes_io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssd_common import io
from ssd_train.serving.manifest import ARTIFACTS, MANIFEST_FILE, write_manifest
from ssd_train.serving.served_repository import PACKAGE_REPOSITORY

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
# Files of the package repository that export produces or that are build leftovers.
_ARTIFACTS = shutil.ignore_patterns(*ARTIFACTS, io.DALI_FILE, MANIFEST_FILE, "__pycache__", "*.pyc", "*.tmp")
# Largest traced-vs-eager (fp32 model) difference accepted, as a fraction of the output's range.
# fp32: a trace runs eager's kernels, only batch-size dependent kernel choices move the last bits.
# fp16: rounding moves SSD300's outputs by ~1e-3; broken traces, casts or overflow by far more.
# (fp16 is compared with the fp32 model: a second, eager fp16 run would double the verification
# time on CPUs, where half-precision convolutions are about 8x slower than fp32.)
TRACE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
ONNX_TOLERANCE = 1e-4
ONNX_OPSET = 17


class ExportError(ValueError):
    """The checkpoint cannot be exported, or an exported model disagrees with the eager one."""


class HalfPrecision(nn.Module):
    """fp16 weights and compute behind a float32 interface, so fp32 and fp16 models are drop-ins."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        locs, scores = self.model(images.half())
        return locs.float(), scores.float()


def export_model_repository(
    checkpoint: str | Path,
    repository: str | Path,
    precisions: Sequence[str] = PRECISIONS,
    onnx: bool = False,
    backbone: str | None = None,
) -> list[Path]:
    """Export `checkpoint` into the model repository `repository`; returns the files written."""
    precisions = _check_precisions(precisions)
    repository = Path(repository)
    model, label_map = _load(checkpoint, backbone)
    written = install_configs(repository)
    sample = sample_batch()
    with torch.no_grad():
        eager = onnx_reference = model(sample)
        for precision in precisions:
            path = repository / io.model_name(precision) / "1" / io.TORCHSCRIPT_FILE
            path, outputs = write_torchscript(model, precision, sample, eager, path)
            written.append(path)
            if precision == "fp32":
                onnx_reference = outputs  # ONNX is checked against the TorchScript file's outputs
        if onnx:
            path = repository / io.MODEL_FP32 / "1" / io.ONNX_FILE
            written.append(write_onnx(model, sample, onnx_reference, path))
    labels = repository / io.POSTPROCESS / "1" / io.LABELS_FILE
    written.append(_atomic_write_bytes(labels, _label_map_json(label_map)))
    # Last: the manifest makes the files above one consistent set (ssd-serve checks it).
    artifacts = [path for path in written if path.name in ARTIFACTS]
    written.append(write_manifest(repository, artifacts, checkpoint=str(checkpoint), precisions=list(precisions),
                                  classes=label_map.num_classes))
    log.info("exported %s (%d classes) to %s", ", ".join(precisions), label_map.num_classes, repository)
    return written


def _check_precisions(precisions: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(precisions))
    unknown = [p for p in chosen if p not in PRECISIONS]
    if unknown or not chosen:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, not {', '.join(unknown) or 'none'}")
    return chosen


def _load(checkpoint, backbone):
    from ssd_train.models.ssd300.checkpoint import load_for_inference

    try:
        model, label_map, _ = load_for_inference(checkpoint, backbone=backbone, map_location="cpu")
    except ValueError as err:  # CheckpointError, LabelMapError and BackboneError, all one-liners
        raise ExportError(str(err)) from None
    return model.float().eval(), label_map


# ----------------------------------------------------------------------------------------------
# Repository layout


def install_configs(repository: Path, source: Path = PACKAGE_REPOSITORY) -> list[Path]:
    """Give `repository` each model's config and code from `source` where it has none (existing
    files are kept: they may be tuned), and a version folder `1/` per model."""
    written = []
    try:
        same = repository.exists() and repository.resolve() == source.resolve()
    except OSError:
        same = False
    for name in io.MODELS:
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
            with _temp_path(dst) as tmp:
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


def sample_batch() -> torch.Tensor:
    """`sample_images()` through the project's DALI preprocessing (CPU): N x 3 x 300 x 300."""
    from ssd_train.data.dali import Preprocessor

    pixels, _ = Preprocessor(batch_size=2)(sample_images())
    return torch.from_numpy(pixels)


# ----------------------------------------------------------------------------------------------
# TorchScript


def traceable(model: nn.Module, precision: str) -> nn.Module:
    return HalfPrecision(model).eval() if precision == "fp16" else model


def write_torchscript(model: nn.Module, precision: str, sample: torch.Tensor, reference, path: Path):
    """Trace `model` at `precision` on one image, save it next to `path`, reload the file and compare
    its outputs on the whole `sample` with `reference` (the eager fp32 model's) before moving it into
    place. Returns (path, the saved model's outputs on `sample`)."""
    with _quiet_torch():
        traced = torch.jit.trace(traceable(model, precision), sample[:1], check_trace=False)
    with _temp_path(path) as tmp:
        with _quiet_torch():
            torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(tmp), map_location="cpu").eval()
        outputs = loaded(sample)
        error = _check_close(f"{io.model_name(precision)} TorchScript", "eager", outputs, reference,
                             TRACE_TOLERANCE[precision])
        os.replace(tmp, path)
    log.info("wrote %s (differs from eager fp32 by %.1e of the output range)", path, error)
    return path, outputs


def _check_close(what: str, against: str, got, expected, tolerance: float) -> float:
    """ExportError unless `got` matches `expected` within `tolerance` of its range; the largest error."""
    worst = 0.0
    for name, g, e in zip((io.MODEL_LOCS, io.MODEL_SCORES), got, expected):
        if g.shape != e.shape:
            raise ExportError(f"{what} gives {name} of shape {tuple(g.shape)}, {against} {tuple(e.shape)}")
        if not torch.isfinite(g).all():
            raise ExportError(f"{what} gives non-finite {name} on the sample images (fp16 overflow?); "
                              "nothing was written")
        error = ((g.float() - e.float()).abs().max() / e.abs().max().clamp(min=1e-6)).item()
        if error > tolerance:
            raise ExportError(
                f"{what} disagrees with {against} on the sample images: {name} differs by "
                f"{error:.1e} of its range (tolerance {tolerance:.0e}); nothing was written"
            )
        worst = max(worst, error)
    return worst


# ----------------------------------------------------------------------------------------------
# ONNX


def write_onnx(model: nn.Module, sample: torch.Tensor, reference, path: Path) -> Path:
    """float32 ONNX with a dynamic batch axis, checked by onnx.checker and (when installed)
    onnxruntime against `reference` (the TorchScript/eager outputs on `sample`)."""
    import onnx

    names = (io.MODEL_INPUT, io.MODEL_LOCS, io.MODEL_SCORES)
    with _temp_path(path) as tmp:
        try:
            with _quiet_torch():
                torch.onnx.export(
                    model, (sample[:1],), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                    input_names=[names[0]], output_names=list(names[1:]),
                    dynamic_axes={name: {0: "batch"} for name in names},
                )
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as err:  # exporter and checker raise many types; the first line says it
            raise ExportError(f"ONNX export failed: {_first_line(err)}") from None
        outputs = _onnxruntime_outputs(tmp, sample)
        if outputs is not None:
            _check_close("the ONNX model (onnxruntime)", "TorchScript", outputs, reference, ONNX_TOLERANCE)
        os.replace(tmp, path)
    log.info("wrote %s%s", path, "" if outputs is not None else " (onnxruntime not installed: not run)")
    return path


def _onnxruntime_outputs(path: Path, sample: torch.Tensor):
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    locs, scores = session.run([io.MODEL_LOCS, io.MODEL_SCORES], {io.MODEL_INPUT: sample.numpy()})
    return torch.from_numpy(locs), torch.from_numpy(scores)


# ----------------------------------------------------------------------------------------------
# Files


def _label_map_json(label_map) -> bytes:
    return (json.dumps(label_map.to_json(), indent=1) + "\n").encode()


@contextmanager
def _temp_path(path: Path):
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


def _atomic_write_bytes(path: Path, data: bytes) -> Path:
    with _temp_path(path) as tmp:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


@contextmanager
def _quiet_torch():
    """Tracing and the legacy ONNX exporter warn about their own deprecation and about shape
    arithmetic they record (the batch size stays dynamic: verification runs another one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        yield


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
