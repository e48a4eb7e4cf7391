"""Mask R-CNN for serving: the model's network part as one TorchScript (or ONNX) graph, with the
resize/normalise before it and the mask pasting after it kept out, where the served ensemble does them
once each:

    IMAGE bytes -> preprocess (decode, resize, normalise, pad) -> ServedMaskRCNN -> postprocess (boxes to
    original pixels, 28x28 masks pasted at the original size, threshold, RLE)

- `ServedMaskRCNN` wraps a trained torchvision MaskRCNN: it runs the model's backbone, RPN and RoI heads
  on an already preprocessed batch and returns fixed-size, zero-padded tensors (K = the served width,
  io.MASKRCNN_MAX_DETECTIONS; the model keeps at most its RoI heads' detections per image): boxes
  [N, K, 4] float32 in resized-image pixels, scores [N, K] float32, labels [N, K] int64 (contiguous),
  masks [N, K, M, M] float32 (the mask head's probabilities for each detection's own label, M = 28, not
  pasted) and counts [N, 1] int64 (valid rows per image, best first).
- `preprocess` and `postprocess` are the plain-torch reference of the steps around it, with
  GeneralizedRCNNTransform's own math: `postprocess(served(*preprocess(images)))` is what
  `inference.detect(model, images)` returns. The served preprocess (DALI) and postprocess (Python
  model) are tested against them; `resized_size` is the size rule the DALI resize must reproduce.
- `export_torchscript` scripts the wrapper, `export_onnx` exports it; each file is reloaded and
  compared with the eager wrapper on real preprocessed images before it atomically replaces the
  target (a failed check leaves the target as it was).

The TorchScript file calls torchvision's `nms` and `roi_align` operators: whatever loads it must have
torchvision's ops registered (`import torchvision` in Python; the NGC pytorch_libtorch backend is
built with them).
"""

# No `from __future__ import annotations`: torch.jit.script reads ServedMaskRCNN's annotations as types.
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks, paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes

from ssd_common import io
from ssd_train.data import IMAGENET_MEAN, IMAGENET_STD  # GeneralizedRCNNTransform's defaults, kept by build_maskrcnn
from ssd_train.export import (ExportError, atomic_write_bytes, check_configs, first_line, install_configs,
                              label_map_json, quiet_torch, sample_images, temp_path, write_export_manifest)
from ssd_train.models.maskrcnn.inference import MASK_THRESHOLD
from ssd_train.models.maskrcnn.model import MaskRCNNSpec, resized_size

log = logging.getLogger(__name__)

SIZE_DIVISIBLE = 32  # the padded batch's height and width are multiples of this
PRECISIONS = ("fp32", "fp16")
ONNX_OPSET = 17
# Tensor names of the served model (TorchScript keeps positions; ONNX gets these names).
INPUT_NAMES, OUTPUT_NAMES = io.MASKRCNN_MODEL_INPUTS, io.MASKRCNN_MODEL_OUTPUTS
# Largest difference accepted between an exported model and the eager wrapper (`check_outputs`): scores
# and mask probabilities absolute, boxes as a fraction of the image's largest coordinate. TorchScript
# runs eager's kernels (no difference measured); onnxruntime has its own convolutions (measured on the
# tiny test model: scores 1e-6, mask probabilities 1.2e-4, boxes 2e-5 px).
TOLERANCE = {"torchscript": 1e-4, "onnx": 1e-3}


