"""`ssd-train`: the command line of the toolkit. Thin: parse options, call the library, report."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import click

from ssd_common.options import FiniteRange
from ssd_train.models.maskrcnn.model import BACKBONES as MASKRCNN_BACKBONES
from ssd_train.models.ssd300.model import BACKBONES
from ssd_train.models.ssd300.train import FitConfig

EPOCH_LIST = "comma-separated epoch indices (0-based)"


def _int_list(what: str = "integers", minimum: int = 0, ascending: bool = False, empty: bool = True):
    """A click callback reading comma-separated integers (at least `minimum`; rising with `ascending`;
    none at all only with `empty`)."""
    def callback(ctx, param, value):
        if value is None or isinstance(value, tuple):
            return value
        try:
            numbers = tuple(int(v) for v in str(value).replace(" ", ",").split(",") if v)
        except ValueError:
            raise click.BadParameter(f"expected {what}, got {value!r}") from None
        if not numbers and not empty:
            raise click.BadParameter(f"expected {what}, got {value!r}")
        if numbers and min(numbers) < minimum:
            raise click.BadParameter(f"expected {what} of at least {minimum}, got {value!r}")
        if ascending and list(numbers) != sorted(set(numbers)):
            raise click.BadParameter(f"expected {what} in rising order, got {value!r}")
        return numbers
    return callback


def _check_device(ctx, param, value):
    """--device: cpu, cuda or cuda:N, and CUDA only where there is a device to run on (one line, not torch's
    traceback deep in the run)."""
    if value is None:
        return value
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"expected cpu, cuda or cuda:N, got {value!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise click.BadParameter(f"expected cpu, cuda or cuda:N, got {value!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(f"{value}: no CUDA device is available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise click.BadParameter(f"{value}: this machine has {torch.cuda.device_count()} CUDA devices")
    return value


def _device_option(help_text: str = "cpu, cuda or cuda:N [default: cuda when available]."):
    return click.option("--device", default=None, callback=_check_device, help=help_text)


def _writable_file(ctx, param, value):
    """A file the command writes at its end (a summary): its folder must be there and writable before hours
    of work, not found missing after them."""
    if value is None:
        return value
    folder = Path(value).parent
    if value.is_dir():
        raise click.BadParameter(f"{value} is a directory")
    if not folder.is_dir():
        raise click.BadParameter(f"{value}: its folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (value.exists() and not os.access(value, os.W_OK)):
        raise click.BadParameter(f"{value}: not writable")
    return value


def user_errors(func):
    """Turn the library's input errors into one-line click errors (no traceback)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from ssd_common.labels import LabelMapError
        from ssd_train.checkpoint import CheckpointError
        from ssd_train.data.coco import DatasetError
        from ssd_train.models.backbones import BackboneError
        from ssd_train.models.maskrcnn.inference import ImageError
        from ssd_train.models.maskrcnn.model import SpecError

        errors = [CheckpointError, DatasetError, LabelMapError, BackboneError, SpecError, ImageError,
                  FileNotFoundError]
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
            message = str(err).strip()
            if "\nOriginal Traceback" in message:  # re-raised from a DataLoader worker: its last line is the error
                message = message.splitlines()[-1].split(": ", 1)[-1]
            raise click.ClickException(message) from None
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
    """Train, evaluate, predict, export and benchmark NVIDIA's SSD300 v1.1 and Mask R-CNN detectors."""
    _setup_logging(verbose)


# ---------------------------------------------------------------------------------------------- data
@cli.group("make-dataset")
def make_dataset():
    """Generate datasets in the COCO layout."""


@make_dataset.command("shapes")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train", "train_count", default=200, type=click.IntRange(min=0), show_default=True,
              help="Training images.")
@click.option("--val", "val_count", default=50, type=click.IntRange(min=0), show_default=True,
              help="Validation images.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--style", type=click.Choice(["default", "demo"]), default="default", show_default=True,
              help="demo: 300x300 images, plain backgrounds, objects of 55-165 px and one colour family per "
                   "shape -- learnable from scratch in minutes on a CPU (make demo's dataset).")
