"""`ssd-client`: detections and COCO mAP from the SSD300 or Mask R-CNN ensemble served by Triton. Thin: parse,
call, report."""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path

import click

from ssd_client.aio import DEFAULT_CONCURRENCY
from ssd_client.errors import SSDClientError
from ssd_client.evaluate import DEFAULT_BATCH_SIZE, DEFAULT_MAX_FAILURES, collect_detections
from ssd_client.protocol import DEFAULT_RETRIES, DEFAULT_RETRY_BACKOFF, DEFAULT_TIMEOUT, PROTOCOLS
from ssd_common import io
from ssd_common.options import FiniteRange


MAX_TIMEOUT = 86400.0  # a day; gRPC cannot set a deadline much further out (its clock overflows)
TIMEOUT = FiniteRange(min=0, min_open=True, max=MAX_TIMEOUT)
BATCH_SIZE = click.IntRange(min=1)
MAX_CONCURRENCY = 1024  # each request in flight holds a slot (and with shared memory its regions)


def user_errors(func):
    """The client's errors are messages for the user: one line, no traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SSDClientError as err:
            raise click.ClickException(str(err)) from None
    return wrapper


def server_options(func):
    options = [
        click.option("--url", default=None, help="Server host:port [default: localhost:8000 (http), :8001 (grpc)]; "
                     "several, separated by commas, share the requests (a:8001,b:8001)."),
        click.option("--protocol", type=click.Choice(PROTOCOLS), default="http", show_default=True),
        click.option("--model", default=io.ENSEMBLE, show_default=True,
                     help=f"Served model to call: {io.ENSEMBLE} or {io.MASKRCNN_ENSEMBLE} (boxes and masks)."),
        click.option("--timeout", type=TIMEOUT, default=DEFAULT_TIMEOUT, show_default=True,
                     help="Seconds per request."),
        click.option("--shared-memory", is_flag=True,
                     help="Pass images and detections through system shared memory (server on this host, "
                          "started with `ssd-serve --allow-shared-memory`; not with masks)."),
        click.option("--retries", type=click.IntRange(min=0), default=DEFAULT_RETRIES, show_default=True,
                     help="How many times a call is tried again when the server cannot be reached, drops the "
                          "connection or is unavailable (never for a rejected image); 0: no retries."),
        click.option("--retry-backoff", type=FiniteRange(min=0), default=DEFAULT_RETRY_BACKOFF,
                     show_default=True, help="Seconds before the first retry, doubled for each further one."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Detect objects with the SSD300 or Mask R-CNN served on Triton (start it with `ssd-serve`)."""


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@server_options
@click.option("--threshold", type=FiniteRange(0, 1), default=0.3, show_default=True,
              help="Minimum score to report.")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path),
              help="labels.json of the served model (written by `ssd-train export`) [default: COCO].")
@click.option("--json", "json_lines", is_flag=True,
              help="One JSON line per detection instead of a table (with masks: the mask as COCO RLE).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write annotated copies of the images here (boxes, labels and masks).")
@click.option("--batch-size", type=BATCH_SIZE, default=None,
              help="Images per request [default: the server's max batch].")
@user_errors
def detect(images, url, protocol, model, timeout, shared_memory, retries, retry_backoff, threshold, labels,
           json_lines, output_dir, batch_size):
    """Detect objects in IMAGES (files) through the server; Mask R-CNN's table gives each mask's area.
    An image that fails (unreadable, rejected by the server) is one line on stderr and the exit status
    is 1; the other images are still reported."""
    from ssd_client.balance import open_async_client

    async def run():
        # evaluate's loop: one request at a time, and a failed request is sent again image by image.
        async with open_async_client(url, protocol=protocol, model=model, timeout=timeout, label_map=labels,
                                     batch_size=batch_size, concurrency=1, shared_memory=shared_memory,
                                     retries=retries, retry_backoff=retry_backoff) as client:
            return await collect_detections(client, list(enumerate(images)), client.batch_size, progress=False,
                                            max_failures=len(images), threshold=threshold)

    answers, failures = asyncio.run(run())
    answered = [images[index] for index, _ in answers]
    found = [detections for _, detections in answers]
    if json_lines:
        for path, detections in zip(answered, found):
            for det in detections:
                click.echo(json.dumps({"image": str(path), **det.to_dict()}))
    elif answered:
        click.echo(format_table([str(path) for path in answered], found))
    if output_dir is not None:
        failures += write_annotated(answered, found, output_dir)
    for failure in failures:
        click.echo(f"Error: {failure_line(failure)}", err=True)
    if failures:
        raise click.exceptions.Exit(1)


def failure_line(failure: dict) -> str:
    """"image: reason" of a failed image (errors about one file often start with its name already)."""
    return f"{failure['image']}: {failure['error'].removeprefix(failure['image'] + ': ')}"