class ServedMaskRCNN(nn.Module):
    """A torchvision MaskRCNN (eval mode) between the served preprocess and postprocess.

    forward(images float32 [N, 3, H, W]: resized, ImageNet-normalised, zero-padded to multiples of 32;
            image_sizes int64 [N, 2]: each image's resized (height, width) before padding)
      -> boxes float32 [N, K, 4] xyxy in resized-image pixels, scores float32 [N, K],
         labels int64 [N, K], masks float32 [N, K, 28, 28] probabilities, counts int64 [N, 1];
    rows past counts[i] are zeros. Detections come in the RoI heads' order (by score, best first).
    The wrapper shares the model's modules (and puts them in eval mode)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.rpn = model.rpn
        self.roi_heads = model.roi_heads
        if model.roi_heads.detections_per_img > io.MASKRCNN_MAX_DETECTIONS:
            raise ValueError(f"the model keeps {model.roi_heads.detections_per_img} detections per image; the "
                             f"served outputs hold {io.MASKRCNN_MAX_DETECTIONS}")
        self.detections_per_image: int = io.MASKRCNN_MAX_DETECTIONS  # the width of the padded outputs
        self.eval()

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        if torchvision._is_tracing():
            shapes = self._traced_shapes(image_sizes)
        else:
            sizes: list[list[int]] = image_sizes.tolist()
            shapes = [(size[0], size[1]) for size in sizes]
        features = self.backbone(images)
        proposals, _ = self.rpn(ImageList(images, shapes), features)
        detections, _ = self.roi_heads(features, proposals, shapes)
        k = self.detections_per_image
        boxes, scores, labels, masks, valid = [], [], [], [], []
        for found in detections:
            pad = k - found["boxes"].shape[0]
            boxes.append(nn.functional.pad(found["boxes"], [0, 0, 0, pad]))
            scores.append(nn.functional.pad(found["scores"], [0, pad]))
            labels.append(nn.functional.pad(found["labels"], [0, pad]))
            masks.append(nn.functional.pad(found["masks"][:, 0], [0, 0, 0, 0, 0, pad]))
            # counts as a sum, not torch.tensor(list of ints): a trace (ONNX) would freeze such a list
            valid.append(nn.functional.pad(torch.ones_like(found["labels"]), [0, pad]))
        return (torch.stack(boxes), torch.stack(scores), torch.stack(labels), torch.stack(masks),
                torch.stack(valid).sum(1, keepdim=True))

    @torch.jit.unused
    def _traced_shapes(self, image_sizes: Tensor) -> list[tuple[int, int]]:
        # Under tracing (ONNX) the sizes must stay tensors, or the trace would bake in the sample's.
        return [(size[0], size[1]) for size in image_sizes.unbind(0)]  # type: ignore[misc]


def preprocess(images: list[Tensor], spec: MaskRCNNSpec) -> tuple[Tensor, Tensor]:
    """Float [3, h, w] RGB images in [0, 1] -> (batch float32 [N, 3, H, W], image_sizes int64 [N, 2]),
    as GeneralizedRCNNTransform does it: normalise, bilinear resize to `resized_size`, zero-pad to the
    batch's largest height and width rounded up to multiples of 32."""
    if not images:
        raise ValueError("preprocess needs at least one image")
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    resized = []
    for image in images:
        image = (image.float() - mean.to(image.device)) / std.to(image.device)
        size = resized_size(image.shape[-2], image.shape[-1], spec.min_size, spec.max_size)
        resized.append(nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0])
    sizes = torch.tensor([image.shape[-2:] for image in resized], dtype=torch.int64)
    height, width = (int(math.ceil(int(side) / SIZE_DIVISIBLE) * SIZE_DIVISIBLE) for side in sizes.max(0).values)
    batch = resized[0].new_zeros((len(resized), 3, height, width))
    for slot, image in zip(batch, resized):
        slot[:, : image.shape[1], : image.shape[2]].copy_(image)
    return batch, sizes


def postprocess(boxes: Tensor, scores: Tensor, labels: Tensor, masks: Tensor, counts: Tensor,
                image_sizes: Tensor, original_sizes) -> list[dict]:
    """The wrapper's outputs -> per image what `inference.detect` returns: {"boxes" float32 [n, 4] in
    original pixels, "scores", "labels", "masks" bool [n, h, w] at the original size}, best first.
    `original_sizes`: each image's (height, width) before preprocessing."""
    found = []
    for i, (height, width) in enumerate((int(h), int(w)) for h, w in original_sizes):
        n = int(counts[i])
        resized = (int(image_sizes[i, 0]), int(image_sizes[i, 1]))
        image_boxes = resize_boxes(boxes[i, :n].float(), resized, (height, width))
        probabilities = paste_masks_in_image(masks[i, :n, None].float(), image_boxes, (height, width))
        order = scores[i, :n].argsort(descending=True, stable=True)
        found.append({"boxes": image_boxes[order].cpu(),
                      "scores": scores[i, :n][order].float().cpu(),
                      "labels": labels[i, :n][order].cpu(),
                      "masks": (probabilities[order, 0] > MASK_THRESHOLD).cpu()})
    return found


