"""The training loop of SSD300 v1.1: optimizer groups, warmup + multistep schedule, AMP, DDP,
atomic per-epoch checkpoints, exact and checked resume, steps with a non-finite loss skipped, and
periodic COCO evaluation."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ssd_train import checkpoint as ckpt
from ssd_train.data.loaders import build_eval_loader, build_train_loader, default_backend
from ssd_train.inference import autocast
from ssd_train.models.ssd300.checkpoint import checkpoint_backbone
from ssd_train.models.ssd300.evaluate import evaluate_model
from ssd_train.models.ssd300.loss import SSDLoss
from ssd_train.models.ssd300.model import build_model
from ssd_train.train import (MetricsLog, NonFiniteGuard, TrainingError, all_finite, check_resumable, check_resume,
                             check_writable, init_distributed, make_grad_scaler, pick_device, run_settings,
                             set_math_modes)

log = logging.getLogger(__name__)

REFERENCE_BATCH = 32  # the learning rate is given for this batch size per GPU


@dataclass
class FitConfig:
    data: Path
    save: Path = Path("runs/ssd300")
    train_split: str = "train2017"
    val_split: str = "val2017"
    epochs: int = 65
    batch_size: int = 32
    eval_batch_size: int = 32
    learning_rate: float = 2.6e-3
    multistep: tuple[int, ...] = (43, 54)
    warmup: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    checkpoint: Path | None = None
    evaluation: tuple[int, ...] = (21, 31, 37, 42, 48, 53, 59, 64)
    backbone: str = "resnet50"
    backbone_path: Path | None = None
    pretrained_backbone: bool = True
    num_workers: int | None = None
    json_summary: Path | None = None
    data_backend: str = field(default_factory=default_backend)
    augment: bool = True
    device: str | None = None
    amp: bool | None = None  # default: on with CUDA
    tf32: bool = True
    channels_last: bool = True
    log_interval: int = 20
    progress: bool = True
    precise_bn: int = 0  # batches to recompute BatchNorm statistics on before evaluating/the last save
    max_nonfinite_steps: int = 10  # stop after this many steps in a row with a non-finite loss
    resume_anyway: bool = False  # resume even if the checkpoint's run had other RESUME_CHECKED settings


# Settings a resumed run must share with the checkpoint's run to continue it: they set the
# learning-rate schedule, the optimiser or the data of each step. Others may change: the number of
# epochs (extending a run is legitimate) and how the run is carried out (device, precision, workers,
# data backend, evaluation).
RESUME_CHECKED = {"batch_size": "batch size", "world_size": "processes", "train_images": "training images",
                  "learning_rate": "learning rate", "multistep": "multistep", "warmup": "warmup",
                  "momentum": "momentum", "weight_decay": "weight decay", "seed": "seed", "augment": "augment"}


def use_settings(optimizer, scheduler, lr: float, momentum: float, weight_decay: float) -> None:
    """After loading a checkpoint's optimizer and scheduler: this run's learning rate, momentum and
    weight decay (the same as the checkpoint's unless the run resumes anyway)."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)  # what the scheduler's last step set
    for group, decay in zip(optimizer.param_groups, (weight_decay, 0.0)):
        group.update(lr=lr * factor, momentum=momentum, weight_decay=decay)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv weights only: BatchNorm parameters and biases get none."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_learning_rate(base: float, batch_size: int, world_size: int) -> float:
    return base * world_size * batch_size / REFERENCE_BATCH


def lr_factor(iters_per_epoch: int, multistep: tuple[int, ...], warmup: int):
    """Per-iteration LR multiplier: linear warmup over `warmup` iterations, x0.1 at each milestone epoch."""
    def factor(iteration: int) -> float:
        epoch = iteration // iters_per_epoch
        decay = 0.1 ** sum(epoch >= m for m in multistep)
        ramp = min(1.0, (iteration + 1) / warmup) if warmup > 0 else 1.0
        return decay * ramp
    return factor


def train_step(model, loss_fn, optimizer, scaler, batch, device, amp: bool, channels_last: bool,
               skip_nonfinite: bool = False) -> torch.Tensor | None:
    """One optimisation step on a batch (images, target offsets, target labels); returns the loss.
    With `skip_nonfinite`, a loss that is not finite (on any process) skips the step: no backward
    pass, no update, and None is returned. Shared by `fit` and `ssd-train benchmark --mode training`."""
    images, offsets, labels = (t.to(device, non_blocking=True) for t in batch)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        locs, scores = model(images)
    loss = loss_fn(locs, scores, offsets, labels)
    if skip_nonfinite and not all_finite(loss):
        return None
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


@torch.no_grad()
def recompute_bn_statistics(model, loader, num_batches: int, device, channels_last: bool) -> None:
    """Set every BatchNorm's running statistics to the exact average over `num_batches` training
    batches, with the current weights. The running averages lag the weights while they change fast
    (short runs, high learning rates, small batches), which can make the eval-mode model much worse
    than the one training sees; off (0 batches) by default, as in the reference."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    for i, (images, _, _) in enumerate(loader):
        if i == num_batches:
            break
        images = images.to(device, non_blocking=True)
        model(images.contiguous(memory_format=torch.channels_last) if channels_last else images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def train_one_epoch(train_model, loader, loss_fn, optimizer, scheduler, scaler, guard: NonFiniteGuard,
                    metrics: MetricsLog, cfg: FitConfig, epoch: int, iteration: int, device: str, amp: bool,
                    show_progress: bool) -> tuple[int, list[torch.Tensor], int]:
    """One pass over `loader`; returns the iteration count after it, the losses of the steps taken
    and the number of steps skipped."""
    train_model.train()
    losses, skipped = [], 0
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=not show_progress, mininterval=2,
               dynamic_ncols=True)
    for batch in bar:
        loss = train_step(train_model, loss_fn, optimizer, scaler, batch, device, amp, cfg.channels_last,
                          skip_nonfinite=True)
        scheduler.step()  # a skipped step still uses up its place in the schedule
        iteration += 1
        if loss is None:
            skipped += 1
            guard.bad_step(epoch, iteration)
            continue
        guard.good_step()
        losses.append(loss)
        if iteration % cfg.log_interval == 0:
            value = torch.stack(losses[-cfg.log_interval:]).mean().item()
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            metrics.write("train", epoch=epoch, iteration=iteration, loss=value, lr=scheduler.get_last_lr()[0])
    return iteration, losses, skipped


def fit(cfg: FitConfig) -> dict:
    """Train; returns the summary (also written to `cfg.json_summary`)."""
    cfg.save = Path(cfg.save)
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    ddp = init_distributed(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    amp = device.startswith("cuda") if cfg.amp is None else cfg.amp
    set_math_modes(cfg.tf32)

    resume = ckpt.load_checkpoint(cfg.checkpoint) if cfg.checkpoint else None
    check_resumable(resume, cfg.checkpoint, "ssd300", cfg.save, "epoch_*.pt",
                    f"resume it with --checkpoint {cfg.save}/epoch_N.pt")
    if resume is not None and not {"optimizer", "scheduler", "epoch", "iteration"} <= resume.keys():
        raise ckpt.CheckpointError(f"{cfg.checkpoint} holds no training state (optimizer, scheduler, epoch): "
                                   "it can be evaluated or exported, not resumed")
    backbone = checkpoint_backbone(resume, None) if resume else cfg.backbone
    expected_labels = ckpt.checkpoint_label_map(resume) if resume else None
    train_loader = build_train_loader(cfg.data_backend, cfg.data, cfg.train_split, cfg.batch_size, expected_labels,
                                      cfg.seed, ddp.rank, ddp.world_size, device, cfg.num_workers, cfg.augment,
                                      shuffle=True)
    eval_loader, label_map = build_eval_loader(cfg.data_backend, cfg.data, cfg.val_split, cfg.eval_batch_size,
                                               expected_labels, ddp.rank, ddp.world_size, device, cfg.num_workers)
    annotation_file = Path(cfg.data) / "annotations" / f"instances_{cfg.val_split}.json"
    iters_per_epoch = len(train_loader)
    settings = run_settings(cfg, ddp.world_size, len(train_loader.annotations.images), iters_per_epoch)
    if resume:
        check_resume(resume.get("settings"), settings, cfg.checkpoint, cfg.resume_anyway, RESUME_CHECKED)

    torch.manual_seed(cfg.seed)
    model = build_model(backbone, label_map.num_classes, cfg.backbone_path and str(cfg.backbone_path),
                        pretrained_backbone=cfg.pretrained_backbone and resume is None)
    if resume:
        ckpt.load_model_weights(model, resume["model"], f"{cfg.checkpoint} (backbone {backbone})")
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    train_model = model
    if ddp.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)

    lr = scaled_learning_rate(cfg.learning_rate, cfg.batch_size, ddp.world_size)
    optimizer = torch.optim.SGD(parameter_groups(model, cfg.weight_decay), lr=lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(iters_per_epoch, cfg.multistep, cfg.warmup))
    scaler = make_grad_scaler(device, amp)
    loss_fn = SSDLoss()
    start_epoch, iteration = 0, 0
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        use_settings(optimizer, scheduler, lr, cfg.momentum, cfg.weight_decay)
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        if resume.get("random"):
            ckpt.set_random_states(resume["random"])
        start_epoch, iteration = int(resume["epoch"]), int(resume["iteration"])
        if start_epoch >= cfg.epochs:
            raise TrainingError(f"{cfg.checkpoint} has trained {start_epoch} epochs, --epochs {cfg.epochs}: nothing "
                                "is left to train (a larger --epochs goes on)")

    if ddp.is_main:
        check_writable(cfg.save)
    metrics = MetricsLog(cfg.save / "metrics.jsonl" if ddp.is_main else None)
    metrics.write("start", backbone=backbone, classes=label_map.num_classes, device=device, amp=amp,
                  world_size=ddp.world_size, batch_size=cfg.batch_size, lr=lr, epochs=cfg.epochs,
                  iterations_per_epoch=iters_per_epoch, train_images=settings["train_images"],
                  dropped_boxes=train_loader.annotations.num_dropped, data_backend=cfg.data_backend,
                  augment=cfg.augment, resumed_from=str(cfg.checkpoint) if resume else None, start_epoch=start_epoch)
    guard = NonFiniteGuard(model, cfg.max_nonfinite_steps, cfg.checkpoint)
    summary: dict = {"mAP": None, "evaluations": []}
    started = time.perf_counter()
    images_seen = 0
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)
        epoch_start = time.perf_counter()
        iteration, losses, skipped = train_one_epoch(
            train_model, train_loader, loss_fn, optimizer, scheduler, scaler, guard, metrics, cfg, epoch, iteration,
            device, amp, cfg.progress and ddp.is_main)
        if not losses and not skipped:
            raise RuntimeError("the training loader yielded no batch")
        seconds = time.perf_counter() - epoch_start  # training only: not the BN and evaluation work below
        evaluate_now = epoch in cfg.evaluation or epoch == cfg.epochs - 1
        if cfg.precise_bn and evaluate_now:
            recompute_bn_statistics(model, train_loader, cfg.precise_bn, device, cfg.channels_last)
        if ddp.enabled:
            # DDP keeps parameters in step, but each rank's BatchNorm statistics saw its own batches:
            # take rank 0's so every rank evaluates (and rank 0 saves) the same model.
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        guard.check_weights(model, epoch)
        epoch_images = (len(losses) + skipped) * cfg.batch_size * ddp.world_size
        images_seen += epoch_images
        epoch_loss = torch.stack(losses).mean().item() if losses else None
        path = cfg.save / f"epoch_{epoch}.pt"
        if ddp.is_main:
            metrics.write("epoch", epoch=epoch, iteration=iteration, loss=epoch_loss, skipped_steps=skipped,
                          images_per_s=epoch_images / seconds, seconds=seconds)
            ckpt.save_checkpoint(path, ckpt.training_state(
                epoch=epoch + 1, iteration=iteration, model=model, optimizer=optimizer, scheduler=scheduler,
                scaler=scaler, label_map=label_map, backbone=backbone, settings=settings))
        guard.last_checkpoint = path
        if evaluate_now:
            result = evaluate_model(model, eval_loader, label_map, annotation_file, device, amp,
                                    cfg.channels_last, cfg.progress and ddp.is_main)
            if ddp.is_main:
                metrics.write("eval", epoch=epoch, mAP=result["mAP"], **result["stats"])
                summary["evaluations"].append({"epoch": epoch, "mAP": result["mAP"]})
                summary.update(mAP=result["mAP"], stats=result["stats"], coco_summary=result["summary"])
                log.info("epoch %d: mAP %.4f", epoch, result["mAP"])
    elapsed = time.perf_counter() - started
    summary.update(epochs=cfg.epochs, iterations=iteration, train_seconds=elapsed,
                   images_per_s=images_seen / elapsed if elapsed > 0 else None, skipped_steps=guard.skipped,
                   checkpoint=str(cfg.save / f"epoch_{cfg.epochs - 1}.pt"))
    if ddp.is_main:
        metrics.write("end", **{k: v for k, v in summary.items() if k != "coco_summary"})
        if cfg.json_summary:
            Path(cfg.json_summary).write_text(json.dumps(summary, indent=1) + "\n")
    metrics.close()
    if ddp.enabled:
        dist.barrier()
    return summary
