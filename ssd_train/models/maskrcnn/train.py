"""Training Mask R-CNN with the recipe of NVIDIA's `e2e_mask_rcnn_R_50_FPN_1x`: SGD by iterations
(warmup, then x0.1 at the steps), gradient accumulation up to a global batch, AMP and TF32, torchrun
DDP, a checkpoint every N iterations and at the end (with a `last_checkpoint` file naming the newest),
exact resume from any of them, and optional evaluation after every epoch with an early stop once the
target box and mask mAP are reached.

The parts every detector shares come from ssd_train.train (device and process group, math modes,
loss scaling, the non-finite-loss guard, metrics, resume checks) and ssd_train.checkpoint.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ssd_common.layout import DatasetError
from ssd_train import checkpoint as ckpt
from ssd_train.files import atomic_write
from ssd_train.inference import autocast
from ssd_train.models.maskrcnn.data import build_eval_loader, build_train_loader
from ssd_train.models.maskrcnn.inference import evaluate_model
from ssd_train.models.maskrcnn.model import MaskRCNNSpec, build_maskrcnn, resized_size
from ssd_train.train import (MetricsLog, NonFiniteGuard, TrainingError, all_finite, check_resumable, check_resume,
                             check_writable, init_distributed, make_grad_scaler, pick_device, run_settings,
                             set_math_modes)

log = logging.getLogger(__name__)

DETECTOR = "maskrcnn"
REFERENCE_GLOBAL_BATCH = 16  # the recipe's base learning rate is for this many images per step
LARGE_BATCH = 32  # from this global batch on, the recipe warms up longer from a lower factor
BIAS_LR_FACTOR = 2.0  # maskrcnn-benchmark trains biases at twice the learning rate, without weight decay
LAST_CHECKPOINT = "last_checkpoint"  # the file naming the newest checkpoint, as NVIDIA's scripts write it


@dataclass
class MaskRCNNConfig:
    """The recipe's defaults (the CLI shows and reads these)."""

    data: Path
    save: Path = Path("runs/maskrcnn")
    # NVIDIA's figures train on COCO 2014 train + valminusminival and test on minival: the images of
    # COCO 2017's train and val splits.
    train_split: str = "train2017"
    val_split: str = "val2017"
    iterations: int = 90000
    steps: tuple[int, ...] = (60000, 80000)
    batch_size: int = 2  # per process and micro-batch: 16 images per step on 8 GPUs, as the recipe
    accumulate_steps: int = 1  # micro-batches per optimizer step (SOLVER.ACCUMULATE_STEPS)
    eval_batch_size: int = 1  # per process: the recipe's global test batch is 8 on 8 GPUs
    learning_rate: float = 0.02  # for a global batch of 16, scaled linearly with it
    warmup: int | None = None  # iterations; None: 500 (global batch < 32) or 625
    warmup_factor: float | None = None  # None: 0.33 (global batch < 32) or 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    checkpoint: Path | None = None  # resume from this checkpoint
    resume: bool = False  # resume from the checkpoint SAVE/last_checkpoint names
    checkpoint_every: int = 2500
    eval_every_epoch: bool = False
    min_bbox_map: float | None = None  # early stop once reached (with min_mask_map, both)
    min_mask_map: float | None = None
    final_eval: bool = True
    backbone: str = "resnet50"
    backbone_path: Path | None = None
    pretrained_backbone: bool = False
    min_size: int = 800
    max_size: int = 1333
    # None: the reference's frozen BatchNorm and 3 trained stages with pretrained weights (--backbone-path
    # or --pretrained-backbone); trained BatchNorm and all 5 stages from scratch, as torchvision does
    # (a frozen norm without ImageNet statistics is the identity: see MaskRCNNSpec.norm's measurements).
    trainable_layers: int | None = None
    norm: str | None = None
    rois_per_image: int = 512  # RoIs sampled per image for the box and mask heads (ROI_HEADS.BATCH_SIZE_PER_IMAGE)
    augment: bool = True
    num_workers: int | None = None
    json_summary: Path | None = None
    device: str | None = None
    amp: bool | None = None  # default: on with CUDA
    tf32: bool = True
    log_interval: int = 20
    progress: bool = True
    max_nonfinite_steps: int = 10
    resume_anyway: bool = False