def postprocess_rle(boxes: Tensor, scores: Tensor, labels: Tensor, masks: Tensor, counts: Tensor,
                    image_sizes: Tensor, original_sizes) -> list[dict]:
    """`postprocess` with each mask as its compressed COCO RLE counts ("rles", bytes) instead of a bool
    array: the same masks bit for bit, each made from its box's region alone. A pasted mask is zeros
    outside that region, so this pastes (torchvision's `paste_masks_in_image` steps: pad, expand the box,
    bilinear resize to it) and encodes only the region: the work and the bytes leaving the device follow
    the boxes' area, not the image's. What the served postprocess runs."""
    from ssd_common.masks import encode_cropped_mask

    found = []
    for i, (height, width) in enumerate((int(h), int(w)) for h, w in original_sizes):
        n = int(counts[i])
        resized = (int(image_sizes[i, 0]), int(image_sizes[i, 1]))
        image_boxes = resize_boxes(boxes[i, :n].float(), resized, (height, width))
        padded, scale = expand_masks(masks[i, :n, None].float(), padding=1)
        pixel_boxes = expand_boxes(image_boxes, scale).to(torch.int64).tolist()
        order = scores[i, :n].argsort(descending=True, stable=True)
        rles = []
        for j in order.tolist():
            x0, y0, x1, y1 = pixel_boxes[j]
            box_height, box_width = max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)
            top, bottom, left, right = max(y0, 0), min(y1 + 1, height), max(x0, 0), min(x1 + 1, width)
            if bottom <= top or right <= left:  # the box misses the image: an empty mask
                rles.append(encode_cropped_mask(np.zeros((0, 0), bool), 0, 0, height, width))
                continue
            region = nn.functional.interpolate(padded[j:j + 1], size=(box_height, box_width), mode="bilinear",
                                               align_corners=False)[0, 0]
            crop = region[top - y0:bottom - y0, left - x0:right - x0] > MASK_THRESHOLD
            rles.append(encode_cropped_mask(crop.cpu().numpy(), top, left, height, width))
        found.append({"boxes": image_boxes[order].cpu(),
                      "scores": scores[i, :n][order].float().cpu(),
                      "labels": labels[i, :n][order].cpu(),
                      "rles": rles})
    return found


# ----------------------------------------------------------------------------------------------
# The model repository


def export_repository(checkpoint, repository, precisions=("fp32",), onnx: bool = False,
                      score_threshold: Optional[float] = None, detections_per_image: Optional[int] = None,
                      replace_configs: bool = False) -> list[Path]:
    """`ssd-train export` of a Mask R-CNN checkpoint into `repository`: `maskrcnn_fp32/1/model.pt` (and
    with `onnx`, `model.onnx` beside it: fixed batch 1, a hand-off artifact), the label map for the
    postprocess, the checkpoint's resize sizes for the preprocess, the configs and code they need
    (`install_configs`), and last the manifest. Each model file is verified on the sample photos before it
    replaces anything. `score_threshold`, `detections_per_image`: what the served model keeps
    (`serving_settings`)."""
    from ssd_train.models.maskrcnn.inference import decode_image
    from ssd_train.models.maskrcnn.train import load_for_inference

    precisions = tuple(dict.fromkeys(precisions))
    if precisions != ("fp32",):
        raise ExportError(f"Mask R-CNN exports fp32 only, not {', '.join(p for p in precisions if p != 'fp32')}: "
                          "half-precision convolutions are slower than fp32 on the CPU this export verifies on")
    repository = Path(repository)
    try:
        model, label_map, info = load_for_inference(checkpoint)
    except ValueError as err:  # CheckpointError, SpecError, LabelMapError: one line each
        raise ExportError(str(err)) from None
    spec = info["spec"]
    settings = serving_settings(model, score_threshold, detections_per_image)
    check_configs(repository, io.MASKRCNN_MODELS, replace_configs)
    written = []
    images = [decode_image(data) for data in sample_images()]
    version = repository / io.MASKRCNN_MODEL / "1"
    written.append(export_torchscript(model, spec, version / io.TORCHSCRIPT_FILE, images))
    if onnx:
        written.append(export_onnx(model, spec, version / io.ONNX_FILE, images, batch_size=1))
    written.append(atomic_write_bytes(repository / io.MASKRCNN_POSTPROCESS / "1" / io.LABELS_FILE,
                                      label_map_json(label_map)))
    written.append(atomic_write_bytes(repository / io.MASKRCNN_PREPROCESS / "1" / io.RESIZE_FILE,
                                      resize_json(spec.min_size, spec.max_size)))
    written += install_configs(repository, io.MASKRCNN_MODELS, replace_configs)
    written.append(write_export_manifest(repository, "maskrcnn", io.MASKRCNN_MODELS[1:], written,
                                         checkpoint=str(checkpoint), precisions=["fp32"],
                                         classes=label_map.num_classes, backbone=spec.backbone,
                                         min_size=spec.min_size, max_size=spec.max_size, **settings))
    log.info("exported Mask R-CNN (%s, %d classes) to %s", spec.backbone, label_map.num_classes, repository)
    return written


