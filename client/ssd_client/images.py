"""What users pass (file paths, encoded bytes, numpy arrays, PIL images) -> encoded bytes the server's
decoder reads, and a batch of them -> one zero-padded UINT8 [B, L] tensor (the ensemble's `IMAGE`)."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ssd_client.errors import ImageError

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image]

# PIL names of the formats the server takes as they are (its image check accepts JPEG and PNG,
# whose headers it reads before anything decodes them); anything else PIL can open (BMP, TIFF,
# WebP, GIF, ...) is re-encoded as PNG on the way out.
SERVER_FORMATS = frozenset({"JPEG", "PNG"})
SERVER_FORMAT_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # how their files start
# Numpy arrays and PIL images are sent as PNG: lossless, so the server sees exactly the pixels the
# caller holds (the same detections as the in-process model on that array), where JPEG would change
# them. The cost is a bigger request; level 1 keeps the encoding fast.
PNG_COMPRESS_LEVEL = 1


@dataclass(frozen=True)
class EncodedImage:
    """One image ready for the wire: a name for messages and its encoded bytes."""

    name: str
    data: bytes


def is_single_image(obj) -> bool:
    if isinstance(obj, np.ndarray):
        return obj.ndim in (2, 3)
    return isinstance(obj, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image))


def as_image_list(images: ImageLike | Iterable[ImageLike]) -> list:
    """One image or many -> a list of images (a 4-D array is a batch of HWC images)."""
    if is_single_image(images):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        raise ImageError(f"a numpy image must be HxWx3 (or a batch BxHxWx3), got shape {images.shape}")
    try:
        return list(images)
    except TypeError:
        raise ImageError(f"expected an image (path, bytes, numpy array, PIL image) or a sequence of them, "
                         f"got {type(images).__name__}") from None


def image_name(image, index: int) -> str:
    """How messages and outputs refer to an image: its path, else its position in the call."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    filename = getattr(image, "filename", "")  # PIL images opened from a file
    return str(filename) if filename else f"image {index}"


def encode_image(image: ImageLike, name: str) -> EncodedImage:
    if isinstance(image, (str, os.PathLike)):
        return EncodedImage(name, _checked_bytes(_read_file(Path(image), name), name))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return EncodedImage(name, _checked_bytes(bytes(image), name))
    if isinstance(image, np.ndarray):
        return EncodedImage(name, _png(_array_to_pil(image, name)))
    if isinstance(image, Image.Image):
        return EncodedImage(name, _png(image if image.mode in ("RGB", "L") else image.convert("RGB")))
    raise ImageError(f"{name}: unsupported image type {type(image).__name__} "
                     f"(expected a path, encoded bytes, a numpy array or a PIL image)")


def encode_images(images: Sequence[ImageLike], start: int = 0) -> list[EncodedImage]:
    """Encode `images`, which are positions `start`, `start + 1`, ... of the caller's list."""
    return [encode_image(image, image_name(image, start + i)) for i, image in enumerate(images)]


def pad_batch(images: Sequence[EncodedImage]) -> np.ndarray:
    """Zero-pad the encoded images to a common length: the decoder stops at each image's end marker."""
    if not images:
        raise ValueError("empty batch")
    batch = np.zeros((len(images), max(len(image.data) for image in images)), dtype=np.uint8)
    for row, image in zip(batch, images):
        row[: len(image.data)] = np.frombuffer(image.data, dtype=np.uint8)
    return batch


def chunks(items: Sequence, size: int) -> list[tuple[int, Sequence]]:
    """(start, items[start:start + size]) for consecutive requests of at most `size` items."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    return [(start, items[start : start + size]) for start in range(0, len(items), size)]


def _read_file(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except OSError as err:
        raise ImageError(f"{name}: cannot read it ({err.strerror or err})") from None


def _checked_bytes(data: bytes, name: str) -> bytes:
    """Catch what is not an image here, with its name, instead of as a failed server request."""
    if not data:
        raise ImageError(f"{name}: empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                img.verify()  # parses the headers and chunks without decoding the pixels
    except Image.DecompressionBombError as err:
        if data.startswith(SERVER_FORMAT_SIGNATURES):  # sent as it is: the server's size cap decides, and says so
            return data
        raise ImageError(f"{name}: too many pixels to convert for the server ({err})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image (unknown format)") from None
    except Exception as err:  # PIL's parsers raise many types (OSError, SyntaxError, struct.error, ...) on bad data
        raise ImageError(f"{name}: not a readable image ({type(err).__name__}: {err})") from None
    if fmt in SERVER_FORMATS:
        return data
    with Image.open(io.BytesIO(data)) as img:
        return _png(img.convert("RGB"))


def _array_to_pil(array: np.ndarray, name: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"{name}: numpy images must be uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)) or 0 in array.shape:
        raise ImageError(f"{name}: numpy images must be HxWx3 RGB (or HxW gray), got shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()
