"""SSD300's export (`ssd-train export` of an SSD300 checkpoint; shared steps in `ssd_train.export`).

Writes, each verified before it replaces anything (temp file + rename):
- `ssd300_fp32/1/model.pt` and `ssd300_fp16/1/model.pt`: traced TorchScript of `ServedSSD300`, the
  model followed by the first half of the postprocess (`boxes.candidates`: each class's 200 best
  boxes, decoded). Both take and return float32 (`io.MODEL_INPUT` -> `io.MODEL_BOXES`,
  `io.MODEL_SCORES`); the fp16 module casts inside. Each traced file is reloaded and compared with
  the eager fp32 module on real preprocessed images (synthetic photos run through the DALI
  preprocessing the server uses), at another batch size than it was traced with.
- `ssd300_postprocess/1/labels.json`: the label map (contiguous label -> dataset category id).
- with `onnx=True`, `ssd300_fp32/1/model.onnx` (float32, dynamic batch, the same tensor names):
  checked by `onnx.checker` and, when onnxruntime is installed, against the TorchScript outputs.
  It sits beside the served model.pt as a hand-off artifact (TensorRT's trtexec, onnxruntime,
  other servers) rather than as a sixth served model: one served graph, nothing to keep in step.

No `model.dali` is written: the DALI backend serialises `ssd300_preprocess/1/dali.py` with its own
DALI at load time, and a pipeline serialised by a newer DALI fails to load in an older server.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from ssd_common import io
from ssd_train.export import (ExportError, atomic_write_bytes, check_configs, first_line, install_configs,
                              label_map_json, quiet_torch, sample_images, temp_path, write_export_manifest)
from ssd_train.models.ssd300.boxes import SSD300, candidates, default_boxes

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
# Largest traced-vs-eager (fp32 module) difference accepted in the candidates (scores are probabilities,
# boxes lie in [0, 1]). fp32: a trace runs eager's kernels, only batch-size dependent kernel choices move
# the last bits. fp16: rounding moves SSD300's outputs by ~1e-3; broken traces, casts or overflow by far more.
# (fp16 is compared with the fp32 model: a second, eager fp16 run would double the verification
# time on CPUs, where half-precision convolutions are about 8x slower than fp32.)
TRACE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
ONNX_TOLERANCE = 1e-4
ONNX_OPSET = 17


class ServedSSD300(nn.Module):
    """What the served model runs: SSD300 at `precision` behind a float32 interface (fp16 weights and
    compute inside, so fp32 and fp16 models are drop-ins), then `boxes.candidates`. Returns
    (boxes float32 [N, C-1, K, 4], scores float32 [N, C-1, K]).

    The convolutions run channels_last, as `ssd-train benchmark` and the reference do: the GPU's tensor
    cores want it, and on this project's CPU a traced NCHW model took 2.29 s for a batch of 8 where
    channels_last took 1.86 s (ResNet-50, 2 threads)."""

    def __init__(self, model: nn.Module, precision: str = "fp32"):
        super().__init__()
        self.half = precision == "fp16"
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        if self.half:
            self.model.half()
        # A buffer, so the default boxes follow the module to the device it is loaded on (a GPU server):
        # created inside forward, a trace would pin them to the device it was traced on.
        self.register_buffer("default_boxes", default_boxes(SSD300).clone(), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.contiguous(memory_format=torch.channels_last)
        locs, scores = self.model(images.half() if self.half else images)
        top_scores, top_boxes = candidates(locs.float(), scores.float(), dboxes=self.default_boxes)
        return top_boxes, top_scores


def export_repository(
    checkpoint: str | Path,
    repository: str | Path,
    precisions: Sequence[str] = PRECISIONS,
    onnx: bool = False,
    backbone: str | None = None,
    replace_configs: bool = False,
) -> list[Path]:
    """Export `checkpoint` into the model repository `repository`; returns the files written: the weights
    first, then the configs and code they need (`install_configs`), last the manifest."""
    precisions = _check_precisions(precisions)
    repository = Path(repository)
    model, label_map = _load(checkpoint, backbone)
    check_configs(repository, io.MODELS, replace_configs)
    written = []
    sample = sample_batch()
    with torch.no_grad():
        eager = onnx_reference = ServedSSD300(model)(sample)
        for precision in precisions:
            path = repository / io.model_name(precision) / "1" / io.TORCHSCRIPT_FILE
            path, outputs = write_torchscript(model, precision, sample, eager, path)
            written.append(path)
            if precision == "fp32":
                onnx_reference = outputs  # ONNX is checked against the TorchScript file's outputs
        if onnx:
            path = repository / io.MODEL_FP32 / "1" / io.ONNX_FILE
            written.append(write_onnx(ServedSSD300(model), sample, onnx_reference, path))
    labels = repository / io.POSTPROCESS / "1" / io.LABELS_FILE
    written.append(atomic_write_bytes(labels, label_map_json(label_map)))
    written += install_configs(repository, io.MODELS, replace_configs)
    # Last: the manifest makes the files above one consistent set (ssd-serve checks it).
    written.append(write_export_manifest(repository, "ssd300", io.MODELS, written, checkpoint=str(checkpoint),
                                         precisions=list(precisions), classes=label_map.num_classes))
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
# Verification input


def sample_batch() -> torch.Tensor:
    """`sample_images()` through the project's DALI preprocessing (CPU): N x 3 x 300 x 300."""
    from ssd_train.data.dali import Preprocessor

    pixels, _ = Preprocessor(batch_size=2)(sample_images())
    return torch.from_numpy(pixels)