@user_errors
def make_shapes(out, train_count, val_count, seed, style):
    """Coloured circles, rectangles and triangles with boxes: a deterministic toy COCO dataset."""
    from ssd_train.data.shapes import make_shapes_dataset

    if out.exists() and any(out.iterdir()):  # it writes instances_*.json: never over someone's dataset
        raise click.ClickException(f"{out} is not empty: make-dataset writes a new dataset into a new or empty "
                                   "folder")
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


def _recipe_default(name: str) -> str:
    """The recipe default of a fit option for each detector, for its help text."""
    from ssd_train.models.maskrcnn.train import MaskRCNNConfig

    shown = []
    for detector, config in (("ssd300", FitConfig), ("maskrcnn", MaskRCNNConfig)):
        if name in config.__dataclass_fields__:
            value = config.__dataclass_fields__[name].default
            value = ",".join(map(str, value)) if isinstance(value, tuple) else value
            if value is not None:  # None: chosen at run time or off, as the option's help says
                shown.append(f"{detector}: {value}")
    return "[default " + ("; ".join(shown)) + "]" if shown else ""


# Options of `fit` that only one detector has (the others are both detectors').
SSD_ONLY = ("epochs", "multistep", "evaluation", "precise_bn", "data_backend", "channels_last")
MASKRCNN_ONLY = ("iterations", "steps", "accumulate_steps", "warmup_factor", "checkpoint_every", "eval_every_epoch",
                 "min_bbox_map", "min_mask_map", "min_size", "max_size", "trainable_layers", "resume", "final_eval",
                 "rois_per_image", "norm")
DETECTORS = ("ssd300", "maskrcnn")


def _fit_option(*names, recipe: str, **kwargs):
    """An option whose default is the chosen detector's recipe (None here: the config fills it in)."""
    help_text = kwargs.pop("help", "")
    return click.option(*names, default=None, help=f"{help_text} {_recipe_default(recipe)}".strip(), **kwargs)


def _model_option(required_for: str):
    return click.option("--model", "detector", type=click.Choice(DETECTORS), default=None,
                        help=f"Detector [default: {required_for}].")


@cli.command()
@_model_option("ssd300")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="COCO-layout dataset directory.")
@_fit_option("--save", recipe="save", type=click.Path(path_type=Path),
             help="Directory for checkpoints and metrics.jsonl.")
@_fit_option("--train-split", recipe="train_split", help="Training split: DATA/TRAIN_SPLIT/ and "
             "DATA/annotations/instances_TRAIN_SPLIT.json.")
@_fit_option("--val-split", recipe="val_split", help="Validation split (the same layout).")
@_fit_option("--epochs", recipe="epochs", type=click.IntRange(min=1), help="(ssd300)")
@_fit_option("--iterations", recipe="iterations", type=click.IntRange(min=1), help="Optimizer steps (maskrcnn).")
@_fit_option("--batch-size", "--bs", recipe="batch_size", type=click.IntRange(min=1),
             help="Per process (and micro-batch).")
@_fit_option("--accumulate-steps", recipe="accumulate_steps", type=click.IntRange(min=1),
             help="Batches accumulated into one optimizer step (maskrcnn).")
@_fit_option("--eval-batch-size", "--ebs", recipe="eval_batch_size", type=click.IntRange(min=1))
@_fit_option("--learning-rate", "--lr", recipe="learning_rate", type=FiniteRange(min=0, min_open=True),
             help="ssd300: for batch 32 per process, scaled by batch/32 x processes; maskrcnn: for a global batch "
                  "of 16, scaled linearly with the global batch (batch x processes x accumulate steps).")
@_fit_option("--multistep", recipe="multistep", callback=_int_list(EPOCH_LIST, ascending=True),
             help="Epochs at which the LR drops x0.1 (ssd300).")
@_fit_option("--steps", recipe="steps", callback=_int_list("comma-separated iterations", 1, ascending=True),
             help="Iterations at which the LR drops x0.1 (maskrcnn).")
@_fit_option("--warmup", recipe="warmup", type=click.IntRange(min=0),
             help="Linear warmup iterations (maskrcnn, when not given: 500, or 625 from a global batch of 32).")
@_fit_option("--warmup-factor", recipe="warmup_factor", type=FiniteRange(0, 1, min_open=True),
             help="LR factor the warmup starts from (maskrcnn, when not given: 0.33, or 0.01 from a global batch "
                  "of 32).")
@_fit_option("--momentum", recipe="momentum", type=FiniteRange(0, 1, max_open=True))
@_fit_option("--weight-decay", "--wd", recipe="weight_decay", type=FiniteRange(min=0))
@_fit_option("--seed", recipe="seed", type=click.IntRange(min=0))
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Resume from this checkpoint of the run (see --resume-anyway).")
@click.option("--resume", is_flag=True, default=None,
              help="Resume from the checkpoint SAVE/last_checkpoint names (maskrcnn).")
@_fit_option("--checkpoint-every", recipe="checkpoint_every", type=click.IntRange(min=1),
             help="Save a checkpoint every this many iterations, and at the end (maskrcnn).")
@_fit_option("--evaluation", recipe="evaluation", callback=_int_list(EPOCH_LIST),
             help=f"Evaluate after these epochs ({EPOCH_LIST}); the last is always evaluated (ssd300).")
@click.option("--eval-every-epoch", is_flag=True, default=None, help="Evaluate box and mask mAP after every epoch "
                                                                     "(maskrcnn).")
@_fit_option("--min-bbox-map", recipe="min_bbox_map", type=FiniteRange(0, 1),
             help="Stop once an evaluation reaches this box mAP (and --min-mask-map) (maskrcnn; off by default).")
@_fit_option("--min-mask-map", recipe="min_mask_map", type=FiniteRange(0, 1),
             help="Stop once an evaluation reaches this mask mAP (and --min-bbox-map) (maskrcnn; off by default).")
@click.option("--final-eval/--no-final-eval", default=None,
              help="Evaluate at the end and write SAVE/inference/{bbox,segm}.json (maskrcnn) [default: on].")
@_fit_option("--backbone", recipe="backbone", type=click.Choice(sorted(set(BACKBONES) | set(MASKRCNN_BACKBONES))))
@click.option("--backbone-path", type=click.Path(path_type=Path),
              help="torchvision-format ResNet state dict (otherwise ImageNet weights are tried, see below).")
@click.option("--pretrained-backbone/--no-pretrained-backbone", default=None,
              help="Try torchvision's ImageNet weights when --backbone-path is not given "
                   f"{_recipe_default('pretrained_backbone')}.")
@_fit_option("--min-size", recipe="min_size", type=click.IntRange(min=1), help="Shorter image side (maskrcnn).")
@_fit_option("--max-size", recipe="max_size", type=click.IntRange(min=1), help="Longer image side at most (maskrcnn).")
@click.option("--trainable-layers", type=click.IntRange(0, 5), default=None,
              help="ResNet stages trained, from the top; 3 freezes the stem and layer1 (maskrcnn) [default: 3 with "
                   "pretrained backbone weights, as the reference; 5 from scratch].")
@click.option("--norm", type=click.Choice(["frozen", "batch"]), default=None,
              help="The ResNet's BatchNorm: frozen (the reference's, with ImageNet statistics) or trained (maskrcnn) "
                   "[default: frozen with pretrained backbone weights; batch from scratch].")
@_fit_option("--rois-per-image", recipe="rois_per_image", type=click.IntRange(min=1),
             help="RoIs sampled per image for the box and mask heads; fewer make steps cheaper on datasets with "
                  "few objects per image (maskrcnn).")
@click.option("--num-workers", "-j", type=click.IntRange(min=0), default=None, help="Data loading workers/threads.")
@click.option("--json-summary", type=click.Path(path_type=Path), callback=_writable_file,
              help="Write the final summary (mAP, ...) here.")
@_device_option()
@_fit_option("--precise-bn", recipe="precise_bn", type=click.IntRange(min=0), metavar="BATCHES",
             help="Before each evaluation (and the last checkpoint) recompute BatchNorm statistics over this "
                  "many training batches; helps short or small-batch runs (the reference does not) (ssd300).")
@click.option("--augment/--no-augment", default=None,
              help="Training augmentations (ssd300: random IoU crop, flip, colour jitter; maskrcnn: flip) "
                   "[default: on].")
@_fit_option("--max-nonfinite-steps", recipe="max_nonfinite_steps", type=click.IntRange(min=1),
             help="A step whose loss is not finite is skipped with a warning; this many in a row stop the run with "
                  "an error (the last checkpoint is kept).")
@click.option("--resume-anyway", is_flag=True, default=None,
              help="Resume even if the checkpoint's run had another batch size, number of processes, number of "
                   "training images, learning rate, schedule, momentum, weight decay, seed or augmentation setting "
                   "(refused otherwise: the result would not continue that run). The length may always change.")
@_fit_option("--log-interval", recipe="log_interval", type=click.IntRange(min=1), metavar="STEPS",
             help="Write the mean training loss to metrics.jsonl every this many steps.")
@_data_backend_option()
@_precision_options
@click.pass_context
@user_errors
def fit(ctx, detector, **options):
    """Train SSD300 or Mask R-CNN on a COCO-layout dataset (torchrun for several processes).

    \b
    ssd300:   by epochs; SAVE/epoch_N.pt after each epoch.
    maskrcnn: by iterations; SAVE/model_NNNNNNN.pt every --checkpoint-every iterations and at the end,
              SAVE/last_checkpoint names the newest (--resume continues from it).

    --checkpoint resumes from a checkpoint after checking that the settings match its run's; the
    resumed run is exactly the uninterrupted one (with the PyTorch data pipeline). Boxes that are
    degenerate, non-finite or outside their image are dropped (a warning counts them); a box of a
    category the annotation file does not list, or a missing or unreadable image, is an error before
    training starts."""
    from ssd_train.train import TrainingError

    detector = detector or "ssd300"
    _refuse_other_detector_options(ctx, detector)
    if options["checkpoint"] or options["resume"]:
        for name in ("backbone", "backbone_path", "min_size", "max_size"):
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
                click.echo(f"warning: --{name.replace('_', '-')} is ignored: a resumed run keeps its checkpoint's "
                           "model", err=True)
    given = {k: v for k, v in options.items() if v is not None}
    try:
        if detector == "maskrcnn":
            from ssd_train.models.maskrcnn.train import MaskRCNNConfig, fit as run_fit

            config = MaskRCNNConfig(**{k: v for k, v in given.items() if k not in SSD_ONLY})
            _check_training_batch(config.batch_size, batch_norm=False)
            summary = run_fit(config)
        else:
            from ssd_train.data.loaders import default_backend
            from ssd_train.models.ssd300.train import fit as run_fit

            given.setdefault("data_backend", default_backend())
            config = FitConfig(**{k: v for k, v in given.items() if k not in MASKRCNN_ONLY})
            _check_training_batch(config.batch_size)
            summary = run_fit(config)
    except TrainingError as err:
        raise click.ClickException(str(err)) from None
    if summary.get("coco_summary"):
        click.echo(summary["coco_summary"].rstrip())
    if summary.get("mAP") is not None:
        click.echo(f"mAP {summary['mAP']:.4f} after {summary['epochs']} epochs; checkpoint {summary['checkpoint']}")
    if summary.get("bbox_mAP") is not None:
        click.echo(f"bbox mAP {summary['bbox_mAP']:.4f}, mask mAP {summary['segm_mAP']:.4f} after "
                   f"{summary['iterations']} iterations; checkpoint {summary['checkpoint']}")
    elif detector == "maskrcnn":
        click.echo(f"{summary['iterations']} iterations; checkpoint {summary['checkpoint']}")


def _refuse_other_detector_options(ctx: click.Context, detector: str) -> None:
    """An option of the other detector is a mistake worth a clear error (it would be ignored)."""
    other = MASKRCNN_ONLY if detector == "ssd300" else SSD_ONLY
    for param in ctx.command.params:
        if param.name in other and ctx.get_parameter_source(param.name) == click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError(f"{param.opts[0]} is not an option of --model {detector}")


@cli.command()
@_model_option("the checkpoint's")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="COCO-layout dataset directory.")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--split", default="val2017", show_default=True)
@click.option("--backbone", type=click.Choice(BACKBONES), default=None,
              help="Override the checkpoint's backbone (ssd300: NVIDIA checkpoints do not record it).")
@click.option("--eval-batch-size", "--ebs", type=click.IntRange(min=1), default=None,
              help="[default: ssd300 32, maskrcnn 1]")
@click.option("--num-workers", "-j", type=click.IntRange(min=0), default=None)
@click.option("--json-summary", type=click.Path(path_type=Path), callback=_writable_file,
              help="Write the mAP and the 12 COCO stats here (maskrcnn: bbox_mAP, segm_mAP and both lists).")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write the COCO result files bbox.json and segm.json here (maskrcnn).")
@_device_option()
@_data_backend_option()
@_precision_options
@user_errors
def evaluate(detector, data, checkpoint, split, backbone, eval_batch_size, num_workers, json_summary, results_dir,
             device, data_backend, amp, tf32, channels_last):
    """COCO mAP of a checkpoint on a split: bbox for SSD300, bbox and segm for Mask R-CNN."""
    from ssd_common.coco_eval import write_summary

    if _detector(detector, checkpoint) == "maskrcnn":
        return _evaluate_maskrcnn(data, checkpoint, split, eval_batch_size or 1, num_workers, json_summary,
                                  results_dir, device, amp, tf32)
    eval_batch_size = eval_batch_size or 32
    from ssd_train.models.ssd300.checkpoint import load_for_inference
    from ssd_train.data.loaders import build_eval_loader, default_backend
    from ssd_train.models.ssd300.evaluate import evaluate_model
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


def _detector(requested: str | None, checkpoint) -> str:
    """--model, or the detector the checkpoint records; they must agree."""
    from ssd_train.checkpoint import detector_of

    found = detector_of(checkpoint)
    if requested is not None and requested != found:
        raise click.UsageError(f"--model {requested}, but {checkpoint} holds a {found} checkpoint")
    return found


def _evaluate_maskrcnn(data, checkpoint, split, batch_size, num_workers, json_summary, results_dir, device, amp,
                       tf32):
    from ssd_common.coco_eval import write_instance_summary
    from ssd_train.models.maskrcnn.data import build_eval_loader
    from ssd_train.models.maskrcnn.inference import evaluate_model
    from ssd_train.models.maskrcnn.train import load_for_inference
    from ssd_train.train import pick_device, set_math_modes

    device = pick_device(device)
    amp = device.startswith("cuda") if amp is None else amp
    set_math_modes(tf32)
    model, label_map, info = load_for_inference(checkpoint)
    loader, _, annotation_file = build_eval_loader(data, split, batch_size, label_map, num_workers=num_workers)
    result = evaluate_model(model.to(device), loader, label_map, annotation_file, device, amp,
                            results_dir=results_dir)
    click.echo(result["summary"].rstrip())
    click.echo(f"bbox mAP {result['bbox_mAP']:.4f}, mask mAP {result['segm_mAP']:.4f}")
    if results_dir:
        click.echo(f"wrote {Path(results_dir) / 'bbox.json'} and {Path(results_dir) / 'segm.json'}")
    if json_summary:
        write_instance_summary(json_summary, result["bbox"], result["segm"], checkpoint=str(checkpoint), split=split,
                               iteration=info["iteration"])


