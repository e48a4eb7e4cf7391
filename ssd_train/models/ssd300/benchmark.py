"""`ssd-train benchmark --model ssd300`: training and inference throughput (images/s) in the format of
NVIDIA's SSD README tables.

Inference timing covers what the reference's does: host-to-device copy of a uint8 batch,
normalisation and the forward pass (no decode/NMS). Training timing covers a whole `train_step`
(the same function `fit` runs: forward, loss, backward, optimizer step). Data comes from a
COCO-layout dataset (`data_dir`) or is synthetic (random pixels; boxes from the shapes generator's
size range) -- the model's cost does not depend on the pixel values.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ssd_train.benchmark import time_iterations
from ssd_train.data import IMAGENET_MEAN, IMAGENET_STD
from ssd_train.inference import autocast
from ssd_train.models.ssd300.boxes import SSD300, encode, match, postprocess
from ssd_train.models.ssd300.loss import SSDLoss
from ssd_train.models.ssd300.model import build_model
from ssd_train.models.ssd300.train import parameter_groups, train_step
from ssd_train.train import make_grad_scaler, set_math_modes


@dataclass
class BenchmarkResult:
    mode: str
    batch_size: int
    precision: str  # "fp32" (TF32 math where enabled and supported) or "amp"
    seconds: list[float]  # duration of each timed iteration
    postprocess_seconds: list[float] | None = None  # inference: decode + NMS of the same batch

    @property
    def throughput(self) -> float:
        """Images per second over all timed iterations (total images / total time)."""
        return self.batch_size * len(self.seconds) / sum(self.seconds)

    def summary(self) -> dict:
        per_iteration = [self.batch_size / s for s in self.seconds]
        summary = {"batch_size": self.batch_size, "precision": self.precision,
                   "throughput_mean": self.throughput, "throughput_median": statistics.median(per_iteration),
                   "throughput_min": min(per_iteration), "throughput_max": max(per_iteration),
                   "latency_mean_ms": 1000 * statistics.fmean(self.seconds), "iterations": len(self.seconds)}
        if self.postprocess_seconds:
            summary["postprocess_mean_ms"] = 1000 * statistics.fmean(self.postprocess_seconds)
            summary["postprocess_share"] = statistics.fmean(self.postprocess_seconds) / statistics.fmean(self.seconds)
        return summary


def normalize_on_device(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW (channels_last memory), ImageNet-normalised, on the images' device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images_uint8.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images_uint8.device).view(1, 3, 1, 1) * 255
    return (images_uint8.permute(0, 3, 1, 2).float() - mean) / std


def synthetic_images(batch_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = SSD300.fig_size
    return torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=generator)


def synthetic_targets(batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded targets of 1-4 random boxes per image (so the loss has positives to work on)."""
    generator = torch.Generator().manual_seed(seed)
    offsets, labels = [], []
    for _ in range(batch_size):
        count = int(torch.randint(1, 5, (), generator=generator))
        low = torch.rand(count, 2, generator=generator) * 0.6
        size = 0.1 + torch.rand(count, 2, generator=generator) * 0.3
        boxes, image_labels = match(torch.cat([low, low + size], 1), torch.randint(1, 81, (count,), generator=generator))
        offsets.append(encode(boxes))
        labels.append(image_labels)
    return torch.stack(offsets), torch.stack(labels)


def benchmark_inference(model: torch.nn.Module, batch_size: int, device: torch.device, amp: bool, warmup: int,
                        iterations: int, channels_last: bool = True, images: torch.Tensor | None = None,
                        time_postprocess: bool = True) -> BenchmarkResult:
    """`time_postprocess`: also time decode + NMS of the last batch's outputs (of an untrained model at batch
    64 that costs more than the forward pass, so a sweep of many variants may leave it out)."""
    model.eval()
    host = images if images is not None else synthetic_images(batch_size)
    if device.type == "cuda":
        host = host.pin_memory()

    outputs = []

    @torch.no_grad()
    def step():
        batch = normalize_on_device(host.to(device, non_blocking=True))
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            outputs[:] = model(batch)

    seconds = time_iterations(step, warmup, iterations, device)
    if not time_postprocess:
        return BenchmarkResult("inference", batch_size, "amp" if amp else "fp32", seconds)
    # Decode + NMS timed apart (the reference's figure excludes it): the cost it adds to serving.
    locs, scores = (t.float() for t in outputs)
    post = time_iterations(lambda: postprocess(locs, scores), min(warmup, 2), iterations, device)
    return BenchmarkResult("inference", batch_size, "amp" if amp else "fp32", seconds, post)


