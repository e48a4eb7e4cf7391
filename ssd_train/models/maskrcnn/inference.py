"""Mask R-CNN inference, shared by evaluation, prediction and benchmarks: images in, boxes, scores,
labels and instance masks at each image's own size out; COCO bbox + segm results and their scores
(with NVIDIA's result files bbox.json / segm.json); a predictor for encoded images.

The model is torchvision's MaskRCNN in eval mode: it takes float [3, H, W] images in [0, 1] of any
sizes, resizes and normalises them itself, and returns boxes in input pixels and mask probabilities
pasted at the input size (`detect`). Evaluation and prediction want each mask as COCO RLE, and take them
from `detect_rle`, which pastes and encodes each mask from its box's region only: the same bytes for a
fraction of the work.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from ssd_common.coco_eval import coco_evaluate, detection_records, segmentation_records
from ssd_common.labels import LabelMap
from ssd_train.files import atomic_write
from ssd_train.inference import autocast, category_lookup
from ssd_train.models.maskrcnn.model import resized_size
from ssd_train.serving.image_check import MAX_IMAGE_PIXELS

MASK_THRESHOLD = 0.5  # maskrcnn-benchmark's / torchvision's paste threshold: pixel in the mask if prob > 0.5


class ImageError(ValueError):
    """An encoded image that cannot be decoded or is over the pixel cap; the message says which."""


@torch.no_grad()
def detect(model: torch.nn.Module, images: list[torch.Tensor], amp: bool = False) -> list[dict]:
    """Float [3, H, W] images in [0, 1] on the model's device -> per image, best first, on the CPU:
    {"boxes" float32 [N, 4] xyxy input pixels, "scores" float32 [N], "labels" int64 [N] (contiguous),
    "masks" bool [N, H, W] at that image's size}. An image too thin for the model's resize (a side would
    become 0 pixels, which torchvision cannot resize to) has no detections, as the served model gives it."""
    found = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, *image.shape[-2:], dtype=torch.bool)} for image in images]
    kept = _resizable(model, images)
    if not kept:
        return found
    with autocast(images[0].device, amp):
        outputs = model([images[i] for i in kept])
    if isinstance(outputs, tuple):  # a scripted MaskRCNN returns (losses, detections)
        outputs = outputs[1]
    for i, out in zip(kept, outputs):
        order = out["scores"].argsort(descending=True, stable=True)
        found[i] = {"boxes": out["boxes"][order].float().cpu(),
                    "scores": out["scores"][order].float().cpu(),
                    "labels": out["labels"][order].cpu(),
                    "masks": (out["masks"][order, 0] > MASK_THRESHOLD).cpu()}
    return found


@torch.no_grad()
def detect_rle(model: torch.nn.Module, images: list[torch.Tensor], amp: bool = False) -> list[dict]:
    """`detect` with each mask as its compressed COCO RLE counts ("rles", bytes, at the image's size) in
    place of "masks": the same detections, masks bit for bit, made as the served ensemble makes them. The
    model's own transform, backbone, RPN and RoI heads run (`export.ServedMaskRCNN`), then each 28x28 mask
    is pasted and encoded from its box's region alone (`export.postprocess_rle`) instead of as an
    image-sized mask per detection (at 800x1333 pixels, 100 of them are 427 MB of probabilities per image,
    then thresholded, copied to the host and run-length encoded whole). What evaluation and prediction
    run. With `amp`, the boxes are scaled to the image in float32, where torchvision scales them in the
    half-precision type they come in, so they and their masks may differ by that rounding."""
    from ssd_train.models.maskrcnn.export import ServedMaskRCNN, postprocess_rle

    found = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
              "rles": []} for _ in images]
    kept = _resizable(model, images)
    if not kept:
        return found
    with autocast(images[0].device, amp):
        batch, _ = model.transform([images[i] for i in kept])
        resized = torch.tensor(batch.image_sizes, dtype=torch.int64)
        outputs = ServedMaskRCNN(model)(batch.tensors, resized)
    originals = [tuple(images[i].shape[-2:]) for i in kept]
    for i, one in zip(kept, postprocess_rle(*outputs, resized, originals)):
        found[i] = one
    return found


def _resizable(model: torch.nn.Module, images: list[torch.Tensor]) -> list[int]:
    """The indices of the images the model's resize keeps at least a pixel high and wide."""
    sizes = (int(model.transform.min_size[-1]), int(model.transform.max_size))
    return [i for i, image in enumerate(images) if 0 not in resized_size(*image.shape[-2:], *sizes)]


def rle_record(counts: bytes, height: int, width: int) -> dict:
    """Compressed RLE counts of a height x width mask -> COCO's {"size", "counts": str} (JSON-ready)."""
    return {"size": [int(height), int(width)], "counts": counts.decode("ascii")}


def result_records(image_id: int, found: dict, size: tuple[int, int], category_ids: torch.Tensor
                   ) -> tuple[list[dict], list[dict]]:
    """COCO bbox and segm result records of one image's `detect_rle` output; `size`: the image's (height,
    width); `category_ids` maps contiguous labels to dataset category ids (`category_lookup`)."""
    categories = category_ids.cpu()[found["labels"]].numpy()
    scores = found["scores"].numpy()
    masks = [rle_record(counts, *size) for counts in found["rles"]]
    return (detection_records(image_id, found["boxes"].numpy(), scores, categories),
            segmentation_records(image_id, masks, scores, categories))


def collect_results(model, loader, label_map: LabelMap, device, amp: bool = False,
                    progress: bool = True) -> tuple[list[dict], list[dict]]:
    """COCO bbox and segm result records of every image the loader yields; the loader yields
    (images: list of float [3, H, W] CPU tensors in [0, 1], image_ids)."""
    model.eval()
    to_category = category_lookup(label_map, "cpu")
    bbox: list[dict] = []
    segm: list[dict] = []
    for images, image_ids in tqdm(loader, desc="evaluate", unit="batch", disable=not progress,
                                  mininterval=2, leave=False):
        found = detect_rle(model, [image.to(device, non_blocking=True) for image in images], amp)
        for image, image_id, one in zip(images, image_ids, found):
            boxes, masks = result_records(int(image_id), one, tuple(image.shape[-2:]), to_category)
            bbox += boxes
            segm += masks
    return bbox, segm


def evaluate_model(model, loader, label_map: LabelMap, annotation_file, device, amp: bool = False,
                   progress: bool = True, results_dir=None) -> dict | None:
    """{"bbox_mAP", "segm_mAP", "bbox", "segm" (coco_evaluate results), "summary" (text of both)} on
    rank 0, None on other ranks (each collects its shard, rank 0 gathers and scores). With
    `results_dir`, rank 0 also writes the COCO result files bbox.json and segm.json there."""
    bbox, segm = collect_results(model, loader, label_map, device, amp, progress)
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((bbox, segm), gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        bbox = [r for part_bbox, _ in gathered for r in part_bbox]
        segm = [r for _, part_segm in gathered for r in part_segm]
    if results_dir is not None:
        write_results(results_dir, bbox, segm)
    annotations = _load_annotations(annotation_file)
    bbox_result = coco_evaluate(annotations, bbox, iou_type="bbox")
    segm_result = coco_evaluate(annotations, segm, iou_type="segm")
    return {"bbox_mAP": bbox_result["mAP"], "segm_mAP": segm_result["mAP"],
            "bbox": bbox_result, "segm": segm_result,
            "summary": f"bbox:\n{bbox_result['summary']}segm:\n{segm_result['summary']}"}


def write_results(results_dir, bbox: list[dict], segm: list[dict]) -> None:
    """bbox.json and segm.json in `results_dir`, each written atomically."""
    for name, records in (("bbox.json", bbox), ("segm.json", segm)):
        with atomic_write(f"{results_dir}/{name}", "w") as f:
            json.dump(records, f)


def _load_annotations(annotation_file):
    """A COCO object (loaded once for both scores), quietly; an already loaded one as it is."""
    from pycocotools.coco import COCO

    if isinstance(annotation_file, COCO):
        return annotation_file
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotation_file))


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Encoded image -> float [3, H, W] in [0, 1]. The size is read from the header first: an image
    over `max_pixels` is refused before anything decodes it. Raises ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our cap decides
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(f"image is {width}x{height} ({width * height:,} pixels), "
                                     f"over the limit of {max_pixels:,} pixels")
                # upright by its EXIF orientation, as DALI's decoder (the served preprocess) turns it
                pixels = np.array(ImageOps.exif_transpose(image).convert("RGB"))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("cannot decode image: not an image format PIL reads") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"cannot decode image: {reason}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)


class MaskPredictor:
    """Encoded images (JPEG, PNG, anything PIL reads) -> detections with instance masks."""

    def __init__(self, model: torch.nn.Module, label_map: LabelMap, device: str = "cpu", amp: bool = False,
                 batch_size: int = 2, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.model = model.eval().to(device)
        self.label_map = label_map
        self.device = torch.device(device)
        self.amp = amp
        self.batch_size = batch_size
        self.max_image_pixels = max_image_pixels
        self._category = category_lookup(label_map, "cpu")

    def detect(self, images: list[bytes]) -> list[list[dict]]:
        """Per image, its detections best first: {"box" [x1, y1, x2, y2] in original pixels, "score",
        "category_id", "category_name", "mask" (COCO RLE at the image's size)}. Undecodable or
        oversized input raises ImageError."""
        results: list[list[dict]] = []
        for start in range(0, len(images), self.batch_size):
            pixels = []
            for index, data in enumerate(images[start:start + self.batch_size], start):
                try:
                    pixels.append(decode_image(data, self.max_image_pixels).to(self.device))
                except ImageError as err:
                    raise ImageError(f"image {index}: {err}") from None
            for image, found in zip(pixels, detect_rle(self.model, pixels, self.amp)):
                size = tuple(image.shape[-2:])
                results.append([
                    {"box": box, "score": score, "category_id": int(self._category[label]),
                     "category_name": self.label_map.name(label), "mask": rle_record(counts, *size)}
                    for box, score, label, counts in zip(found["boxes"].tolist(), found["scores"].tolist(),
                                                         found["labels"].tolist(), found["rles"])
                ])
        return results