def _check_training_batch(batch_size: int, batch_norm: bool = True) -> None:
    if batch_size < 1:
        raise click.BadParameter("training needs at least 1 image per batch and process", param_hint="--batch-size")
    if batch_norm and batch_size < 2:
        raise click.BadParameter("training needs at least 2 images per batch and process (BatchNorm "
                                 "normalises the 1x1 feature map over the batch)", param_hint="--batch-size")


def torch_channels_last():
    import torch

    return torch.channels_last


# --------------------------------------------------------------------------------------------- predict
@cli.command()
@_model_option("the checkpoint's")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--backbone", type=click.Choice(BACKBONES), default=None, help="Override the checkpoint's (ssd300).")
@click.option("--threshold", default=0.3, show_default=True, type=FiniteRange(0, 1),
              help="Minimum score to report.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write annotated copies of the images here (boxes, labels and masks).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@_device_option()
@click.option("--amp/--no-amp", default=False, show_default=True)
@user_errors
def predict(detector, images, checkpoint, backbone, threshold, output_dir, batch_size, device, amp):
    """Detect objects in IMAGES; prints one JSON line per detection: image, box (x1, y1, x2, y2 in
    pixels), score, category_id, category_name and, for Mask R-CNN, its mask as COCO RLE."""
    from ssd_common.draw import save_annotated
    from ssd_train.train import pick_device

    if _detector(detector, checkpoint) == "maskrcnn":
        from ssd_train.models.maskrcnn.inference import ImageError as ImageDecodeError, MaskPredictor
        from ssd_train.models.maskrcnn.train import load_for_inference

        model, label_map, _ = load_for_inference(checkpoint)
        predictor = MaskPredictor(model, label_map, pick_device(device), amp=amp, batch_size=batch_size)
    else:
        from ssd_train.data.dali import ImageDecodeError
        from ssd_train.models.ssd300.predict import Predictor

        predictor = Predictor.from_checkpoint(checkpoint, backbone, pick_device(device), amp=amp,
                                              batch_size=batch_size)
    failed = []  # a bad image is one line on stderr; the others still get their detections
    for path in images:
        try:
            data = Path(path).read_bytes()
            found = [d for d in predictor.detect([data])[0] if d["score"] >= threshold]
        except OSError as err:
            failed.append(path)
            click.echo(f"Error: cannot read image {path}: {err.strerror}", err=True)
            continue
        except ImageDecodeError as err:
            failed.append(path)
            click.echo(f"Error: {path}: {re.sub('^(image|input) 0: ', '', str(err))}", err=True)
            continue
        for det in found:
            click.echo(json.dumps({"image": str(path), **det}))
        if output_dir is not None:
            save_annotated(data, found, Path(output_dir) / Path(path).name)
    if failed:
        raise click.exceptions.Exit(1)


# ---------------------------------------------------------------------------------------------- export
@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--model-repository", default="model_repository", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Triton model repository to write into (our configs and model code are added where missing, "
                   "older model code is replaced).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "both"]), default=None,
              help="TorchScript variants to write [default: ssd300 both (the GPU ensemble serves fp16, the CPU "
                   "flavour fp32); maskrcnn fp32, its only one].")
@click.option("--onnx", is_flag=True, help="Also write an ONNX model, checked by onnx.checker and onnxruntime "
                                           "(maskrcnn: for a batch of 1).")
@click.option("--backbone", type=click.Choice(BACKBONES), default=None,
              help="Override the checkpoint's backbone (NVIDIA's SSD300 checkpoints do not record it).")
@click.option("--score-threshold", type=float, default=None,
              help="maskrcnn: the box score the served model keeps from [default: the checkpoint's, 0.05, which "
                   "COCO evaluation wants]; each kept detection costs a mask pasted and encoded per request.")
@click.option("--detections-per-image", type=int, default=None,
              help="maskrcnn: at most this many detections per image, best first (1-100) [default: 100].")