# ----------------------------------------------------------------------------------------------
# TorchScript


def traceable(model: nn.Module, precision: str) -> nn.Module:
    return ServedSSD300(model, precision).eval()


def write_torchscript(model: nn.Module, precision: str, sample: torch.Tensor, reference, path: Path):
    """Trace `ServedSSD300(model, precision)` on one image, save it next to `path`, reload the file and
    compare its outputs on the whole `sample` with `reference` (the eager fp32 module's) before moving it
    into place. Returns (path, the saved model's outputs on `sample`)."""
    with quiet_torch():
        traced = torch.jit.trace(traceable(model, precision), sample[:1], check_trace=False)
    with temp_path(path) as tmp:
        with quiet_torch():
            torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(tmp), map_location="cpu").eval()
        outputs = loaded(sample)
        error = check_candidates(f"{io.model_name(precision)} TorchScript", "eager", outputs, reference,
                             TRACE_TOLERANCE[precision])
        os.replace(tmp, path)
    log.info("wrote %s (differs from eager fp32 by %.1e at most)", path, error)
    return path, outputs


def check_candidates(what: str, against: str, got, expected, tolerance: float) -> float:
    """ExportError unless the candidates `got` (boxes, scores) match `expected` within `tolerance`
    (scores are probabilities and boxes lie in [0, 1]: absolute); the largest difference.

    Each class's scores are sorted, so they compare rank by rank even where rounding swaps two near-equal
    candidates. A box that differs from the expected box of its rank must equal an expected box of the
    same image and class whose score is within `tolerance` of its own (a swapped near-tie), or sit at the
    end of the list with a score within `tolerance` of the last expected one (a candidate rounding let
    in, in place of another)."""
    names = (io.MODEL_BOXES, io.MODEL_SCORES)
    for name, g, e in zip(names, got, expected):
        if g.shape != e.shape:
            raise ExportError(f"{what} gives {name} of shape {tuple(g.shape)}, {against} {tuple(e.shape)}")
        if not torch.isfinite(g).all():
            raise ExportError(f"{what} gives non-finite {name} on the sample images (fp16 overflow?); "
                              "nothing was written")
    (g_boxes, g_scores), (e_boxes, e_scores) = ([t.float() for t in pair] for pair in (got, expected))
    score_error = (g_scores - e_scores).abs().max().item()
    if score_error > tolerance:
        raise ExportError(f"{what} disagrees with {against} on the sample images: {io.MODEL_SCORES} differs by "
                          f"{score_error:.1e} (tolerance {tolerance:.0e}); nothing was written")
    box_error = (g_boxes - e_boxes).abs().amax(-1)  # (N, C-1, K)
    for image, cls, rank in (box_error > tolerance).nonzero().tolist():
        score = g_scores[image, cls, rank]
        near = (e_scores[image, cls] - score).abs() <= tolerance
        same_box = (e_boxes[image, cls] - g_boxes[image, cls, rank]).abs().amax(-1) <= tolerance
        at_end = (score - e_scores[image, cls, -1]).abs() <= tolerance
        if not ((near & same_box).any() or at_end):
            raise ExportError(f"{what} disagrees with {against} on the sample images: image {image}, class "
                              f"{cls + 1}, candidate {rank}: box {g_boxes[image, cls, rank].tolist()} is none of "
                              f"{against}'s (tolerance {tolerance:.0e}); nothing was written")
    swapped = box_error > tolerance
    return max(score_error, box_error[~swapped].max().item() if (~swapped).any() else 0.0)


# ----------------------------------------------------------------------------------------------
# ONNX


def write_onnx(model: nn.Module, sample: torch.Tensor, reference, path: Path) -> Path:
    """`model` (a `ServedSSD300`) as float32 ONNX with a dynamic batch axis, checked by onnx.checker and
    (when installed) onnxruntime against `reference` (the TorchScript/eager outputs on `sample`)."""
    import onnx

    names = (io.MODEL_INPUT, io.MODEL_BOXES, io.MODEL_SCORES)
    with temp_path(path) as tmp:
        try:
            with quiet_torch():
                torch.onnx.export(
                    model, (sample[:1],), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                    input_names=[names[0]], output_names=list(names[1:]),
                    dynamic_axes={name: {0: "batch"} for name in names},
                )
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as err:  # exporter and checker raise many types; the first line says it
            raise ExportError(f"ONNX export failed: {first_line(err)}") from None
        outputs = _onnxruntime_outputs(tmp, sample)
        if outputs is not None:
            check_candidates("the ONNX model (onnxruntime)", "TorchScript", outputs, reference, ONNX_TOLERANCE)
        os.replace(tmp, path)
    log.info("wrote %s%s", path, "" if outputs is not None else " (onnxruntime not installed: not run)")
    return path


def _onnxruntime_outputs(path: Path, sample: torch.Tensor):
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores = session.run([io.MODEL_BOXES, io.MODEL_SCORES], {io.MODEL_INPUT: sample.numpy()})
    return torch.from_numpy(boxes), torch.from_numpy(scores)