def serving_settings(model: nn.Module, score_threshold: Optional[float], detections_per_image: Optional[int]
                     ) -> dict:
    """Set the box score threshold and the detections per image the served model keeps (None: the
    checkpoint's, the recipe's 0.05 and 100, which COCO evaluation wants). Each served detection costs a
    mask pasted over its box's region and its RLE: a serving threshold of e.g. 0.5 cuts that work where
    clients would drop low scores anyway. Returns both, as the manifest records them."""
    if score_threshold is not None:
        if not 0 <= score_threshold < 1:
            raise ExportError(f"the score threshold must be in [0, 1), not {score_threshold}")
        model.roi_heads.score_thresh = float(score_threshold)
    if detections_per_image is not None:
        if not 1 <= detections_per_image <= io.MASKRCNN_MAX_DETECTIONS:
            raise ExportError(f"detections per image must be 1 to {io.MASKRCNN_MAX_DETECTIONS} (the served "
                              f"outputs' size), not {detections_per_image}")
        model.roi_heads.detections_per_img = int(detections_per_image)
    return {"score_threshold": float(model.roi_heads.score_thresh),
            "detections_per_image": int(model.roi_heads.detections_per_img)}


def resize_json(min_size: int, max_size: int) -> bytes:
    """The preprocess model's `io.RESIZE_FILE`: the sizes the checkpoint was trained with."""
    return (json.dumps({"min_size": int(min_size), "max_size": int(max_size)}) + "\n").encode()


# ----------------------------------------------------------------------------------------------
# TorchScript