@click.option("--replace-configs", is_flag=True,
              help="Replace the repository's configs that declare other tensors than this ssd-train's (an older "
                   "one's); each is kept as config.pbtxt.previous. Without it, export stops at such a config.")
@user_errors
def export(checkpoint, model_repository, precision, onnx, backbone, score_threshold, detections_per_image,
           replace_configs):
    """Export a checkpoint (SSD300 or Mask R-CNN, as it records) into a Triton model repository: TorchScript,
    label map, optional ONNX. A repository holds both detectors' ensembles: exporting one keeps the other."""
    from ssd_train.export import export_model_repository

    if precision is None:
        precision = "both" if _detector(None, checkpoint) == "ssd300" else "fp32"
    precisions = ("fp32", "fp16") if precision == "both" else (precision,)
    written = export_model_repository(checkpoint, model_repository, precisions, onnx=onnx, backbone=backbone,
                                      score_threshold=score_threshold, detections_per_image=detections_per_image,
                                      replace_configs=replace_configs)
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"serve it with: ssd-serve --model-repository {model_repository}")


@cli.command("import-weights")
@click.argument("weights", type=click.Path(path_type=Path))
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The checkpoint to write (evaluate, predict and export take it).")
@click.option("--categories", type=click.Path(path_type=Path),
              help="A COCO annotation file whose categories the weights were trained on [default: torchvision's "
                   "COCO labels, for weights with 91 classes].")
@click.option("--min-size", default=800, show_default=True, type=click.IntRange(min=1),
              help="Shorter image side the model was trained at.")
@click.option("--max-size", default=1333, show_default=True, type=click.IntRange(min=1), help="Longer side at most.")
@user_errors
def import_weights(weights, output, categories, min_size, max_size):
    """Turn torchvision-format Mask R-CNN weights (a MaskRCNN state dict, e.g. torchvision's COCO-trained
    maskrcnn_resnet50_fpn file) into a checkpoint of this toolkit, ready to evaluate, predict and export."""
    from ssd_train.data.coco import dataset_label_map
    from ssd_train.models.maskrcnn.torchvision_weights import import_weights as run_import

    label_map = None
    if categories:
        try:
            annotations = json.loads(categories.read_text())
        except (OSError, ValueError) as err:
            raise click.ClickException(f"cannot read {categories}: {err}") from None
        label_map = dataset_label_map(annotations, None, categories)
    summary = run_import(weights, output, label_map, min_size, max_size)
    spec = summary["spec"]
    click.echo(f"wrote {output}: Mask R-CNN {spec['backbone']}-FPN ({spec['norm']} normalisation), "
               f"{summary['categories']} categories, images {spec['min_size']}/{spec['max_size']}")
    click.echo(f"export it with: ssd-train export --checkpoint {output}")


# ------------------------------------------------------------------------------------------- benchmark
@cli.command()
@click.option("--model", "detector", type=click.Choice(DETECTORS), default="ssd300", show_default=True)
@click.option("--mode", type=click.Choice(["training", "inference", "input"]), required=True,
              help="input: the training input pipeline alone, on --data (maskrcnn).")
@click.option("--batch-size", "--bs", "batch_size", type=click.IntRange(min=1), default=None,
              help="[default: ssd300 32, maskrcnn 8]")
@click.option("--batch-sizes", callback=_int_list("comma-separated batch sizes", 1, empty=False), default=None,
              help="Sweep these batch sizes (e.g. 1,2,4,8,16,32,64) instead of --batch-size.")
@click.option("--amp/--no-amp", default=None,
              help="Only mixed precision / only full precision [default: both columns on CUDA, fp32 on CPU].")
@click.option("--tf32/--no-tf32", default=True, show_default=True)
@click.option("--channels-last/--no-channels-last", default=True, show_default=True)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model first.")
@click.option("--benchmark-warmup", default=10, show_default=True, type=click.IntRange(min=0),
              help="Untimed iterations first.")
@click.option("--benchmark-iterations", default=20, show_default=True, type=click.IntRange(min=1),
              help="Timed iterations.")
