"""perf_analyzer `--input-data` JSON files built from real photos.

Three inputs: the ensembles' `IMAGE` (encoded JPEG bytes, zero-padded to one length because
perf_analyzer only batches tensors of equal shape, as the client pads a batch; the decoder ignores
the padding; SSD300's and Mask R-CNN's ensembles take the same), the SSD model's `INPUT__0` (the same
photos through the project's DALI preprocessing, so the models alone see the tensors the ensemble
would hand them) and the Mask R-CNN model's `INPUT__0`/`INPUT__1` (the photos through its DALI
preprocessing as one batch, so they share the batch's padded shape, and their resized sizes).
"""

from __future__ import annotations

import base64
import io as _bytes_io
import json
from pathlib import Path

import numpy as np

from ssd_common import io

# Photos bundled with scikit-image (no download needed).
DEFAULT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class InputDataError(ValueError):
    """No usable images for the input data (one-line message)."""


def default_photos(quality: int = 90) -> list[tuple[str, bytes]]:
    """scikit-image's sample photos, encoded as JPEG."""
    from PIL import Image
    from skimage import data

    photos = []
    for name in DEFAULT_PHOTOS:
        buffer = _bytes_io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(buffer, format="JPEG", quality=quality)
        photos.append((f"{name}.jpg", buffer.getvalue()))
    return photos


def directory_images(directory: Path, limit: int) -> list[tuple[str, bytes]]:
    """Up to `limit` JPEG/PNG files of `directory` (sorted by name), bytes as they are on disk."""
    files = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputDataError(f"no .jpg/.jpeg/.png images in {directory}")
    return [(p.name, p.read_bytes()) for p in files[:limit]]


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def encoded_image_data(images: list[tuple[str, bytes]]) -> dict:
    """`--input-data` for the ensemble: one step per photo, each zero-padded to the longest."""
    length = max(len(data) for _, data in images)
    steps = []
    for _, data in images:
        padded = np.zeros(length, np.uint8)
        padded[: len(data)] = np.frombuffer(data, np.uint8)
        steps.append({io.IMAGE: {"b64": _b64(padded), "shape": [length]}})
    return {"data": steps}


def preprocessed_image_data(images: list[tuple[str, bytes]]) -> dict:
    """`--input-data` for the SSD model alone: the photos through the project's DALI preprocessing."""
    from ssd_train.data.dali import ImageDecodeError, Preprocessor

    try:
        tensors, _ = Preprocessor(batch_size=len(images))([data for _, data in images])
    except ImageDecodeError as err:
        raise InputDataError(f"cannot preprocess the images: {err}") from None
    steps = [{io.MODEL_INPUT: {"b64": _b64(t.astype(np.float32)), "shape": list(t.shape)}} for t in tensors]
    return {"data": steps}


def maskrcnn_preprocessed_data(images: list[tuple[str, bytes]], min_size: int, max_size: int) -> dict:
    """`--input-data` for the Mask R-CNN model alone: the photos through its DALI preprocessing with the
    served export's sizes. perf_analyzer needs one shape per tensor for a batch, and Mask R-CNN's images
    keep their aspect ratio, so the photos are preprocessed as one batch: each is zero-padded to the
    batch's largest height and width (as the ensemble pads a batch of them), beside its resized size."""
    from ssd_train.data.dali import ImageDecodeError
    from ssd_train.models.maskrcnn.preprocess import MaskRCNNPreprocessor

    try:
        tensors, resized, _ = MaskRCNNPreprocessor(min_size, max_size, batch_size=len(images))(
            [data for _, data in images])
    except ImageDecodeError as err:
        raise InputDataError(f"cannot preprocess the images: {err}") from None
    image_input, size_input = io.MASKRCNN_LIBTORCH_INPUTS
    steps = [{image_input: {"b64": _b64(t.astype(np.float32)), "shape": list(t.shape)},
              size_input: {"b64": _b64(s.astype(np.int64)), "shape": [2]}} for t, s in zip(tensors, resized)]
    return {"data": steps}


def write_input_data(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path
