"""COCO mAP through the server: every image of a COCO-layout split goes through the served ensemble
(concurrently, with the asyncio client) and pycocotools scores the detections, exactly as
`ssd-train evaluate` scores the in-process model (`ssd_common.coco_eval`, shared by both): boxes, and
for Mask R-CNN its masks too.

Images that fail (unreadable, rejected by the server, unanswered after the client's retries) are listed
and left out of the score, up to `max_failures` of them. A request the server rejects (or that holds an
unreadable file) is sent again image by image, so one bad image does not take the others with it."""

from __future__ import annotations

import asyncio
import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ssd_client.aio import DEFAULT_CONCURRENCY, AsyncSSDClient, gather_or_cancel
from ssd_client.balance import open_async_client
from ssd_client.errors import ServerUnavailableError, SSDClientError
from ssd_client.images import chunks
from ssd_common.coco_eval import coco_evaluate, detection_records, segmentation_records
from ssd_common.layout import CocoSplit, split_images
from ssd_common.layout import DatasetError as LayoutError

DEFAULT_BATCH_SIZE = 8  # images per request: with a few requests in flight the server batches them further
DEFAULT_MAX_FAILURES = 10  # a few unreadable files should not end a run over thousands of images


class DatasetError(SSDClientError):
    """A dataset directory that is not in COCO layout."""


@dataclass(frozen=True)
class SplitImages:
    """The images of one split of a COCO-layout dataset (`DIR/annotations/instances_{split}.json` and
    `DIR/{split}/`, as `ssd_train.data.coco` reads it), sorted by image id."""

    annotation_file: Path
    images: list[tuple[int, Path]]  # (image id, file)


def load_split(root, split: str) -> SplitImages:
    try:
        coco_split = CocoSplit(Path(root), split)
        images = split_images(coco_split)
    except LayoutError as err:
        raise DatasetError(str(err)) from None
    if not images:
        raise DatasetError(f"{coco_split.annotation_file} lists no images")
    return SplitImages(coco_split.annotation_file, images)


async def collect_detections(client: AsyncSSDClient, images: list[tuple[int, Path]], batch_size: int,
                             progress: bool = True, max_failures: int = DEFAULT_MAX_FAILURES,
                             threshold: float = 0.0) -> tuple[list[tuple[int, list]], list[dict]]:
    """(image id, detections with score >= threshold) for each answered image of `images`, in their order,
    detected by the server in requests of `batch_size` images, and the images that failed ([{"image_id",
    "image", "error"}], by image id). More than `max_failures` failed images stop the run with an
    SSDClientError. `ssd-client detect` reports its images through this too."""
    bar = tqdm(total=len(images), desc="evaluate", unit="img", disable=not progress, mininterval=1)
    failures = []

    async def detect_chunk(chunk) -> list[tuple[int, list]]:
        try:
            # Files are read once a request slot is free.
            found = await client.detect([path for _, path in chunk], threshold)
        except SSDClientError as err:
            if len(chunk) > 1 and not isinstance(err, ServerUnavailableError):
                # One bad image fails its whole request: ask again image by image to find it.
                return [answer for item in chunk for answer in await detect_chunk([item])]
            failed(chunk, err)
            return []
        bar.update(len(chunk))
        return [(image_id, detections) for (image_id, _), detections in zip(chunk, found)]

    def failed(chunk, err: SSDClientError) -> None:
        failures.extend({"image_id": image_id, "image": str(path), "error": str(err)} for image_id, path in chunk)
        bar.update(len(chunk))
        if len(failures) > max_failures:
            raise SSDClientError(f"too many failed images ({len(failures)}, at most {max_failures} allowed); "
                                 f"the last: {err}")

    await client.open()
    try:
        parts = await gather_or_cancel(detect_chunk(chunk) for _, chunk in chunks(images, batch_size))
    finally:
        bar.close()
    return [answer for part in parts for answer in part], sorted(failures, key=lambda f: f["image_id"])


def box_records(found: list[tuple[int, list]]) -> list[dict]:
    """COCO bbox result records of `collect_detections`' answers."""
    return [record for image_id, detections in found
            for record in detection_records(image_id, [d.box for d in detections], [d.score for d in detections],
                                            [d.category_id for d in detections])]


def mask_records(found: list[tuple[int, list]]) -> list[dict]:
    """COCO segm result records (the masks' RLE as the server sent it) of `collect_detections`' answers."""
    return [record for image_id, detections in found
            for record in segmentation_records(image_id, [d.rle for d in detections], [d.score for d in detections],
                                               [d.category_id for d in detections])]


async def evaluate_split_async(data, split: str = "val2017", batch_size: int = DEFAULT_BATCH_SIZE,
                               progress: bool = True, max_failures: int = DEFAULT_MAX_FAILURES,
                               **client_options) -> dict:
    split_images = load_split(data, split)
    # Masks go to pycocotools as the RLE the server sent: decoding them would only cost time and memory.
    async with open_async_client(batch_size=batch_size, decode_masks=False, **client_options) as client:
        found, failures = await collect_detections(client, split_images.images, client.batch_size, progress,
                                                   max_failures)
        masks = client.spec.masks
    failed = {failure["image_id"] for failure in failures}
    answered = [image_id for image_id, _ in split_images.images if image_id not in failed]
    if not answered:
        raise SSDClientError(f"no image of {split} was answered: {failures[0]['error']}")
    # Failed images are left out of the score (they have no answer, not an empty one).
    image_ids = answered if failures else None
    annotations = _load_annotations(split_images.annotation_file)  # once for both scores
    details = {"images": len(answered), "detections": sum(len(detections) for _, detections in found),
               "failures": failures, "url": client.url}
    bbox = coco_evaluate(annotations, box_records(found), image_ids)
    if not masks:
        return {**bbox, **details}
    try:
        segm = coco_evaluate(annotations, mask_records(found), image_ids, iou_type="segm")
    except ValueError as err:  # ground truth without masks
        raise DatasetError(f"{split_images.annotation_file}: {err}") from None
    return {"bbox_mAP": bbox["mAP"], "segm_mAP": segm["mAP"], "bbox": bbox, "segm": segm,
            "summary": f"bbox:\n{bbox['summary']}segm:\n{segm['summary']}", **details}


def _load_annotations(annotation_file: Path):
    """A COCO object, loaded quietly (pycocotools prints its progress)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotation_file))


def evaluate_split(data, split: str = "val2017", url: str | None = None, protocol: str = "http",
                   concurrency: int = DEFAULT_CONCURRENCY, batch_size: int = DEFAULT_BATCH_SIZE,
                   progress: bool = True, max_failures: int = DEFAULT_MAX_FAILURES, **client_options) -> dict:
    """{"mAP", "stats" (the 12 COCO numbers), "summary" (pycocotools' text), "images" (scored), "detections",
    "failures" ([{"image_id", "image", "error"}]: left out of the score), "url"}; from a model with masks
    (Mask R-CNN) "bbox_mAP", "segm_mAP", "bbox" and "segm" (each {"mAP", "stats", "summary"}) in place of
    "mAP" and "stats", as `ssd-train evaluate` gives them. Up to `max_failures` images may fail
    (unreadable, rejected by the server, unanswered after retries). `client_options` go to
    `AsyncSSDClient` (model, timeout, shared_memory, retries, retry_backoff)."""
    return asyncio.run(evaluate_split_async(data, split, batch_size, progress, max_failures, url=url,
                                            protocol=protocol, concurrency=concurrency, **client_options))
