"""The image check the ensemble runs before decoding: real photos in every JPEG/PNG variant pass with
their true size (the size DALI's decoder reports), truncated or corrupt files and decompression bombs
are refused without decoding, each with a message naming the input and the limit."""

from __future__ import annotations

import io as bytes_io
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from ssd_train.serving.image_check import ImageLimits, ImageRejected, check_image, check_request, inspect_image

DATA_DIR = Path(skimage.data.__file__).parent


def encode(image, image_format: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = bytes_io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def variants() -> dict[str, bytes]:
    """JPEG and PNG as cameras and tools write them."""
    chelsea, camera = skimage.data.chelsea(), skimage.data.camera()
    return {
        "jpeg": (DATA_DIR / "rocket.jpg").read_bytes(),
        "png": (DATA_DIR / "astronaut.png").read_bytes(),
        "progressive jpeg": encode(chelsea, "JPEG", progressive=True),
        "cmyk jpeg": encode(Image.fromarray(chelsea).convert("CMYK"), "JPEG"),
        "grayscale jpeg": encode(camera, "JPEG"),
        "grayscale png": encode(camera, "PNG"),
        "rgba png": encode(np.dstack([chelsea, np.full(chelsea.shape[:2], 200, np.uint8)]), "PNG"),
        "16-bit png": encode(Image.fromarray(camera.astype(np.uint16) * 250), "PNG"),
        "palette png": encode(Image.fromarray(chelsea).convert("P"), "PNG"),
    }


def with_thumbnail(jpeg: bytes, thumbnail: bytes) -> bytes:
    """`jpeg` with an APP1 segment holding another complete JPEG (as EXIF thumbnails do) after SOI."""
    segment = b"\xff\xe1" + struct.pack(">H", len(thumbnail) + 2) + thumbnail
    return jpeg[:2] + segment + jpeg[2:]


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A 4.7 MB JPEG of 20000 x 20000 flat grey pixels: 1.2 GB once decoded."""
    return encode(Image.new("L", (20000, 20000), 128), "JPEG")


@pytest.mark.parametrize("name", list(variants()))
def test_real_images_pass_with_the_size_the_decoder_reports(name):
    from ssd_train.data.dali import Preprocessor

    data = variants()[name]
    info = inspect_image(data)
    assert info.format == ("PNG" if "png" in name else "JPEG")
    assert info.size == len(data)
    _, sizes = Preprocessor(batch_size=1)([data])  # DALI decodes it, and agrees on (height, width)
    assert sizes.tolist() == [[info.height, info.width]]


def test_padding_and_appended_data_after_the_image_are_allowed():
    jpeg, png = variants()["jpeg"], variants()["png"]
    assert inspect_image(jpeg + bytes(1000)).size == len(jpeg)
    assert inspect_image(png + bytes(1000)).size == len(png)
    assert inspect_image(jpeg + b"MP4 video of a motion photo").size == len(jpeg)


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_images_are_refused(cut):
    for name, data in variants().items():
        with pytest.raises(ImageRejected, match="cannot decode image: (truncated|corrupt)"):
            inspect_image(data[:int(len(data) * cut)] + bytes(64))  # zero padding does not hide a cut


def test_a_truncated_jpeg_is_not_completed_by_its_thumbnail():
    jpeg = with_thumbnail(variants()["jpeg"], variants()["grayscale jpeg"])
    assert inspect_image(jpeg).size == len(jpeg)
    with pytest.raises(ImageRejected, match="truncated JPEG"):
        inspect_image(jpeg[:-5000])


def test_corrupt_structure_is_refused():
    png = bytearray(variants()["png"])
    png[len(png) // 2] ^= 0xFF
    with pytest.raises(ImageRejected, match="bad CRC in its IDAT chunk"):
        inspect_image(bytes(png))
    with pytest.raises(ImageRejected, match="bad marker structure"):
        inspect_image(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 8)
    with pytest.raises(ImageRejected, match="not a JPEG or PNG"):
        inspect_image(encode(skimage.data.chelsea(), "BMP"))
    with pytest.raises(ImageRejected, match="empty image"):
        inspect_image(b"")


def test_a_decompression_bomb_is_refused_from_its_header_alone(bomb):
    assert len(bomb) < 5 * 2**20
    start = time.perf_counter()
    with pytest.raises(ImageRejected, match=r"20000x20000 pixels \(400.0 MP\), over the limit of 40.0 MP per image "
                                            r"\(max_image_pixels\)"):
        check_image(bomb, ImageLimits())
    assert time.perf_counter() - start < 1.0  # nothing decoded 1.2 GB here
    assert check_image(bomb, ImageLimits(max_pixels=400_000_000)).width == 20000


def test_limits_on_encoded_bytes_per_image_and_per_request():
    jpeg = variants()["jpeg"]
    with pytest.raises(ImageRejected, match=r"over the limit of 0.1 MiB per image \(max_image_bytes\)"):
        check_image(jpeg, ImageLimits(max_image_bytes=100_000))
    batch = np.zeros((3, len(jpeg)), np.uint8)
    batch[:] = np.frombuffer(jpeg, np.uint8)
    assert len(check_request(batch, ImageLimits())) == 3
    with pytest.raises(ImageRejected, match=r"request of 3 x \d+ bytes .* per request \(max_request_bytes\)"):
        check_request(batch, ImageLimits(max_request_bytes=batch.nbytes - 1))


def test_the_first_bad_input_of_a_request_is_named():
    good, bad = variants()["png"], variants()["jpeg"][:1000]
    batch = np.zeros((2, len(good)), np.uint8)
    batch[0, :len(good)] = np.frombuffer(good, np.uint8)
    batch[1, :len(bad)] = np.frombuffer(bad, np.uint8)
    with pytest.raises(ImageRejected, match="^input 1: cannot decode image"):
        check_request(batch, ImageLimits())
    with pytest.raises(ImageRejected, match="B x L uint8"):
        check_request(batch.astype(np.float32), ImageLimits())


def test_limits_round_trip_through_config_parameters():
    limits = ImageLimits(max_pixels=1, max_image_bytes=2, max_request_bytes=3)
    parameters = {key: {"string_value": value} for key, value in limits.as_parameters().items()}
    assert ImageLimits.from_parameters(parameters) == limits
    assert ImageLimits.from_parameters({}) == ImageLimits()