def export_torchscript(model: nn.Module, spec: MaskRCNNSpec, path, sample_images: list[Tensor],
                       precision: str = "fp32") -> Path:
    """Script `ServedMaskRCNN(model)` into `path` (float32 in and out), verified first: the saved file is
    reloaded with torch.jit.load, run on `sample_images` (float [3, h, w] in [0, 1]; mixed sizes make one
    padded batch) through `preprocess`, and must match the eager wrapper (`check_outputs`), or
    ExportError and `path` is left as it was.

    precision "fp16" is refused here: this export runs on the CPU, where half-precision convolutions
    are slower than fp32, not faster; fp16 pays on the GPU server, so such a file belongs to a GPU
    export verified on that GPU."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp16":
        raise ExportError("fp16 Mask R-CNN is not exported: this export runs and verifies on the CPU, where "
                          "half-precision convolutions are slower than fp32; export fp32")
    path = Path(path)
    served = ServedMaskRCNN(model).eval()
    inputs = preprocess(sample_images, spec)
    started = time.perf_counter()
    try:
        with quiet_torch():
            scripted = torch.jit.script(served)
    except Exception as err:  # the compiler raises many types; the first line says what
        raise ExportError(f"cannot script Mask R-CNN: {first_line(err)}") from None
    with torch.no_grad(), temp_path(path) as tmp:
        with quiet_torch():
            torch.jit.save(scripted, str(tmp))
            loaded = torch.jit.load(str(tmp), map_location="cpu").eval()
        differences = check_outputs("the TorchScript file", loaded(*inputs), served(*inputs),
                                    TOLERANCE["torchscript"], float(model.roi_heads.score_thresh))
        os.replace(tmp, path)
    log.info("wrote %s in %.1f s (from eager: boxes %.1e px, scores %.1e, masks %.1e at most)", path,
             time.perf_counter() - started, *differences.values())
    return path


# ----------------------------------------------------------------------------------------------
# ONNX


def export_onnx(model: nn.Module, spec: MaskRCNNSpec, path, sample_images: list[Tensor],
                batch_size: Optional[int] = 1) -> Path:
    """`ServedMaskRCNN(model)` as float32 ONNX: the TorchScript-based exporter (`dynamo=False`, opset 17)
    with dynamic height and width, checked by onnx.checker and run by onnxruntime (CPU) against the
    eager wrapper on `sample_images` before it replaces `path`; ExportError otherwise.

    The graph takes exactly `batch_size` images: the exporter traces, and a trace unrolls the
    per-image Python loops of torchvision's RPN and RoI heads (and the wrapper's padding) to the
    traced batch. It is traced on the first `batch_size` sample images and verified on every full
    batch of them (at least two: others than it was traced on, so sizes baked into the trace show).
    `batch_size=None` asks for a dynamic batch too: traced on one image, verified on it and on the
    whole sample as one batch, which onnxruntime refuses (the unrolled per-image Split): ExportError."""
    import onnx
    import onnxruntime

    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ExportError(f"ONNX batch size must be a positive integer or None (dynamic), not {batch_size!r}")
    needed = 2 * (batch_size or 1)
    if len(sample_images) < needed:
        raise ExportError(f"ONNX export needs at least {needed} sample images (one batch to trace, another to "
                          f"verify), not {len(sample_images)}")
    path = Path(path)
    served = ServedMaskRCNN(model).eval()
    if batch_size is None:
        traced, batches = sample_images[:1], [sample_images[:1], sample_images]
        dynamic = {name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES}
    else:
        batches = [sample_images[i:i + batch_size] for i in range(0, len(sample_images) - batch_size + 1, batch_size)]
        traced, dynamic = batches[0], {"IMAGES": {}}
    dynamic["IMAGES"].update({2: "height", 3: "width"})
    started = time.perf_counter()
    worst: dict[str, float] = {}
    with torch.no_grad(), temp_path(path) as tmp:
        try:
            with quiet_torch(), warnings.catch_warnings():
                # the exporter's notes on torchvision's tracing paths (torch.tensor of a traced size, advanced
                # indexing): the verification below runs other sizes than the traced ones
                warnings.simplefilter("ignore", UserWarning)
                torch.onnx.export(served, preprocess(traced, spec), str(tmp), dynamo=False,
                                  opset_version=ONNX_OPSET, input_names=list(INPUT_NAMES),
                                  output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic)
            onnx.checker.check_model(str(tmp), full_check=True)
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 4  # a failed run is reported once, as the ExportError below
            session = onnxruntime.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # exporter, checker and onnxruntime raise many types
            raise ExportError(f"ONNX export of Mask R-CNN failed: {first_line(err)}") from None
        for batch in batches:
            inputs = preprocess(batch, spec)
            try:
                got = session.run(list(OUTPUT_NAMES), {name: x.numpy() for name, x in zip(INPUT_NAMES, inputs)})
            except Exception as err:
                why = (" (a dynamic batch: the trace unrolled torchvision's per-image loops to the one image "
                       "it traced)" if batch_size is None else "")
                raise ExportError(f"onnxruntime cannot run the exported Mask R-CNN on {len(batch)} images of "
                                  f"{tuple(inputs[0].shape[2:])}{why}: {first_line(err)}") from None
            differences = check_outputs("the ONNX model (onnxruntime)", [torch.from_numpy(x) for x in got],
                                        served(*inputs), TOLERANCE["onnx"], float(model.roi_heads.score_thresh))
            worst = {key: max(value, worst.get(key, 0.0)) for key, value in differences.items()}
        os.replace(tmp, path)
    log.info("wrote %s in %.1f s (from eager: boxes %.1e px, scores %.1e, masks %.1e at most)", path,
             time.perf_counter() - started, *worst.values())
    return path


# ----------------------------------------------------------------------------------------------
# Verification


def check_outputs(what: str, got, expected, tolerance: float, score_edge: float = 0.0) -> dict[str, float]:
    """ExportError unless the exported model's five outputs `got` are the eager wrapper's `expected`:
    the same shapes and dtypes, and per image the same detections: each expected row matched by a
    distinct row of `got` with the same label, score within `tolerance`, box within `tolerance` of the
    image's largest coordinate and mask probabilities within `tolerance`. Rows whose scores are within
    `tolerance` of each other may trade places (another convolution kernel may order near-ties
    differently), and a row may be missing on one side where a rounding decides whether it is kept:
    its score within `tolerance` of the score threshold `score_edge`, or of the lowest score of the
    other side when that side is full (K rows). The largest differences: {"boxes" px, "scores", "masks"}."""
    got = [torch.as_tensor(g) for g in got]
    for name, g, e in zip(OUTPUT_NAMES, got, expected):
        if tuple(g.shape) != tuple(e.shape) or g.dtype != e.dtype:
            raise ExportError(f"{what} gives {name} {g.dtype} {tuple(g.shape)}, eager {e.dtype} {tuple(e.shape)}; "
                              "nothing was written")
        if g.is_floating_point() and not torch.isfinite(g).all():
            raise ExportError(f"{what} gives non-finite {name} on the sample images; nothing was written")
    worst = {"boxes": 0.0, "scores": 0.0, "masks": 0.0}
    for i in range(len(expected[0])):
        n_got, n_expected = int(got[4][i]), int(expected[4][i])
        g_boxes, g_scores, g_labels, g_masks = (x[i, :n_got] for x in got[:4])
        e_boxes, e_scores, e_labels, e_masks = (x[i, :n_expected] for x in expected[:4])
        capacity = expected[0].shape[1]

        def at_edge(score: float, other: Tensor) -> bool:
            full = len(other) == capacity and score - float(other.min()) <= tolerance
            return full or abs(score - score_edge) <= tolerance

        scale = max(float(e_boxes.abs().max()) if n_expected else 0.0, 1.0)
        unmatched = torch.ones(n_got, dtype=torch.bool)
        for row in range(n_expected):
            box_error = (g_boxes - e_boxes[row]).abs().amax(1)
            score_error = (g_scores - e_scores[row]).abs()
            mask_error = (g_masks - e_masks[row]).abs().flatten(1).amax(1)
            fits = (unmatched & (g_labels == e_labels[row]) & (score_error <= tolerance)
                    & (box_error <= tolerance * scale) & (mask_error <= tolerance))
            if not fits.any():
                if at_edge(float(e_scores[row]), g_scores):
                    continue
                raise ExportError(f"{what} disagrees with eager on the sample images: image {i}'s detection "
                                  f"{row} (label {int(e_labels[row])}, score {float(e_scores[row]):.4f}) has no "
                                  f"match within {tolerance:.0e}; nothing was written")
            match = int(torch.where(fits, score_error, torch.inf).argmin())
            unmatched[match] = False
            for key, error in (("boxes", box_error), ("scores", score_error), ("masks", mask_error)):
                worst[key] = max(worst[key], float(error[match]))
        for extra in g_scores[unmatched].tolist():
            if not at_edge(extra, e_scores):
                raise ExportError(f"{what} disagrees with eager on the sample images: image {i} has a detection "
                                  f"eager has not (score {extra:.4f}); nothing was written")
    return worst


def sizes_of(images: list[Tensor]) -> list[tuple[int, int]]:
    """Each image's (height, width): the `original_sizes` of `postprocess`."""
    return [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
