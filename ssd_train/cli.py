"""`ssd-train`: the command line of the toolkit. Thin: parse options, call the library, report."""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from pathlib import Path

import click

from ssd_train.models.ssd300.model import BACKBONES
from ssd_train.train import FitConfig

EPOCH_LIST = "comma-separated epoch indices (0-based)"


def _int_list(ctx, param, value):
    if value is None or isinstance(value, tuple):
        return value
    try:
        return tuple(int(v) for v in str(value).replace(" ", ",").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected {EPOCH_LIST}, got {value!r}") from None


def user_errors(func):
    """Turn the library's input errors into one-line click errors (no traceback)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from ssd_common.labels import LabelMapError
        from ssd_train.checkpoint import CheckpointError
        from ssd_train.data.coco import DatasetError
        from ssd_train.models.ssd300.model import BackboneError

        errors = [CheckpointError, DatasetError, LabelMapError, BackboneError, FileNotFoundError]
        try:
            from ssd_train.data.dali import ImageDecodeError
            errors.append(ImageDecodeError)
        except ImportError:
            pass
        try:
            from ssd_train.export import ExportError
            errors.append(ExportError)
        except ImportError:
            pass
        try:
            return func(*args, **kwargs)
        except tuple(errors) as err:
            raise click.ClickException(str(err)) from None
    return wrapper


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    # Warnings are one line each, without the source line (they are messages for users here).
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TorchScript.*")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose):
    """Train, evaluate, export and benchmark NVIDIA's SSD300 v1.1 detector."""
    _setup_logging(verbose)


# ---------------------------------------------------------------------------------------------- data
@cli.group("make-dataset")
def make_dataset():
    """Generate datasets in the COCO layout."""


@make_dataset.command("shapes")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train", "train_count", default=200, show_default=True, help="Training images.")
@click.option("--val", "val_count", default=50, show_default=True, help="Validation images.")
@click.option("--seed", default=0, show_default=True)
@click.option("--style", type=click.Choice(["default", "demo"]), default="default", show_default=True,
              help="demo: 300x300 images, plain backgrounds, objects of 55-165 px and one colour family per "
                   "shape -- learnable from scratch in minutes on a CPU (make demo's dataset).")
@user_errors
def make_shapes(out, train_count, val_count, seed, style):
    """Coloured circles, rectangles and triangles with boxes: a deterministic toy COCO dataset."""
    from ssd_train.data.shapes import make_shapes_dataset

    try:
        make_shapes_dataset(out, train_count, val_count, seed, style)
    except OSError as err:
        raise click.ClickException(f"cannot write dataset to {out}: {err.strerror}") from None
    click.echo(f"wrote {train_count} training and {val_count} validation images to {out} (COCO layout)")


# ------------------------------------------------------------------------------------------ training
def _data_backend_option():
    return click.option("--data-backend", type=click.Choice(["dali", "pytorch"]), default=None,
                        help="Input pipeline [default: dali when installed].")


def _precision_options(func):
    func = click.option("--amp/--no-amp", default=None,
                        help="Mixed precision (fp16 on CUDA, bf16 on CPU) [default: on with CUDA].")(func)
    func = click.option("--tf32/--no-tf32", default=True, show_default=True, help="TF32 matmuls/convs on Ampere+.")(func)
    func = click.option("--channels-last/--no-channels-last", default=True, show_default=True,
                        help="NHWC memory format.")(func)
    return func


@cli.command()
@click.option("--data", required=True, type=click.Path(path_type=Path), help="COCO-layout dataset directory.")
@click.option("--save", default=str(FitConfig.save), show_default=True, type=click.Path(path_type=Path),
              help="Directory for epoch_N.pt checkpoints and metrics.jsonl.")
@click.option("--epochs", default=FitConfig.epochs, show_default=True)
@click.option("--batch-size", "--bs", default=FitConfig.batch_size, show_default=True, help="Per process.")
@click.option("--eval-batch-size", "--ebs", default=FitConfig.eval_batch_size, show_default=True)
@click.option("--learning-rate", "--lr", default=FitConfig.learning_rate, show_default=True,
              help="For batch 32 on one process; scaled by batch/32 and the number of processes.")
@click.option("--multistep", default=",".join(map(str, FitConfig.multistep)), show_default=True,
              callback=_int_list, help="Epochs at which the learning rate drops x0.1.")
@click.option("--warmup", default=FitConfig.warmup, show_default=True, help="Linear warmup iterations.")
@click.option("--momentum", default=FitConfig.momentum, show_default=True)
@click.option("--weight-decay", "--wd", default=FitConfig.weight_decay, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=FitConfig.seed, show_default=True)
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Resume from this checkpoint (an epoch_N.pt of the run; see --resume-anyway).")
@click.option("--evaluation", default=",".join(map(str, FitConfig.evaluation)), show_default=True,
              callback=_int_list,
              help=f"Evaluate after these epochs ({EPOCH_LIST}); the last epoch is always evaluated.")
@click.option("--backbone", type=click.Choice(BACKBONES), default=FitConfig.backbone, show_default=True)
@click.option("--backbone-path", type=click.Path(path_type=Path),
              help="torchvision-format ResNet state dict (otherwise ImageNet weights are tried).")
@click.option("--pretrained-backbone/--no-pretrained-backbone", default=FitConfig.pretrained_backbone,
              show_default=True,
              help="Try torchvision's ImageNet weights when --backbone-path is not given.")
@click.option("--num-workers", "-j", type=int, default=None, help="Data loading workers/threads.")
@click.option("--json-summary", type=click.Path(path_type=Path), help="Write the final summary (mAP, ...) here.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N [default: cuda when available].")
@click.option("--precise-bn", default=FitConfig.precise_bn, show_default=True, metavar="BATCHES",
              help="Before each evaluation (and the last checkpoint) recompute BatchNorm statistics over this "
                   "many training batches; helps short or small-batch runs (the reference does not).")
@click.option("--augment/--no-augment", default=FitConfig.augment, show_default=True,
              help="SSD training augmentations (random IoU crop, flip, colour jitter).")
@click.option("--max-nonfinite-steps", type=click.IntRange(min=1), default=FitConfig.max_nonfinite_steps,
              show_default=True, help="A step whose loss is not finite is skipped with a warning; this many in a "
                                      "row stop the run with an error (the last checkpoint is kept).")
@click.option("--resume-anyway", is_flag=True,
              help="Resume from --checkpoint even if its run had another batch size, number of processes, number "
                   "of training images, learning rate, multistep, warmup, momentum, weight decay, seed or "
                   "augmentation setting (refused otherwise: the result would not continue that run). "
                   "--epochs may always change.")
@click.option("--log-interval", default=FitConfig.log_interval, show_default=True, metavar="STEPS",
              help="Write the mean training loss to metrics.jsonl every this many steps.")
@_data_backend_option()
@_precision_options
@user_errors
def fit(**options):
    """Train SSD300 on a COCO-layout dataset (torchrun for several processes).

    Each epoch ends with SAVE/epoch_N.pt; --checkpoint resumes from one after checking that the
    settings match the run's. With the PyTorch data backend the resumed run is exactly the
    uninterrupted one (the same data, augmentation and schedule).
    Boxes that are degenerate, non-finite or outside their image are dropped (a warning counts them);
    a box of a category the annotation file does not list, or a missing or unreadable image, is an
    error before training starts."""
    from ssd_train.data.loaders import default_backend
    from ssd_train.train import TrainingError, fit as run_fit

    options["data_backend"] = options["data_backend"] or default_backend()
    _check_training_batch(options["batch_size"])
    try:
        summary = run_fit(FitConfig(**options))
    except TrainingError as err:
        raise click.ClickException(str(err)) from None
    if summary.get("coco_summary"):
        click.echo(summary["coco_summary"].rstrip())
    if summary.get("mAP") is not None:
        click.echo(f"mAP {summary['mAP']:.4f} after {summary['epochs']} epochs; checkpoint {summary['checkpoint']}")


@cli.command()
@click.option("--data", required=True, type=click.Path(path_type=Path), help="COCO-layout dataset directory.")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--split", default="val2017", show_default=True)
@click.option("--backbone", type=click.Choice(BACKBONES), default=None,
              help="Override the checkpoint's backbone (NVIDIA checkpoints do not record it).")
@click.option("--eval-batch-size", "--ebs", default=32, show_default=True)
@click.option("--num-workers", "-j", type=int, default=None)
@click.option("--json-summary", type=click.Path(path_type=Path), help="Write mAP and the 12 COCO stats here.")
@click.option("--device", default=None)
@_data_backend_option()
@_precision_options
@user_errors
def evaluate(data, checkpoint, split, backbone, eval_batch_size, num_workers, json_summary, device,
             data_backend, amp, tf32, channels_last):
    """COCO bbox mAP of a checkpoint on a split."""
    from ssd_common.coco_eval import write_summary
    from ssd_train.models.ssd300.checkpoint import load_for_inference
    from ssd_train.data.loaders import build_eval_loader, default_backend
    from ssd_train.evaluate import evaluate_model
    from ssd_train.train import pick_device, set_math_modes

    device = pick_device(device)
    amp = device.startswith("cuda") if amp is None else amp
    set_math_modes(tf32)
    model, label_map, info = load_for_inference(checkpoint, backbone)
    loader, _ = build_eval_loader(data_backend or default_backend(), data, split, eval_batch_size, label_map,
                                  device=device, num_workers=num_workers)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch_channels_last())
    result = evaluate_model(model, loader, label_map, Path(data) / "annotations" / f"instances_{split}.json",
                            device, amp, channels_last)
    click.echo(result["summary"].rstrip())
    click.echo(f"mAP {result['mAP']:.4f}")
    if json_summary:
        write_summary(json_summary, result, checkpoint=str(checkpoint), split=split)