def format_table(names: list[str], found) -> str:
    """One row per detection; with masks, a last column with each mask's area in pixels."""
    masks = any(det.mask is not None for detections in found for det in detections)
    width = max(len("image"), *(len(name) for name in names))
    header = f"{'image':<{width}}  {'category':<16} {'score':>6} {'x1':>8} {'y1':>8} {'x2':>8} {'y2':>8}"
    lines = [header + (f" {'mask px':>8}" if masks else "")]
    for name, detections in zip(names, found):
        if not detections:
            lines.append(f"{name:<{width}}  (no detections)")
        for det in detections:
            x1, y1, x2, y2 = det.box
            row = (f"{name:<{width}}  {det.category_name:<16} {det.score:>6.3f} "
                   f"{x1:>8.1f} {y1:>8.1f} {x2:>8.1f} {y2:>8.1f}")
            lines.append(row + (f" {int(det.mask.sum()):>8}" if masks else ""))
    return "\n".join(lines)


def write_annotated(images, found, output_dir: Path) -> list[dict]:
    """Each image with its detections drawn, into `output_dir`; the images that could not be written
    ([{"image", "error"}])."""
    from ssd_common.draw import save_annotated  # PIL only, shared with `ssd-train predict`

    failures = []
    for path, detections in zip(images, found):
        try:
            out = save_annotated(Path(path).read_bytes(), [d.to_dict() for d in detections],
                                 Path(output_dir) / Path(path).name)
        except (OSError, ValueError) as err:
            failures.append({"image": str(path), "error": f"cannot write its annotated copy: {err}"})
            continue
        click.echo(f"wrote {out}", err=True)
    return failures


@cli.command()
@click.option("--data", required=True, type=click.Path(path_type=Path), help="COCO-layout dataset directory.")
@click.option("--split", default="val2017", show_default=True)
@server_options
@click.option("--concurrency", type=click.IntRange(1, MAX_CONCURRENCY), default=DEFAULT_CONCURRENCY,
              show_default=True, help="Requests in flight.")
@click.option("--batch-size", type=BATCH_SIZE, default=None,
              help=f"Images per request [default: {DEFAULT_BATCH_SIZE}].")
@click.option("--json-summary", type=click.Path(dir_okay=False, path_type=Path),
              help="Write mAP and the 12 COCO stats (the keys of `ssd-train evaluate`), the number of images "
                   "scored and the failed ones here.")
@click.option("--max-failures", type=click.IntRange(min=0), default=DEFAULT_MAX_FAILURES, show_default=True,
              help="Images that may fail (unreadable, rejected by the server, unanswered after the retries) before "
                   "the evaluation stops; failed images are listed and left out of the score. 0: stop at the "
                   "first failure.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@user_errors
def evaluate(data, split, url, protocol, model, timeout, shared_memory, retries, retry_backoff, concurrency,
             batch_size, json_summary, max_failures, progress):
    """COCO mAP of the served model on a split (every image goes through the server): bbox, and for
    Mask R-CNN bbox and segm (masks)."""
    from ssd_client.evaluate import evaluate_split
    from ssd_common.coco_eval import write_instance_summary, write_summary

    result = evaluate_split(data, split, url, protocol, concurrency, batch_size or DEFAULT_BATCH_SIZE, progress,
                            max_failures, model=model, timeout=timeout, shared_memory=shared_memory,
                            retries=retries, retry_backoff=retry_backoff)
    failures = result["failures"]
    click.echo(result["summary"].rstrip())
    if failures:
        click.echo(f"{len(failures)} images failed and are left out of the score:")
        for failure in failures:
            click.echo(f"  {failure_line(failure)}")
    failed = f", {len(failures)} failed" if failures else ""
    masks = "segm" in result
    if masks:
        score = f"bbox mAP {result['bbox_mAP']:.4f}, mask mAP {result['segm_mAP']:.4f}"
    else:
        score = f"mAP {result['mAP']:.4f}"
    click.echo(f"{score} ({result['images']} images{failed}, {result['detections']} detections "
               f"from {model} at {result['url']} over {protocol})")
    if json_summary:
        # The keys of `ssd-train evaluate` for the same detector, and where the numbers come from.
        extra = {"split": split, "model": model, "url": result["url"], "images": result["images"],
                 "failures": failures}
        if masks:
            write_instance_summary(json_summary, result["bbox"], result["segm"], **extra)
        else:
            write_summary(json_summary, result, **extra)


@cli.command()
@click.option("--url", default=None, help="Server host:port [default: localhost:8000 (http), :8001 (grpc)].")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="http", show_default=True)
@click.option("--timeout", type=TIMEOUT, default=10.0, show_default=True, help="Seconds per call.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@user_errors
def status(url, protocol, timeout, as_json):
    """The server's state and, for each model it holds (ensembles and their steps), its state and figures
    since the server started: requests, failures, images, batches run and images per batch (whether
    dynamic batching batches), and the mean milliseconds a request spends queued, computing and in all."""
    from ssd_client.status import format_status, server_status

    found = server_status(url, protocol, timeout)
    click.echo(json.dumps(found) if as_json else format_status(found))


def main():
    cli(prog_name="ssd-client")


if __name__ == "__main__":
    main()
