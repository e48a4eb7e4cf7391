"""`ssd-train benchmark --model maskrcnn`: Mask R-CNN training and inference throughput (images/s) in the
format of NVIDIA's Mask R-CNN README tables.

Training timing covers a whole `train_step` (the function `fit` runs: host-to-device copy, forward,
losses, backward, optimizer step). Inference timing covers the host-to-device copy and `detect` (the
forward pass, including resizing, postprocessing and pasting the masks at the image size).

Data is synthetic by default -- random pixels at the spec's size (min_size x 4/3 min_size) with 2-4
random boxes and rectangular masks per image, the same every run -- or real images from a COCO-layout
dataset (training batches through the Mask R-CNN loader, inference on the val2017 images).

The cost of inference depends on the detections: the mask head runs on each and pastes its mask. The
scores of an untrained model say nothing (a tiny resnet18 finds nothing above the 0.05 threshold, and
would then skip the mask head), so for inference the box score threshold is 0 by default
(`score_threshold`): every image yields the cap of 100 detections, the most a trained model returns
(an upper bound of its cost). Each inference result records its mean detections per image.

Training runs in 1 or more processes of one torch.distributed group (`processes`; DDP, gloo on CPU,
NCCL with one GPU per process). Each process times its own steps; the throughput of a run is the sum
over its processes, and weak scaling is the throughput of N processes over that of one, as the README's
"Weak scaling" columns give it (A100 TF32: 74 img/s on 4 GPUs over 21 on one is 3.52, 88% efficiency).
On a CPU the processes share the cores (each gets its share of the threads), so the CPU figures say
little about scaling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ssd_train.benchmark import time_iterations
from ssd_train.models.maskrcnn.inference import detect
from ssd_train.models.maskrcnn.model import MaskRCNNSpec, build_maskrcnn
from ssd_train.models.maskrcnn.train import make_optimizer, train_step
from ssd_train.train import init_distributed, make_grad_scaler, set_math_modes

MODES = ("training", "inference")
LEARNING_RATE = 0.001  # small: the benchmark trains an untrained model on random data; the rate costs nothing
SEED = 0


@dataclass
class Result:
    mode: str
    processes: int
    batch_size: int  # per process
    precision: str  # "fp32" (TF32 math where enabled and supported) or "amp"
    seconds: list[list[float]]  # per process, the duration of each timed iteration
    nonfinite_steps: int = 0  # training: timed steps whose loss was not finite (the most of any process)
    detections_per_image: float | None = None  # inference: mean over the timed batches

    @property
    def throughput(self) -> float:
        """Images per second: each process's total images / total time, summed over the processes."""
        return sum(self.batch_size * len(s) / sum(s) for s in self.seconds)

    def per_iteration(self) -> list[float]:
        """The throughput of each timed iteration, summed over the processes."""
        return [sum(self.batch_size / s[i] for s in self.seconds) for i in range(len(self.seconds[0]))]

    def summary(self) -> dict:
        per_iteration = self.per_iteration()
        all_seconds = [t for s in self.seconds for t in s]
        summary = {"mode": self.mode, "processes": self.processes, "batch_size": self.batch_size,
                   "precision": self.precision, "throughput_mean": self.throughput,
                   "throughput_median": statistics.median(per_iteration), "throughput_min": min(per_iteration),
                   "throughput_max": max(per_iteration), "latency_mean_ms": 1000 * statistics.fmean(all_seconds),
                   "iterations": len(self.seconds[0])}
        if self.processes > 1:
            summary["throughput_per_process"] = [self.batch_size * len(s) / sum(s) for s in self.seconds]
        if self.mode == "training":
            summary["nonfinite_steps"] = self.nonfinite_steps
        if self.detections_per_image is not None:
            summary["detections_per_image"] = self.detections_per_image
        return summary


def image_size(spec: MaskRCNNSpec) -> tuple[int, int]:
    """(height, width) of the synthetic images: the spec's shorter side, a 4:3 longer side (at most max_size)."""
    return spec.min_size, min(round(spec.min_size * 4 / 3), spec.max_size)


def synthetic_images(spec: MaskRCNNSpec, batch_size: int, seed: int = SEED) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    height, width = image_size(spec)
    return [torch.rand(3, height, width, generator=generator) for _ in range(batch_size)]