def _check_training_batch(batch_size: int) -> None:
    if batch_size < 2:
        raise click.BadParameter("training needs at least 2 images per batch and process (BatchNorm "
                                 "normalises the 1x1 feature map over the batch)", param_hint="--batch-size")


def torch_channels_last():
    import torch

    return torch.channels_last


# --------------------------------------------------------------------------------------------- predict
@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--backbone", type=click.Choice(BACKBONES), default=None)
@click.option("--threshold", default=0.3, show_default=True, help="Minimum score to report.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write annotated copies of the images here.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--device", default=None)
@click.option("--amp/--no-amp", default=False, show_default=True)
@user_errors
def predict(images, checkpoint, backbone, threshold, output_dir, batch_size, device, amp):
    """Detect objects in IMAGES; prints one JSON line per detection."""
    from ssd_common.draw import save_annotated
    from ssd_train.data.dali import ImageDecodeError
    from ssd_train.predict import Predictor
    from ssd_train.train import pick_device

    predictor = Predictor.from_checkpoint(checkpoint, backbone, pick_device(device), amp=amp, batch_size=batch_size)
    for path in images:
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise click.ClickException(f"cannot read image {path}: {err.strerror}") from None
        try:
            found = [d for d in predictor.detect([data])[0] if d["score"] >= threshold]
        except ImageDecodeError as err:
            raise click.ClickException(f"cannot decode image {path}: {err}") from None
        for det in found:
            click.echo(json.dumps({"image": str(path), **det}))
        if output_dir is not None:
            save_annotated(data, found, Path(output_dir) / Path(path).name)