def benchmark_training(model: torch.nn.Module, batch_size: int, device: torch.device, amp: bool, warmup: int,
                       iterations: int, channels_last: bool = True, batches=None) -> BenchmarkResult:
    """`batches`: an iterator of (images, offsets, labels) like the training loaders yield; synthetic when None."""
    model.train()
    optimizer = torch.optim.SGD(parameter_groups(model, 5e-4), lr=1e-3, momentum=0.9)
    scaler = make_grad_scaler(str(device), amp)
    loss_fn = SSDLoss()
    if batches is None:
        images = normalize_on_device(synthetic_images(batch_size))
        fixed = (images, *synthetic_targets(batch_size))
        batches = iter(lambda: fixed, None)

    def step():
        train_step(model, loss_fn, optimizer, scaler, next(batches), device, amp, channels_last)

    return BenchmarkResult("training", batch_size, "amp" if amp else "fp32",
                           time_iterations(step, warmup, iterations, device))


def prepare_model(backbone: str, device: torch.device, channels_last: bool, compile_model: bool,
                  num_classes: int = 81) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(backbone, num_classes).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile_model else model


def run_sweep(mode: str, batch_sizes: list[int], precisions: list[bool], device: torch.device, backbone: str,
              warmup: int, iterations: int, tf32: bool, channels_last: bool, compile_model: bool = False,
              data_dir=None, data_backend: str = "pytorch", progress=None) -> list[BenchmarkResult]:
    set_math_modes(tf32)
    model = prepare_model(backbone, device, channels_last, compile_model)
    results = []
    for batch_size in batch_sizes:
        data = _real_data(mode, data_dir, data_backend, batch_size, device) if data_dir else None
        for amp in precisions:
            if mode == "inference":
                result = benchmark_inference(model, batch_size, device, amp, warmup, iterations, channels_last, data)
            else:
                result = benchmark_training(model, batch_size, device, amp, warmup, iterations, channels_last, data)
            results.append(result)
            if progress:
                progress(result)
    return results


def _real_data(mode: str, data_dir, data_backend: str, batch_size: int, device: torch.device):
    """Inference: one batch of real val images as uint8 NHWC 300x300; training: an endless iterator
    of loader batches."""
    from ssd_train.data.loaders import build_train_loader

    if mode == "inference":
        import numpy as np
        from PIL import Image

        from ssd_train.data.coco import CocoDetection

        dataset = CocoDetection(Path(data_dir), "val2017", skip_empty=False)
        picks = [i % len(dataset) for i in range(batch_size)]
        arrays = [np.asarray(dataset.load_image(i).resize((SSD300.fig_size,) * 2, Image.BILINEAR)) for i in picks]
        return torch.from_numpy(np.stack(arrays))

    loader = build_train_loader(data_backend, data_dir, "train2017", batch_size, device=str(device))

    def forever():
        epoch = 0
        while True:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    return forever()


def result_line(result: BenchmarkResult) -> str:
    s = result.summary()
    line = (f"batch {s['batch_size']:>3} {s['precision']:>4}: mean {s['throughput_mean']:.2f} img/s, "
            f"median {s['throughput_median']:.2f}, min {s['throughput_min']:.2f}, "
            f"max {s['throughput_max']:.2f}, latency {s['latency_mean_ms']:.1f} ms")
    if "postprocess_mean_ms" in s:
        line += f"; decode+NMS {s['postprocess_mean_ms']:.1f} ms ({100 * s['postprocess_share']:.1f}% of the forward)"
    return line


def write_summary(path, results: list[BenchmarkResult], **context) -> None:
    """The JSON summary (`tools/perf_sweep.py --compare-in-process` reads it): context + per-run results."""
    Path(path).write_text(json.dumps({**context, "results": [r.summary() for r in results]}, indent=1) + "\n")


def sweep_table(results: list[BenchmarkResult], math_name: str) -> str:
    """Markdown table in the seeds' format: Batch size | Throughput TF32 | Throughput mixed precision |
    speedup | weak scaling TF32 | weak scaling mixed precision. Weak scaling is throughput relative to
    the smallest batch size measured (batch 1 in the seeds)."""
    by_key = {(r.batch_size, r.precision): r.throughput for r in results}
    sizes = sorted({r.batch_size for r in results})
    base = {p: by_key.get((sizes[0], p)) for p in ("fp32", "amp")}

    def cell(value, fmt="{:.2f}"):
        return fmt.format(value) if value is not None else "-"

    def ratio(a, b):
        return f"{100 * a / b:.0f}%" if a is not None and b else "-"

    lines = [f"| Batch size | Throughput - {math_name} | Throughput - mixed precision | Throughput speedup "
             f"({math_name} - mixed precision) | Weak scaling - {math_name} | Weak scaling - mixed precision |",
             "|---:|---:|---:|---:|---:|---:|"]
    for size in sizes:
        full, mixed = by_key.get((size, "fp32")), by_key.get((size, "amp"))
        lines.append(f"| {size} | {cell(full)} | {cell(mixed)} | {ratio(mixed, full)} | "
                     f"{ratio(full, base['fp32'])} | {ratio(mixed, base['amp'])} |")
    return "\n".join(lines)