def synthetic_batch(spec: MaskRCNNSpec, batch_size: int, seed: int = SEED) -> tuple[tuple, tuple]:
    """(images, targets) as the training loader yields them: random pixels, 2-4 random boxes per image
    (10-40% of each side) with rectangular masks and labels 1..num_classes-1."""
    generator = torch.Generator().manual_seed(seed)
    height, width = image_size(spec)
    images, targets = [], []
    for index in range(batch_size):
        images.append(torch.rand(3, height, width, generator=generator))
        count = int(torch.randint(2, 5, (), generator=generator))
        scale = torch.tensor([width, height], dtype=torch.float32)
        low = (torch.rand(count, 2, generator=generator) * 0.6 * scale).floor()
        high = (low + (0.1 + torch.rand(count, 2, generator=generator) * 0.3) * scale).ceil()
        boxes = torch.cat([low, high], 1)
        masks = torch.zeros(count, height, width, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            mask[y1:y2, x1:x2] = 1
        labels = torch.randint(1, spec.num_classes, (count,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks, "image_id": index})
    return tuple(images), tuple(targets)


def _forever(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _training_data(spec: MaskRCNNSpec, batch_size: int, data_dir, rank: int, world_size: int):
    """(spec, an endless iterator of (images, targets)): synthetic, or the loader's batches of `data_dir`
    with the spec's classes set to the dataset's (as `fit` builds the model)."""
    if data_dir is None:
        fixed = synthetic_batch(spec, batch_size, SEED + rank)
        return spec, iter(lambda: fixed, None)
    from ssd_train.models.maskrcnn.data import build_train_loader

    loader = build_train_loader(data_dir, "train2017", batch_size, seed=SEED, rank=rank, world_size=world_size)
    return dataclasses.replace(spec, num_classes=loader.label_map.num_classes), _forever(loader)


def inference_images(spec: MaskRCNNSpec, batch_size: int, data_dir=None) -> tuple[MaskRCNNSpec, list[torch.Tensor]]:
    """A batch to detect on and the spec to build for it. Synthetic by default; with `data_dir`, the
    first `batch_size` val2017 images (repeated if there are fewer) as the evaluation loader gives them
    (float [3, H, W] in [0, 1] at their own sizes: the model resizes them), with the spec's classes set
    to the dataset's."""
    if data_dir is None:
        return spec, synthetic_images(spec, batch_size)
    from ssd_train.models.maskrcnn.data import build_eval_loader

    loader, label_map, _ = build_eval_loader(data_dir, "val2017", batch_size, num_workers=0)
    images, _ = next(iter(loader))
    return (dataclasses.replace(spec, num_classes=label_map.num_classes),
            [images[i % len(images)] for i in range(batch_size)])


def _build(spec: MaskRCNNSpec, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return build_maskrcnn(spec).to(device)


def benchmark_training(spec: MaskRCNNSpec, batch_sizes, precisions, device: torch.device, warmup: int,
                       iterations: int, data_dir=None, rank: int = 0, world_size: int = 1, report=None) -> list[dict]:
    """This process's part of a training measurement: per (batch size, precision), {"batch_size",
    "precision", "seconds", "nonfinite_steps"} (also passed to `report` as each is measured). In a
    process group (world_size > 1) the model is wrapped in DDP, as `fit` does."""
    records = []
    for batch_size in batch_sizes:
        model_spec, batches = _training_data(spec, batch_size, data_dir, rank, world_size)
        model = _build(model_spec, device)
        model.train()
        train_model = model
        if world_size > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = make_optimizer(model, LEARNING_RATE, 0.9, 1e-4)
        for amp in precisions:
            scaler = make_grad_scaler(str(device), amp)
            losses = []

            def step():
                values = train_step(train_model, optimizer, scaler, [next(batches)], device, amp)
                losses.append(values["loss"])

            seconds = time_iterations(step, warmup, iterations, device)
            nonfinite = sum(not math.isfinite(loss) for loss in losses[warmup:])
            records.append({"batch_size": batch_size, "precision": "amp" if amp else "fp32", "seconds": seconds,
                            "nonfinite_steps": nonfinite})
            if report:
                report(records[-1])
    return records


def benchmark_inference(model: torch.nn.Module, images: list[torch.Tensor], device: torch.device, amp: bool,
                        warmup: int, iterations: int, score_threshold: float | None = 0.0) -> Result:
    """Host-to-device copy + `detect` of one batch (CPU images), timed. `score_threshold`: the box score
    threshold during the measurement (None: the model's; see the module docstring)."""
    model.eval()
    host = [image.pin_memory() for image in images] if device.type == "cuda" else images
    counts = []

    def step():
        found = detect(model, [image.to(device, non_blocking=True) for image in host], amp)
        counts.append(statistics.fmean(len(one["scores"]) for one in found))

    kept = model.roi_heads.score_thresh
    if score_threshold is not None:
        model.roi_heads.score_thresh = score_threshold
    try:
        seconds = time_iterations(step, warmup, iterations, device)
    finally:
        model.roi_heads.score_thresh = kept
    return Result("inference", 1, len(images), "amp" if amp else "fp32", [seconds],
                  detections_per_image=statistics.fmean(counts[warmup:]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _training_worker(rank: int, world_size: int, port: int, out_dir: str, device_type: str, threads: int,
                     args: tuple) -> None:
    """One process of a multi-process training measurement (torch.multiprocessing spawns it): joins the
    group, measures, writes its records to OUT_DIR/RANK.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    device = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(threads)
    spec, batch_sizes, precisions, warmup, iterations, tf32, data_dir = args
    ddp = init_distributed(str(device))
    set_math_modes(tf32)
    try:
        records = benchmark_training(spec, batch_sizes, precisions, device, warmup, iterations, data_dir,
                                     ddp.rank, ddp.world_size)
    finally:
        torch.distributed.destroy_process_group()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(records))


def _spawn_training(processes: int, device: torch.device, args: tuple) -> list[list[dict]]:
    """Each process's records of a training measurement in `processes` processes of one group."""
    if device.type == "cuda" and processes > torch.cuda.device_count():
        raise ValueError(f"{processes} processes need {processes} GPUs; {torch.cuda.device_count()} visible")
    threads = max(1, torch.get_num_threads() // processes)
    with tempfile.TemporaryDirectory(prefix="maskrcnn-bench-") as out_dir:
        torch.multiprocessing.start_processes(
            _training_worker, (processes, _free_port(), out_dir, device.type, threads, args), nprocs=processes,
            join=True, start_method="spawn")
        return [json.loads(Path(out_dir, f"{rank}.json").read_text()) for rank in range(processes)]


def run_benchmark(mode: str, batch_sizes, precisions, device, spec: MaskRCNNSpec, warmup: int, iterations: int,
                  tf32: bool = True, processes=(1,), data_dir=None, progress=None,
                  score_threshold: float | None = 0.0) -> list[Result]:
    """Results per (processes, batch size, precision), in that order. `precisions`: AMP flags
    (False: fp32/TF32, True: mixed precision). `processes`: training only (inference runs in this
    process); 1 runs here, more are spawned. `progress(result)` is called as results come in."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    device = torch.device(device)
    set_math_modes(tf32)
    precisions = list(precisions)
    results = []

    def add(result):
        results.append(result)
        if progress:
            progress(result)

    if mode == "inference":
        for batch_size in batch_sizes:
            model_spec, images = inference_images(spec, batch_size, data_dir)
            model = _build(model_spec, device)
            for amp in precisions:
                add(benchmark_inference(model, images, device, amp, warmup, iterations, score_threshold))
        return results

    def add_training(count, parts):
        add(Result("training", count, parts[0]["batch_size"], parts[0]["precision"], [p["seconds"] for p in parts],
                   nonfinite_steps=max(p["nonfinite_steps"] for p in parts)))

    for count in processes:
        if count == 1:
            benchmark_training(spec, batch_sizes, precisions, device, warmup, iterations, data_dir,
                               report=lambda record: add_training(1, [record]))
        else:
            args = (spec, list(batch_sizes), precisions, warmup, iterations, tf32, data_dir)
            for parts in zip(*_spawn_training(count, device, args)):
                add_training(count, parts)
    return results


def benchmark_input(data_dir, batch_size: int, num_workers: int, warmup: int, iterations: int) -> Result:
    """The training input pipeline alone (read, decode the JPEG and the masks, flip, batch): the images
    per second it delivers, to set against a training step's (is it worth moving to DALI?)."""
    from ssd_train.models.maskrcnn.data import build_train_loader

    loader = build_train_loader(data_dir, "train2017", batch_size, seed=SEED, num_workers=num_workers)
    batches = _forever(loader)
    seconds = time_iterations(lambda: next(batches), warmup, iterations, torch.device("cpu"))
    return Result("input", 1, batch_size, f"{num_workers} workers", [seconds])


def weak_scaling(results: list[Result]) -> dict[tuple[int, int, str], float]:
    """(processes, batch size, precision) -> throughput over that of 1 process with the same batch size
    and precision (where that was measured)."""
    single = {(r.batch_size, r.precision): r.throughput for r in results if r.processes == 1}
    return {(r.processes, r.batch_size, r.precision): r.throughput / single[r.batch_size, r.precision]
            for r in results if (r.batch_size, r.precision) in single}


def result_line(result: Result) -> str:
    s = result.summary()
    line = (f"{s['processes']} process{'es' if s['processes'] > 1 else ''}, batch {s['batch_size']:>3} "
            f"{s['precision']:>4}: mean {s['throughput_mean']:.2f} img/s, median {s['throughput_median']:.2f}, "
            f"min {s['throughput_min']:.2f}, max {s['throughput_max']:.2f}, latency {s['latency_mean_ms']:.1f} ms")
    if "throughput_per_process" in s:
        line += f"; per process {', '.join(f'{t:.2f}' for t in s['throughput_per_process'])}"
    if s.get("nonfinite_steps"):
        line += f"; {s['nonfinite_steps']} steps with a non-finite loss"
    if "detections_per_image" in s:
        line += f"; {s['detections_per_image']:.1f} detections per image"
    return line


def table(results: list[Result], math_name: str, mode: str) -> str:
    """Markdown in the README's format, one row per (processes, batch size). Training: GPUs | Batch size /
    GPU | Throughput - MATH | Throughput - mixed precision | Throughput speedup (MATH - mixed precision) |
    Weak scaling - MATH | Weak scaling - mixed precision; inference: the first five columns. The speedup
    and weak scaling are ratios (1.19; 3.52 for 4 GPUs), as the README writes them; "-" where a figure
    was not measured."""
    ours = [r for r in results if r.mode == mode]
    throughput = {(r.processes, r.batch_size, r.precision): r.throughput for r in ours}
    scaling = weak_scaling(ours)
    columns = ["GPUs", "Batch size / GPU", f"Throughput - {math_name}", "Throughput - mixed precision",
               f"Throughput speedup ({math_name} - mixed precision)"]
    if mode == "training":
        columns += [f"Weak scaling - {math_name}", "Weak scaling - mixed precision"]

    def cell(value):
        return f"{value:.2f}" if value is not None else "-"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for processes, batch_size in sorted({(r.processes, r.batch_size) for r in ours}):
        full = throughput.get((processes, batch_size, "fp32"))
        mixed = throughput.get((processes, batch_size, "amp"))
        row = [str(processes), str(batch_size), cell(full), cell(mixed), cell(mixed / full if full and mixed else None)]
        if mode == "training":
            row += [cell(scaling.get((processes, batch_size, p))) for p in ("fp32", "amp")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_summary(path, results: list[Result], **context) -> None:
    """JSON: context + per-result summaries (the shape of `ssd-train benchmark`'s), training results
    with their weak scaling (N-process throughput over 1-process) and scaling efficiency (that over N)."""
    scaling = weak_scaling(results)
    summaries = []
    for result in results:
        summary = result.summary()
        key = (result.processes, result.batch_size, result.precision)
        if result.mode == "training" and key in scaling:
            summary.update(weak_scaling=scaling[key], scaling_efficiency=scaling[key] / result.processes)
        summaries.append(summary)
    Path(path).write_text(json.dumps({**context, "results": summaries}, indent=1) + "\n")