# ---------------------------------------------------------------------------------------------- export
@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--model-repository", default="model_repository", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Triton model repository to write into (our configs are added where missing).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "both"]), default="both", show_default=True,
              help="TorchScript variants to write (the GPU ensemble serves fp16, the CPU flavour fp32).")
@click.option("--onnx", is_flag=True, help="Also write an ONNX model, checked by onnx.checker and onnxruntime.")
@click.option("--backbone", type=click.Choice(BACKBONES), default=None,
              help="Override the checkpoint's backbone (NVIDIA checkpoints do not record it).")
@user_errors
def export(checkpoint, model_repository, precision, onnx, backbone):
    """Export a checkpoint into a Triton model repository (TorchScript, label map, optional ONNX)."""
    from ssd_train.export import export_model_repository

    precisions = ("fp32", "fp16") if precision == "both" else (precision,)
    written = export_model_repository(checkpoint, model_repository, precisions, onnx=onnx, backbone=backbone)
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"serve it with: ssd-serve --model-repository {model_repository}")


# ------------------------------------------------------------------------------------------- benchmark
@cli.command()
@click.option("--mode", type=click.Choice(["training", "inference"]), required=True)
@click.option("--batch-size", "--bs", "batch_size", type=int, default=32, show_default=True)
@click.option("--batch-sizes", callback=_int_list, default=None,
              help="Sweep these batch sizes (e.g. 1,2,4,8,16,32,64) instead of --batch-size.")
@click.option("--amp/--no-amp", default=None,
              help="Only mixed precision / only full precision [default: both columns on CUDA, fp32 on CPU].")
@click.option("--tf32/--no-tf32", default=True, show_default=True)
@click.option("--channels-last/--no-channels-last", default=True, show_default=True)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model first.")
@click.option("--benchmark-warmup", default=10, show_default=True, help="Untimed iterations first.")
@click.option("--benchmark-iterations", default=20, show_default=True, help="Timed iterations.")
@click.option("--backbone", type=click.Choice(BACKBONES), default="resnet50", show_default=True)
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="COCO-layout dataset to take images from [default: synthetic].")
@_data_backend_option()
@click.option("--device", default=None)
@click.option("--json-summary", type=click.Path(path_type=Path))
@user_errors
def benchmark(mode, batch_size, batch_sizes, amp, tf32, channels_last, compile_model, benchmark_warmup,
              benchmark_iterations, backbone, data, data_backend, device, json_summary):
    """Throughput in images/s (mean, median, min, max) and the seeds' table for a sweep."""
    import torch

    from ssd_train.benchmark import result_line, run_sweep, sweep_table, write_summary
    from ssd_train.train import pick_device

    device = torch.device(pick_device(device))
    if amp is None:
        precisions = [False, True] if device.type == "cuda" else [False]
    else:
        precisions = [amp]
    sizes = list(batch_sizes or [batch_size])
    if mode == "training":
        _check_training_batch(min(sizes))
    math_name = "TF32" if device.type == "cuda" and tf32 else "FP32"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    click.echo(f"{mode} benchmark of SSD300 ({backbone}) on {where}, {benchmark_iterations} timed iterations "
               f"after {benchmark_warmup} warmup; {'real images from ' + str(data) if data else 'synthetic data'}")

    from ssd_train.data.loaders import default_backend

    results = run_sweep(mode, sizes, precisions, device, backbone, benchmark_warmup, benchmark_iterations, tf32,
                        channels_last, compile_model, data, data_backend or default_backend(),
                        lambda result: click.echo(result_line(result)))
    click.echo("")
    click.echo(sweep_table(results, math_name))
    if json_summary:
        write_summary(json_summary, results, mode=mode, device=where, backbone=backbone, tf32=tf32,
                      channels_last=channels_last, compile=compile_model, data=str(data) if data else "synthetic")


def main():
    cli(prog_name="ssd-train")


if __name__ == "__main__":
    main()
