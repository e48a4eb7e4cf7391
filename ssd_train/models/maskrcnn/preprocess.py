"""Mask R-CNN's served preprocessing as a DALI graph: encoded image -> decoded, resized keeping the aspect
ratio, ImageNet-normalised, zero-padded. Run by the Triton `dali` backend on the GPU
(`model_repository/maskrcnn_preprocess/1/dali.py`) and by the CPU flavour's python stand-in; the same
graph both ways.

It reproduces torchvision's GeneralizedRCNNTransform, which `ssd-train predict/evaluate` run inside the
model (`export.preprocess` is the torch reference the tests hold it to):
- the size rule of `export.resized_size`: scale = min(min_size / shorter side, max_size / longer side),
  each side floor(side * scale), in double precision as torchvision computes it (in float32 about 5% of
  image sizes come out one pixel off);
- bilinear resize without antialiasing on float pixels, then normalisation;
- a batch zero-padded to its largest height and width, each rounded up to a multiple of 32.

min_size and max_size are the checkpoint's (`ssd-train export` writes them into the preprocess model's
version folder as `io.RESIZE_FILE`). DALI and numpy only: the DALI backend serialises this without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dali_math

from ssd_common import io
from ssd_train.data import IMAGENET_MEAN, IMAGENET_STD
from ssd_train.data.dali import Preprocessor, check_device

SIZE_DIVISIBLE = 32  # the padded batch's height and width are multiples of this


def resized_shape(size, min_size: int, max_size: int):
    """DALI nodes (height, width) of the resized image from the original `size` [h, w] (INT32)."""
    height, width = (fn.cast(size[i], dtype=types.FLOAT64) for i in (0, 1))
    scale = dali_math.min(types.Constant(float(min_size), dtype=types.FLOAT64) / dali_math.min(height, width),
                          types.Constant(float(max_size), dtype=types.FLOAT64) / dali_math.max(height, width))
    return dali_math.floor(height * scale), dali_math.floor(width * scale)


def decode_preprocess(encoded, min_size: int, max_size: int, device: str):
    """Encoded bytes -> (float32 CHW image padded with the batch, resized (h, w) INT64, original (h, w) INT32)."""
    decoded = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    size = fn.peek_image_shape(encoded, dtype=types.INT32)[0:2]
    height, width = resized_shape(size, min_size, max_size)
    resized = fn.resize(
        decoded,
        resize_x=fn.cast(width, dtype=types.FLOAT),  # whole numbers: no fractional-size adjustment
        resize_y=fn.cast(height, dtype=types.FLOAT),
        interp_type=types.INTERP_LINEAR,
        antialias=False,  # torchvision's interpolate(mode="bilinear") has none
        dtype=types.FLOAT,  # resize the decoded values, unrounded, as torchvision does
    )
    normalised = fn.crop_mirror_normalize(resized, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[255.0 * m for m in IMAGENET_MEAN],
                                          std=[255.0 * s for s in IMAGENET_STD])
    # No shape given: every sample is padded to the batch's largest extent, then up to the alignment.
    padded = fn.pad(normalised, axis_names="HW", align=[SIZE_DIVISIBLE, SIZE_DIVISIBLE], fill_value=0.0)
    resized_size = fn.cast(fn.stack(height, width), dtype=types.INT64)
    return padded, resized_size, size


def inference_graph(min_size: int, max_size: int, device: str = "cpu"):
    """For use inside a `pipeline_def`: input `io.IMAGE`, outputs (PREPROCESSED_IMAGE, RESIZED_SIZE, IMAGE_SIZE)."""
    check_device(device)
    encoded = fn.external_source(name=io.IMAGE, dtype=types.UINT8, ndim=1, device="cpu")
    return decode_preprocess(encoded, min_size, max_size, device)


def inference_pipeline(batch_size: int, min_size: int, max_size: int, device: str = "cpu", num_threads: int = 2,
                       device_id: int | None = None):
    """A (not yet built) pipeline of `inference_graph`."""
    check_device(device)
    device_id = (device_id or 0) if device == "gpu" else None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1)
    def maskrcnn_preprocess():
        return inference_graph(min_size, max_size, device)

    return maskrcnn_preprocess()


def read_resize(path) -> tuple[int, int]:
    """(min_size, max_size) from a `io.RESIZE_FILE` (`export.resize_json` writes it); ValueError (one line)
    if it is missing or malformed."""
    try:
        data = json.loads(Path(path).read_text())
        min_size, max_size = int(data["min_size"]), int(data["max_size"])
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: run ssd-train export") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is unreadable ({type(err).__name__}): run ssd-train export") from None
    if min_size < 1 or max_size < 1:
        raise ValueError(f"{path}: min_size and max_size must be positive, not {min_size}, {max_size}")
    return min_size, max_size


class MaskRCNNPreprocessor(Preprocessor):
    """`Preprocessor` (its input checks and its recovery from undecodable images) running this graph: encoded
    images -> (float32 N x 3 x H x W padded, int64 N x 2 resized sizes, int32 N x 2 original sizes). All
    images go through one pipeline run (the padding is the batch's): at most `batch_size` of them."""

    def __init__(self, min_size: int, max_size: int, batch_size: int = io.MASKRCNN_MAX_BATCH_SIZE,
                 device: str = "cpu", num_threads: int = 2, device_id: int | None = None):
        super().__init__(batch_size, device, num_threads, device_id)
        self.min_size, self.max_size = min_size, max_size

    def _build_pipeline(self):
        return inference_pipeline(self.batch_size, self.min_size, self.max_size, self.device, self.num_threads,
                                  self.device_id)

    def _run_chunks(self, samples):
        if not 0 < len(samples) <= self.batch_size:
            raise ValueError(f"one batch of 1 to {self.batch_size} images, not {len(samples)}")
        return self._run_batch(samples, 0)
