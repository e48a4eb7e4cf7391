"""COCO mAP through the server: every image of a COCO-layout split goes through the served ensemble
(concurrently, with the asyncio client) and pycocotools scores the detections, exactly as
`ssd-train evaluate` scores the in-process model (`ssd_train.coco_eval`, shared by both)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ssd_client.aio import DEFAULT_CONCURRENCY, AsyncSSDClient, gather_or_cancel
from ssd_client.errors import SSDClientError
from ssd_client.images import chunks
from ssd_train.coco_eval import coco_evaluate, detection_records
from ssd_train.data.layout import CocoSplit, split_images
from ssd_train.data.layout import DatasetError as LayoutError

DEFAULT_BATCH_SIZE = 8  # images per request: with a few requests in flight the server batches them further


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


async def collect_records(client: AsyncSSDClient, images: list[tuple[int, Path]], batch_size: int,
                          progress: bool = True) -> list[dict]:
    """COCO result records for `images`, detected by the server in requests of `batch_size` images."""
    bar = tqdm(total=len(images), desc="evaluate", unit="img", disable=not progress, mininterval=1)

    async def detect_chunk(chunk) -> list[dict]:
        found = await client.detect([path for _, path in chunk])  # files are read once a request slot is free
        bar.update(len(chunk))
        records = []
        for (image_id, _), detections in zip(chunk, found):
            records += detection_records(image_id, [d.box for d in detections], [d.score for d in detections],
                                         [d.category_id for d in detections])
        return records

    await client.open()
    try:
        parts = await gather_or_cancel(detect_chunk(chunk) for _, chunk in chunks(images, batch_size))
    finally:
        bar.close()
    return [record for part in parts for record in part]


async def evaluate_split_async(data, split: str = "val2017", batch_size: int = DEFAULT_BATCH_SIZE,
                               progress: bool = True, **client_options) -> dict:
    split_images = load_split(data, split)
    async with AsyncSSDClient(batch_size=batch_size, **client_options) as client:
        records = await collect_records(client, split_images.images, client.batch_size, progress)
    result = coco_evaluate(split_images.annotation_file, records)
    return {**result, "images": len(split_images.images), "detections": len(records), "url": client.url}


def evaluate_split(data, split: str = "val2017", url: str | None = None, protocol: str = "http",
                   concurrency: int = DEFAULT_CONCURRENCY, batch_size: int = DEFAULT_BATCH_SIZE,
                   progress: bool = True, **client_options) -> dict:
    """{"mAP", "stats" (the 12 COCO numbers), "summary" (pycocotools' text), "images", "detections", "url"}.
    `client_options` go to `AsyncSSDClient` (model, timeout, shared_memory)."""
    return asyncio.run(evaluate_split_async(data, split, batch_size, progress, url=url, protocol=protocol,
                                            concurrency=concurrency, **client_options))