# What a resumed run must share with its checkpoint's run to continue it (see ssd_train.train.check_resume).
RESUME_CHECKED = {"batch_size": "batch size", "world_size": "processes", "accumulate_steps": "accumulate steps",
                  "train_images": "training images", "learning_rate": "learning rate", "steps": "steps",
                  "warmup": "warmup", "warmup_factor": "warmup factor", "momentum": "momentum",
                  "weight_decay": "weight decay", "seed": "seed", "augment": "augment",
                  "rois_per_image": "RoIs per image"}


def warmup_for(global_batch: int, warmup: int | None, factor: float | None) -> tuple[int, float]:
    """The recipe's warmup: 500 iterations from 0.33, or 625 from 0.01 for global batches of 32 and more."""
    large = global_batch >= LARGE_BATCH
    return (warmup if warmup is not None else 625 if large else 500,
            factor if factor is not None else 0.01 if large else 0.33)


def lr_factor(steps: tuple[int, ...], warmup: int, warmup_factor: float):
    """maskrcnn-benchmark's WarmupMultiStepLR as a multiplier of iteration: linear warmup from
    `warmup_factor` to 1 over `warmup` iterations, x0.1 at each of `steps`."""
    milestones = sorted(steps)

    def factor(iteration: int) -> float:
        ramp = 1.0
        if iteration < warmup:
            alpha = iteration / warmup
            ramp = warmup_factor * (1 - alpha) + alpha
        return ramp * 0.1 ** bisect.bisect_right(milestones, iteration)
    return factor


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weights with weight decay; biases at twice the learning rate without it (the recipe's). Frozen
    parameters are left out."""
    weights, biases = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (biases if name.endswith(".bias") else weights).append(param)
    return [{"params": weights, "weight_decay": weight_decay, "lr_factor": 1.0},
            {"params": biases, "weight_decay": 0.0, "lr_factor": BIAS_LR_FACTOR}]


def make_optimizer(model, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    groups = parameter_groups(model, weight_decay)
    for group in groups:
        group["lr"] = lr * group["lr_factor"]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def to_device(images, targets, device):
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def train_step(model, optimizer, scaler, micro_batches, device, amp: bool, skip_nonfinite: bool = False
               ) -> dict[str, float] | None:
    """One optimizer step over `micro_batches` (a list of (images, targets) as the loaders yield):
    each one's losses are averaged into the gradient (gradient accumulation; under DDP the gradients
    are reduced once, after the last). Returns the mean of each loss and their total, or None when
    `skip_nonfinite` and the loss of a micro-batch is not finite on some process (the step is then
    skipped on all of them). Shared by `fit` and `ssd-train benchmark --model maskrcnn`."""
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, torch.Tensor] = {}
    count = len(micro_batches)
    for i, (images, targets) in enumerate(micro_batches):
        images, targets = to_device(images, targets, device)
        last = i == count - 1
        sync = model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with sync:
            with autocast(device, amp):
                losses = model(images, targets)
            loss = sum(losses.values()) / count
            if skip_nonfinite and not all_finite(loss):
                optimizer.zero_grad(set_to_none=True)
                return None
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + value.detach().float() / count
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    values = {name: value.item() for name, value in totals.items()}
    values["loss"] = sum(values.values())
    return values


def step_seed(seed: int, iteration: int, rank: int) -> int:
    """The seed of the global generator for one step: the RPN and RoI heads sample their anchors and
    proposals with it, so a run resumed at any iteration draws what an uninterrupted one would."""
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0])


def checkpoint_path(save: Path, iteration: int) -> Path:
    return save / f"model_{iteration:07d}.pt"


def write_last_checkpoint(save: Path, path: Path) -> None:
    with atomic_write(save / LAST_CHECKPOINT) as f:
        f.write(path.name.encode() + b"\n")


def read_last_checkpoint(save: Path) -> Path:
    marker = Path(save) / LAST_CHECKPOINT
    try:
        name = marker.read_text().strip()
    except FileNotFoundError:
        raise ckpt.CheckpointError(f"nothing to resume: {marker} does not exist") from None
    path = Path(name) if Path(name).is_absolute() else Path(save) / name
    if not path.is_file():
        raise ckpt.CheckpointError(f"{marker} names {name}, which does not exist")
    return path


def spec_from_checkpoint(state: dict, path) -> MaskRCNNSpec:
    if ckpt.checkpoint_detector(state) != DETECTOR or "spec" not in state:
        raise ckpt.CheckpointError(f"{path} is not a Mask R-CNN checkpoint of this toolkit")
    try:
        return MaskRCNNSpec.from_json(state["spec"])
    except (TypeError, ValueError) as err:
        raise ckpt.CheckpointError(f"{path}: {err}") from None


def load_for_inference(path, map_location="cpu"):
    """The eval-mode Mask R-CNN of a checkpoint, its label map and {spec, iteration}."""
    state = ckpt.load_checkpoint(path, map_location)
    spec = spec_from_checkpoint(state, path)
    model = build_maskrcnn(spec)
    ckpt.load_model_weights(model, state["model"], f"{path} ({spec.backbone}, {spec.num_classes} classes)")
    return model.eval(), ckpt.checkpoint_label_map(state), {"spec": spec, "iteration": state.get("iteration")}


def _reached(result: dict, cfg: MaskRCNNConfig) -> bool:
    targets = [(cfg.min_bbox_map, result["bbox_mAP"]), (cfg.min_mask_map, result["segm_mAP"])]
    targets = [(goal, value) for goal, value in targets if goal is not None]
    return bool(targets) and all(value >= goal for goal, value in targets)


def check_resizable(dataset, spec: MaskRCNNSpec) -> None:
    """Before the first step: an image the model's resize would give no rows or columns (3000x1 at 800/1333)
    is an error naming it, not a crash in the middle of a step (inference just finds nothing in one)."""
    for image in dataset.images:
        if 0 in resized_size(image["height"], image["width"], spec.min_size, spec.max_size):
            raise DatasetError(f"{dataset.annotation_file.name}: image {image['id']} ({image.get('file_name')}) is "
                               f"{image['width']}x{image['height']}, too thin to resize to --min-size "
                               f"{spec.min_size} / --max-size {spec.max_size}: leave it out of the training split")


def fit(cfg: MaskRCNNConfig) -> dict:
    """Train; returns the summary (also written to `cfg.json_summary`)."""
    cfg.save = Path(cfg.save)
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    ddp = init_distributed(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    amp = device.startswith("cuda") if cfg.amp is None else cfg.amp
    set_math_modes(cfg.tf32)

    resume_path = read_last_checkpoint(cfg.save) if cfg.resume and cfg.checkpoint is None else cfg.checkpoint
    resume = ckpt.load_checkpoint(resume_path) if resume_path else None
    check_resumable(resume, resume_path, "maskrcnn", cfg.save, "model_*.pt", "resume it with --resume")
    if resume is not None and not {"optimizer", "scheduler", "iteration"} <= resume.keys():
        raise ckpt.CheckpointError(f"{resume_path} holds no training state (optimizer, scheduler, iteration): "
                                   "it can be evaluated or exported, not resumed")
    expected_labels = ckpt.checkpoint_label_map(resume) if resume else None
    train_loader = build_train_loader(cfg.data, cfg.train_split, cfg.batch_size, expected_labels, cfg.seed, ddp.rank,
                                      ddp.world_size, cfg.num_workers, cfg.augment)
    label_map = train_loader.label_map
    global_batch = cfg.batch_size * cfg.accumulate_steps * ddp.world_size
    warmup, warmup_factor = warmup_for(global_batch, cfg.warmup, cfg.warmup_factor)
    steps_per_epoch = len(train_loader) // cfg.accumulate_steps
    if steps_per_epoch == 0:
        raise TrainingError(f"an epoch has {len(train_loader)} batches per process, fewer than one step of "
                            f"{cfg.accumulate_steps} accumulated batches")
    settings = run_settings(cfg, ddp.world_size, len(train_loader.dataset), steps_per_epoch)
    settings.update(warmup=warmup, warmup_factor=warmup_factor)
    if resume:  # the model is the checkpoint's, whatever --backbone and the sizes say
        check_resume(resume.get("settings"), settings, resume_path, cfg.resume_anyway, RESUME_CHECKED)
        spec = spec_from_checkpoint(resume, resume_path)
    else:
        from_scratch = cfg.backbone_path is None and not cfg.pretrained_backbone
        spec = MaskRCNNSpec(cfg.backbone, label_map.num_classes, cfg.min_size, cfg.max_size,
                            cfg.trainable_layers if cfg.trainable_layers is not None else 5 if from_scratch else 3,
                            cfg.norm or ("batch" if from_scratch else "frozen"))
    settings.update(backbone=spec.backbone, min_size=spec.min_size, max_size=spec.max_size,
                    trainable_layers=spec.trainable_layers, norm=spec.norm)
    check_resizable(train_loader.dataset, spec)

    torch.manual_seed(cfg.seed)
    model = build_maskrcnn(spec, cfg.backbone_path, pretrained_backbone=cfg.pretrained_backbone and resume is None)
    if resume:
        ckpt.load_model_weights(model, resume["model"], f"{resume_path} ({spec.backbone})")
    # A training-time setting only (it is not part of the spec): fewer RoIs make the heads' work smaller
    # on datasets with few objects per image.
    model.roi_heads.fg_bg_sampler.batch_size_per_image = cfg.rois_per_image
    model.to(device)
    train_model = model
    if ddp.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)

    lr = cfg.learning_rate * global_batch / REFERENCE_GLOBAL_BATCH
    optimizer = make_optimizer(model, lr, cfg.momentum, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.steps, warmup, warmup_factor))
    scaler = make_grad_scaler(device, amp)
    iteration = 0
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        iteration = int(resume["iteration"])
        # This run's learning rate, momentum and weight decay (the checkpoint's, unless resumed anyway).
        scheduler.base_lrs = [lr * group["lr_factor"] for group in optimizer.param_groups]
        now = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group.update(lr=base * now, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay if group["lr_factor"] == 1.0 else 0.0)

    if ddp.is_main:
        check_writable(cfg.save)
    metrics = MetricsLog(cfg.save / "metrics.jsonl" if ddp.is_main else None)
    metrics.write("start", detector=DETECTOR, spec=spec.to_json(), device=device, amp=amp,
                  world_size=ddp.world_size, batch_size=cfg.batch_size, accumulate_steps=cfg.accumulate_steps,
                  global_batch=global_batch, lr=lr, warmup=warmup, warmup_factor=warmup_factor,
                  iterations=cfg.iterations, steps_per_epoch=steps_per_epoch, train_images=settings["train_images"],
                  resumed_from=str(resume_path) if resume else None, start_iteration=iteration)
    eval_loader, _, annotation_file = build_eval_loader(cfg.data, cfg.val_split, cfg.eval_batch_size, label_map,
                                                        ddp.rank, ddp.world_size, cfg.num_workers)

    def save(at: int) -> Path:
        path = checkpoint_path(cfg.save, at)
        if ddp.is_main:
            ckpt.save_checkpoint(path, ckpt.training_state(
                epoch=at // steps_per_epoch, iteration=at, model=model, optimizer=optimizer, scheduler=scheduler,
                scaler=scaler, label_map=label_map, backbone=spec.backbone, settings=settings, detector=DETECTOR,
                spec=spec.to_json()))
            write_last_checkpoint(cfg.save, path)
        guard.last_checkpoint = path
        return path

    eval_seconds = 0.0

    def evaluate(results_dir=None) -> dict | None:
        nonlocal eval_seconds
        start = time.perf_counter()
        result = evaluate_model(model, eval_loader, label_map, annotation_file, device, amp,
                                cfg.progress and ddp.is_main, results_dir)
        if ddp.enabled:  # every rank learns the scores (for the early stop)
            shared = [result]
            dist.broadcast_object_list(shared, src=0)
            result = shared[0]
        result["seconds"] = time.perf_counter() - start
        eval_seconds += result["seconds"]
        return result

    guard = NonFiniteGuard(model, cfg.max_nonfinite_steps, resume_path)
    summary: dict = {"detector": DETECTOR, "bbox_mAP": None, "segm_mAP": None, "evaluations": [],
                     "stopped_early": False}
    last_saved = iteration if resume else None
    started, steps_taken, losses = time.perf_counter(), 0, []
    bar = tqdm(total=cfg.iterations, initial=iteration, desc="train", unit="it", disable=not (cfg.progress and
               ddp.is_main), mininterval=2, dynamic_ncols=True)
    while iteration < cfg.iterations and not summary["stopped_early"]:
        epoch, step_in_epoch = divmod(iteration, steps_per_epoch)
        train_loader.set_epoch(epoch, start_batch=step_in_epoch * cfg.accumulate_steps)
        train_model.train()
        batches = iter(train_loader)
        for _ in range(step_in_epoch, steps_per_epoch):
            micro_batches = [next(batches) for _ in range(cfg.accumulate_steps)]
            torch.manual_seed(step_seed(cfg.seed, iteration, ddp.rank))
            values = train_step(train_model, optimizer, scaler, micro_batches, device, amp, skip_nonfinite=True)
            scheduler.step()  # a skipped step still uses up its place in the schedule
            iteration += 1
            steps_taken += 1
            bar.update(1)
            if values is None:
                guard.bad_step(epoch, iteration)
            else:
                guard.good_step()
                losses.append(values)
                if iteration % cfg.log_interval == 0:
                    recent = {k: float(np.mean([v[k] for v in losses[-cfg.log_interval:]])) for k in values}
                    bar.set_postfix(loss=f"{recent['loss']:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                    metrics.write("train", epoch=epoch, iteration=iteration, lr=scheduler.get_last_lr()[0], **recent)
            if iteration % cfg.checkpoint_every == 0 or iteration == cfg.iterations:
                guard.check_weights(model, epoch)
                last_saved = iteration
                save(iteration)
            if iteration == cfg.iterations:
                break
        else:  # a whole epoch ended
            if cfg.eval_every_epoch:
                result = evaluate()
                summary["evaluations"].append({"epoch": epoch, "iteration": iteration,
                                               "bbox_mAP": result["bbox_mAP"], "segm_mAP": result["segm_mAP"]})
                metrics.write("eval", epoch=epoch, iteration=iteration, bbox_mAP=result["bbox_mAP"],
                              segm_mAP=result["segm_mAP"], seconds=result["seconds"])
                log.info("epoch %d: bbox mAP %.4f, mask mAP %.4f", epoch, result["bbox_mAP"], result["segm_mAP"])
                if _reached(result, cfg):
                    log.info("target mAP reached after epoch %d: stopping", epoch)
                    summary["stopped_early"] = True
    bar.close()
    if last_saved != iteration:
        guard.check_weights(model, iteration // steps_per_epoch)
        save(iteration)
    elapsed = time.perf_counter() - started - eval_seconds  # training only, not the evaluations
    summary.update(iterations=iteration, train_seconds=elapsed, skipped_steps=guard.skipped,
                   images_per_s=steps_taken * global_batch / elapsed if elapsed > 0 else None,
                   checkpoint=str(checkpoint_path(cfg.save, iteration)))
    if cfg.final_eval:
        result = evaluate(cfg.save / "inference" if ddp.is_main else None)
        summary.update(bbox_mAP=result["bbox_mAP"], segm_mAP=result["segm_mAP"],
                       bbox_stats=result["bbox"]["stats"], segm_stats=result["segm"]["stats"],
                       coco_summary=result["summary"])
    if ddp.is_main:
        metrics.write("end", **{k: v for k, v in summary.items() if k != "coco_summary"})
        if cfg.json_summary:
            Path(cfg.json_summary).write_text(json.dumps(summary, indent=1) + "\n")
    metrics.close()
    if ddp.enabled:
        dist.barrier()
    return summary
