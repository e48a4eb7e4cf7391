"""Instance masks as COCO run-length encoding (RLE), the form COCO segm results and our detections carry.

An RLE is {"size": [height, width], "counts": ...}: run lengths over the mask in column-major order,
starting with a run of zeros. "counts" is either COCO's compressed string or a plain list of runs.
Encoding goes through pycocotools; decoding is done here, because pycocotools' decoder does not check
that the runs cover the mask (counts "0" for a 5x7 mask decodes to uninitialised memory). No torch.
"""

from __future__ import annotations

import numpy as np


def encode_mask(mask: np.ndarray) -> dict:
    """A bool/uint8 (H, W) mask -> COCO RLE {"size": [h, w], "counts": str} (a str so it goes into JSON)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (height, width), not shape {mask.shape}")
    import pycocotools.mask as mask_util  # here, not at the top: the toolkit imports without pycocotools

    rle = mask_util.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_masks(masks: np.ndarray) -> list[bytes]:
    """N bool/uint8 (H, W) masks of one image -> each one's compressed COCO RLE counts (bytes), in one
    pycocotools call; the size is the image's."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be 3-D (n, height, width), not shape {masks.shape}")
    if len(masks) == 0:
        return []
    import pycocotools.mask as mask_util  # here, not at the top: the toolkit imports without pycocotools

    rles = mask_util.encode(np.asfortranarray((masks != 0).transpose(1, 2, 0), dtype=np.uint8))
    return [rle["counts"] for rle in rles]


def encode_cropped_mask(crop: np.ndarray, top: int, left: int, height: int, width: int) -> bytes:
    """The compressed COCO RLE counts of a height x width mask that is `crop` (bool) at row `top`, column
    `left` and zero elsewhere, made from the crop alone: the work follows the crop's area, not the image's.
    The crop must lie inside the mask. The same bytes as `encode_masks` of the whole mask."""
    crop = np.asarray(crop, dtype=bool)
    rows, cols = crop.shape
    if top < 0 or left < 0 or top + rows > height or left + cols > width:
        raise ValueError(f"a {rows}x{cols} crop at ({top}, {left}) does not fit a {height}x{width} mask")
    import pycocotools.mask as mask_util  # here, not at the top: the toolkit imports without pycocotools

    columns, crop_rows = np.nonzero(crop.T)  # the mask's pixels in column-major order
    positions = (left + columns.astype(np.int64)) * height + top + crop_rows
    if positions.size == 0:
        runs = [height * width]
    else:
        breaks = np.flatnonzero(np.diff(positions) != 1)
        starts = positions[np.r_[0, breaks + 1]]
        ends = positions[np.r_[breaks, positions.size - 1]] + 1
        counts = np.empty(2 * len(starts) + 1, np.int64)
        counts[0::2] = np.r_[starts, height * width] - np.r_[0, ends]  # the zeros before each run and after all
        counts[1::2] = ends - starts
        runs = counts[:-1].tolist() if counts[-1] == 0 else counts.tolist()  # pycocotools ends with the last run
    return mask_util.frPyObjects({"counts": runs, "size": [height, width]}, height, width)["counts"]


def decode_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed counts as str or bytes, or a list of runs) -> bool (H, W) mask.
    Malformed input raises ValueError with a one-line message."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (TypeError, KeyError, ValueError):
        raise ValueError("malformed RLE: needs 'size' [height, width] and 'counts'") from None
    if height < 0 or width < 0:
        raise ValueError(f"malformed RLE: negative size {[height, width]}")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        runs = _runs_from_string(counts)
    elif isinstance(counts, (list, tuple)) and all(isinstance(c, (int, np.integer)) for c in counts):
        runs = [int(c) for c in counts]
    else:
        raise ValueError("malformed RLE: 'counts' must be a string, bytes or a list of integers")
    if any(r < 0 for r in runs):
        raise ValueError("malformed RLE: a negative run length")
    if sum(runs) != height * width:
        raise ValueError(f"malformed RLE: runs cover {sum(runs)} pixels, the mask has {height * width}")
    values = np.arange(len(runs)) % 2 == 1  # runs alternate 0, 1, 0, ...
    return np.repeat(values, runs).reshape(width, height).T


def _runs_from_string(text: str) -> list[int]:
    """COCO's compressed counts (pycocotools maskApi.c rleFrString): each run in 5-bit groups, ASCII
    offset 48, bit 0x20 = more groups follow, 0x10 of the last group = negative; from the third run
    on, each is stored as the difference to the run two before."""
    runs: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                raise ValueError("malformed RLE: compressed counts end in the middle of a run")
            group = ord(text[pos]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"malformed RLE: character {text[pos]!r} in compressed counts")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs
