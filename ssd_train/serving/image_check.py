"""Checks on encoded images before anything decodes them: format, structure and size limits.

The served ensemble runs these in its first step (`ssd300_validate`, a python model) so that
- nothing over the limits is ever decoded (a 4.7 MB JPEG can hold 400 megapixels of flat grey:
  1.2 GB once decoded);
- an image the decoder would choke on fails only its own request: the DALI backend decodes a whole
  dynamic batch in one pipeline run, and one bad sample fails every request batched with it.

Dimensions come from the header (JPEG SOF marker, PNG IHDR chunk); the structure checks read the
marker/chunk layout without decompressing (a truncated JPEG has no end-of-image marker after its
scan; a PNG's chunks must carry valid CRCs up to IEND). JPEG and PNG only: the formats the
ensemble takes (`ssd-client` re-encodes anything else as PNG). Pure Python + numpy.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

# Defaults sized for real photos: 40 MP is above any phone or DSLR (a 45 MP camera shoots 8192x5464
# at most: raise the limit for those), 32 MB above any such JPEG or PNG.
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 32 * 2**20
MAX_REQUEST_BYTES = 256 * 2**20
# The model parameters (config.pbtxt `parameters`) that set them in a served repository.
LIMIT_PARAMETERS = {"max_image_pixels": "max_pixels", "max_image_bytes": "max_image_bytes",
                    "max_request_bytes": "max_request_bytes"}

JPEG_SIGNATURE = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the image size.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn have no length field
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9


class ImageRejected(ValueError):
    """An input that is not a well-formed JPEG/PNG or is over a limit; the message says which."""


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = MAX_IMAGE_PIXELS
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_request_bytes: int = MAX_REQUEST_BYTES

    @classmethod
    def from_parameters(cls, parameters: dict) -> "ImageLimits":
        """From a model config's `parameters` ({key: {"string_value": "..."}}), defaults for the rest."""
        values = {}
        for key, field in LIMIT_PARAMETERS.items():
            if key in parameters:
                values[field] = int(parameters[key]["string_value"])
        return cls(**values)

    def describe(self) -> str:
        return (f"{_megapixels(self.max_pixels)} and {_megabytes(self.max_image_bytes)} per image, "
                f"{_megabytes(self.max_request_bytes)} per request")

    def as_parameters(self) -> dict[str, str]:
        return {key: str(getattr(self, field)) for key, field in LIMIT_PARAMETERS.items()}


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "JPEG" or "PNG"
    width: int
    height: int
    size: int  # encoded bytes, without trailing zero padding


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP"


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def inspect_image(data: bytes) -> ImageInfo:
    """Format and size of one encoded image (trailing zero padding allowed); ImageRejected if it is
    neither a well-formed JPEG nor PNG."""
    if not data:
        raise ImageRejected("empty image data")
    if data.startswith(JPEG_SIGNATURE):
        return _inspect_jpeg(data)
    if data.startswith(PNG_SIGNATURE):
        return _inspect_png(data)
    raise ImageRejected("not a JPEG or PNG image")


def _inspect_jpeg(data: bytes) -> ImageInfo:
    size = None
    pos = 2
    while True:
        # A marker is 0xFF (possibly repeated: fill bytes) and a code.
        if pos + 1 >= len(data) or data[pos] != 0xFF:
            raise ImageRejected("cannot decode image: corrupt JPEG (bad marker structure)")
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1
        if pos >= len(data):
            raise ImageRejected("cannot decode image: truncated JPEG header")
        code = data[pos]
        pos += 1
        if code in _JPEG_STANDALONE:
            continue
        if code == _JPEG_EOI or pos + 2 > len(data):
            raise ImageRejected("cannot decode image: JPEG ends before its image data")
        length = struct.unpack_from(">H", data, pos)[0]
        if length < 2 or pos + length > len(data):
            raise ImageRejected("cannot decode image: truncated JPEG header")
        if code in _JPEG_SOF:
            if length < 7:
                raise ImageRejected("cannot decode image: corrupt JPEG frame header")
            height, width = struct.unpack_from(">HH", data, pos + 3)
            size = (width, height)
        if code == _JPEG_SOS:
            break
        pos += length
    if size is None:
        raise ImageRejected("cannot decode image: JPEG without a frame header")
    # Entropy-coded data cannot contain 0xFFD9 (0xFF is stuffed as 0xFF00): the end-of-image marker
    # after the scan is how a complete JPEG ends. Bytes after it (padding, appended data) are allowed.
    end = data.find(b"\xff\xd9", pos)
    if end < 0:
        raise ImageRejected("cannot decode image: truncated JPEG (no end-of-image marker)")
    width, height = size
    if width == 0 or height == 0:
        raise ImageRejected(f"cannot decode image: JPEG of {width}x{height} pixels")
    return ImageInfo("JPEG", width, height, end + 2)


def _inspect_png(data: bytes) -> ImageInfo:
    pos = len(PNG_SIGNATURE)
    width = height = None
    while True:
        if pos + 12 > len(data):
            raise ImageRejected("cannot decode image: truncated PNG (no IEND chunk)")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            raise ImageRejected("cannot decode image: truncated PNG")
        body = memoryview(data)[pos + 4:pos + 8 + length]  # chunk type + data (what the CRC covers), uncopied
        if zlib.crc32(body) != struct.unpack_from(">I", data, pos + 8 + length)[0]:
            raise ImageRejected(f"cannot decode image: corrupt PNG (bad CRC in its {kind.decode('latin-1')} chunk)")
        if width is None:
            if kind != b"IHDR" or length != 13:
                raise ImageRejected("cannot decode image: PNG without an IHDR header")
            width, height = struct.unpack_from(">II", data, pos + 8)
        if kind == b"IEND":
            break
        pos = end
    if width == 0 or height == 0:
        raise ImageRejected(f"cannot decode image: PNG of {width}x{height} pixels")
    return ImageInfo("PNG", width, height, end)


def check_image(data: bytes, limits: ImageLimits) -> ImageInfo:
    """`inspect_image` plus the per-image limits (reading the structure decodes nothing)."""
    info = inspect_image(data)
    if info.size > limits.max_image_bytes:
        raise ImageRejected(f"{_megabytes(info.size)} encoded, over the limit of "
                            f"{_megabytes(limits.max_image_bytes)} per image (max_image_bytes)")
    pixels = info.width * info.height
    if pixels > limits.max_pixels:
        raise ImageRejected(f"{info.width}x{info.height} pixels ({_megapixels(pixels)}), over the limit of "
                            f"{_megapixels(limits.max_pixels)} per image (max_image_pixels)")
    return info


def check_request(batch: np.ndarray, limits: ImageLimits) -> list[ImageInfo]:
    """Every image of one request's IMAGE tensor (B x L uint8, rows zero-padded); ImageRejected,
    naming the first bad input, otherwise."""
    batch = np.asarray(batch)
    if batch.dtype != np.uint8 or batch.ndim != 2:
        raise ImageRejected(f"expected a B x L uint8 tensor of encoded images, got {batch.dtype} {list(batch.shape)}")
    if batch.nbytes > limits.max_request_bytes:
        raise ImageRejected(f"request of {batch.shape[0]} x {batch.shape[1]} bytes ({_megabytes(batch.nbytes)}), over "
                            f"the limit of {_megabytes(limits.max_request_bytes)} per request (max_request_bytes)")
    infos = []
    for i, row in enumerate(batch):
        try:
            infos.append(check_image(row.tobytes(), limits))
        except ImageRejected as err:
            raise ImageRejected(f"input {i}: {err}") from None
    return infos