@click.option("--backbone", type=click.Choice(sorted(set(BACKBONES) | set(MASKRCNN_BACKBONES))), default="resnet50",
              show_default=True)
@click.option("--min-size", type=click.IntRange(min=1), default=800, show_default=True,
              help="Shorter image side (maskrcnn).")
@click.option("--max-size", type=click.IntRange(min=1), default=1333, show_default=True,
              help="Longer image side at most (maskrcnn).")
@click.option("--processes", callback=_int_list("comma-separated numbers of processes", 1, empty=False), default="1",
              show_default=True,
              help="Training: also measure with these numbers of processes (one GPU each; gloo on CPU) for the "
                   "weak-scaling columns, e.g. 1,2,4,8 (maskrcnn).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="COCO-layout dataset to take images from [default: synthetic].")
@_data_backend_option()
@_device_option()
@click.option("--json-summary", type=click.Path(path_type=Path), callback=_writable_file)
@user_errors
def benchmark(detector, mode, batch_size, batch_sizes, amp, tf32, channels_last, compile_model, benchmark_warmup,
              benchmark_iterations, backbone, min_size, max_size, processes, data, data_backend, device, json_summary):
    """Throughput in images/s (mean, median, min, max) and NVIDIA's README table for a sweep."""
    import torch

    from ssd_train.models.ssd300.benchmark import result_line, run_sweep, sweep_table, write_summary
    from ssd_train.train import pick_device

    device = torch.device(pick_device(device))
    if amp is None:
        precisions = [False, True] if device.type == "cuda" else [False]
    else:
        precisions = [amp]
    if mode == "input":
        return _benchmark_input(detector, data, batch_size or 8, benchmark_warmup, benchmark_iterations)
    if detector == "maskrcnn":
        return _benchmark_maskrcnn(mode, list(batch_sizes or [batch_size or 8]), precisions, device, backbone,
                                   min_size, max_size, processes, benchmark_warmup, benchmark_iterations, tf32, data,
                                   json_summary)
    sizes = list(batch_sizes or [batch_size or 32])
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


def _benchmark_input(detector, data, batch_size, warmup, iterations):
    from ssd_train.data import default_workers
    from ssd_train.models.maskrcnn.benchmark import benchmark_input

    if detector != "maskrcnn" or data is None:
        raise click.UsageError("--mode input measures Mask R-CNN's input pipeline: pass --model maskrcnn and --data")
    for workers in sorted({0, default_workers()}):
        result = benchmark_input(data, batch_size, workers, warmup, iterations)
        click.echo(f"input pipeline, {workers} workers, batch {batch_size}: {result.throughput:.1f} img/s")


def _benchmark_maskrcnn(mode, sizes, precisions, device, backbone, min_size, max_size, processes, warmup,
                        iterations, tf32, data, json_summary):
    import torch

    from ssd_train.models.maskrcnn import benchmark as bench
    from ssd_train.models.maskrcnn.model import MaskRCNNSpec

    spec = MaskRCNNSpec(backbone=backbone, min_size=min_size, max_size=max_size)
    math_name = "TF32" if device.type == "cuda" and tf32 else "FP32"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    source = f"real images from {data}" if data else "synthetic data"
    click.echo(f"{mode} benchmark of Mask R-CNN ({backbone}-FPN, {min_size}/{max_size}) on {where}, {iterations} "
               f"timed iterations after {warmup} warmup; {source}")
    results = bench.run_benchmark(mode, sizes, precisions, str(device), spec, warmup, iterations, tf32,
                                  processes if mode == "training" else (1,), data,
                                  lambda result: click.echo(bench.result_line(result)))
    click.echo("")
    click.echo(bench.table(results, math_name, mode))
    if json_summary:
        bench.write_summary(json_summary, results, mode=mode, device=where, spec=spec.to_json(), tf32=tf32,
                            data=str(data) if data else "synthetic")


def main():
    cli(prog_name="ssd-train")


if __name__ == "__main__":
    main()
