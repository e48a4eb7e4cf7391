"""Annotated images: detection boxes and labels drawn on the original picture, instance masks (when a
detection has one) as translucent overlays. PIL and numpy only (no torch), shared by `ssd-train predict`
and `ssd-client detect`."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ssd_common.masks import decode_mask

_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40))
MASK_OPACITY = 0.45


def draw_detections(image: Image.Image, detections: list[dict]) -> Image.Image:
    """A copy of `image` with each detection's box (`box` [x1, y1, x2, y2] pixels), name and score, and
    its `mask` (COCO RLE at the image's size, optional) as a translucent overlay under the boxes."""
    image = image.convert("RGB")
    for det in detections:
        if det.get("mask") is not None:
            _overlay_mask(image, decode_mask(det["mask"]), _PALETTE[int(det["category_id"]) % len(_PALETTE)])
    draw = ImageDraw.Draw(image)
    width = max(2, round(min(image.size) / 200))
    for det in detections:
        colour = _PALETTE[int(det["category_id"]) % len(_PALETTE)]
        x1, y1, x2, y2 = det["box"]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        text = f"{det.get('category_name', det['category_id'])} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        draw.rectangle((left, top, right + 2, bottom), fill=colour)
        draw.text((x1 + 1, y1), text, fill=(0, 0, 0))
    return image


def _overlay_mask(image: Image.Image, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Blend `colour` into `image` (in place) where the bool (H, W) `mask` is set."""
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, the image {image.width}x{image.height}")
    alpha = Image.fromarray((mask * round(255 * MASK_OPACITY)).astype(np.uint8))  # mode "L"
    image.paste(Image.new("RGB", image.size, colour), (0, 0), alpha)


def save_annotated(image_bytes: bytes, detections: list[dict], out: Path) -> Path:
    """Draw on the decoded `image_bytes` and save to `out` (format from its suffix, JPEG/PNG)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(image_bytes)) as image:
        # boxes are in the upright frame: the servers' and predict's decoders apply the EXIF orientation
        draw_detections(ImageOps.exif_transpose(image), detections).save(out)
    return out
