"""Mask R-CNN training: the recipe's schedule, a short fit that learns and evaluates both mAPs,
exact resume from a mid-epoch checkpoint, and torchrun with two gloo processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ssd_common.masks import decode_mask
from ssd_train.cli import cli
from ssd_train.data.shapes import make_shapes_dataset
from ssd_train.models.maskrcnn.model import MaskRCNNSpec, build_maskrcnn
from ssd_train.models.maskrcnn.train import (BIAS_LR_FACTOR, MaskRCNNConfig, fit, lr_factor, make_optimizer,
                                             read_last_checkpoint, warmup_for)

# Tiny on purpose: a Mask R-CNN step at 128 px takes about half a second on two cores.
TINY = ["--model", "maskrcnn", "--backbone", "resnet18", "--min-size", "128", "--max-size", "128",
        "--batch-size", "2", "-j", "0", "--no-pretrained-backbone", "--rois-per-image", "32"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """12 training and 2 validation images of the demo style, with instance masks."""
    return make_shapes_dataset(tmp_path_factory.mktemp("masks"), train=12, val=2, seed=0, style="demo")


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_warmup_follows_the_global_batch():
    """500 iterations from 0.33 up to a global batch of 32, then 625 from 0.01 (the recipe's advice)."""
    assert warmup_for(16, None, None) == (500, 0.33)
    assert warmup_for(64, None, None) == (625, 0.01)
    assert warmup_for(64, 100, 0.5) == (100, 0.5)


def test_the_schedule_warms_up_linearly_then_drops_tenfold_at_each_step():
    factor = lr_factor((60000, 80000), 500, 1 / 3)
    assert factor(0) == pytest.approx(1 / 3)
    assert factor(250) == pytest.approx(1 / 3 * 0.5 + 0.5)
    assert factor(500) == factor(59999) == 1.0
    assert factor(60000) == pytest.approx(0.1)
    assert factor(80000) == pytest.approx(0.01)


def test_biases_learn_twice_as_fast_without_weight_decay():
    model = build_maskrcnn(MaskRCNNSpec("resnet18", 4, 64, 64))
    optimizer = make_optimizer(model, 0.02, 0.9, 1e-4)
    weights, biases = optimizer.param_groups
    assert weights["lr"] == 0.02 and weights["weight_decay"] == 1e-4
    assert biases["lr"] == pytest.approx(0.02 * BIAS_LR_FACTOR) and biases["weight_decay"] == 0
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trained


def test_options_of_the_other_detector_are_refused(demo_dir):
    result = CliRunner().invoke(cli, ["fit", "--model", "maskrcnn", "--data", str(demo_dir), "--epochs", "3"])
    assert result.exit_code != 0 and "--epochs is not an option of --model maskrcnn" in result.output


@pytest.mark.slow
def test_a_short_fit_learns_and_evaluates_box_and_mask_map(demo_dir, tmp_path):
    """The loss falls over 24 steps; fit's final evaluation, `evaluate` and `predict` all work on
    its checkpoint and agree with each other."""
    save = tmp_path / "run"
    run("fit", *TINY, "--data", demo_dir, "--save", save, "--iterations", 24, "--lr", 0.04, "--warmup", 4,
        "--log-interval", 4, "--checkpoint-every", 12, "--json-summary", tmp_path / "fit.json")
    logged = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in logged if e["event"] == "train"]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    summary = json.loads((tmp_path / "fit.json").read_text())
    assert 0 <= summary["bbox_mAP"] <= 1 and 0 <= summary["segm_mAP"] <= 1
    assert len(summary["bbox_stats"]) == len(summary["segm_stats"]) == 12
    assert (save / "inference" / "bbox.json").is_file() and (save / "inference" / "segm.json").is_file()
    assert sorted(p.name for p in save.glob("*.pt")) == ["model_0000012.pt", "model_0000024.pt"]
    assert read_last_checkpoint(save).name == "model_0000024.pt"

    checkpoint = save / "model_0000024.pt"
    run("evaluate", "--data", demo_dir, "--checkpoint", checkpoint, "-j", "0", "--json-summary",
        tmp_path / "eval.json", "--results-dir", tmp_path / "results")
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["bbox_mAP"] == pytest.approx(summary["bbox_mAP"], abs=1e-6)
    assert evaluated["segm_mAP"] == pytest.approx(summary["segm_mAP"], abs=1e-6)
    assert len(evaluated["bbox_stats"]) == len(evaluated["segm_stats"]) == 12
    assert json.loads((tmp_path / "results" / "segm.json").read_text())

    image = sorted((demo_dir / "val2017").iterdir())[0]
    lines = run("predict", image, "--checkpoint", checkpoint, "--threshold", "0.0",
                "--output-dir", tmp_path / "drawn").splitlines()
    found = [json.loads(line) for line in lines if line.startswith("{")]
    assert found, "an untrained-enough model still reports low-score detections at threshold 0"
    assert decode_mask(found[0]["mask"]).shape == (300, 300)
    assert (tmp_path / "drawn" / image.name).is_file()


@pytest.mark.slow
def test_per_epoch_evaluation_stops_the_run_once_both_targets_are_reached(demo_dir, tmp_path):
    """12 images in batches of 2: an epoch is 6 steps. Targets of 0 are reached by the first
    evaluation, so a run of 100 iterations ends after 6, with its checkpoint."""
    save = tmp_path / "run"
    run("fit", *TINY, "--data", demo_dir, "--save", save, "--iterations", 100, "--eval-every-epoch",
        "--min-bbox-map", 0, "--min-mask-map", 0, "--no-final-eval", "--json-summary", tmp_path / "fit.json")
    summary = json.loads((tmp_path / "fit.json").read_text())
    assert summary["stopped_early"] and summary["iterations"] == 6
    assert [e["epoch"] for e in summary["evaluations"]] == [0]
    assert read_last_checkpoint(save).name == "model_0000006.pt"


@pytest.mark.slow
def test_resuming_from_a_mid_epoch_checkpoint_continues_exactly(demo_dir, tmp_path):
    """6 training images, batch 1, 2 accumulated: 3 steps an epoch. The checkpoint after step 4 is
    in the middle of the second epoch; resuming from it ends where the uninterrupted run ends."""
    def config(save, iterations, **extra):
        return MaskRCNNConfig(data=demo_subset, save=save, iterations=iterations, batch_size=1, accumulate_steps=2,
                              learning_rate=0.02, warmup=2, checkpoint_every=4, backbone="resnet18", min_size=96,
                              max_size=96, rois_per_image=16, num_workers=0, final_eval=False, progress=False,
                              **extra)

    demo_subset = make_shapes_dataset(tmp_path / "data", train=6, val=2, seed=1, style="demo")
    fit(config(tmp_path / "straight", 6))
    fit(config(tmp_path / "interrupted", 4))
    fit(config(tmp_path / "interrupted", 6, resume=True))
    straight = torch.load(tmp_path / "straight" / "model_0000006.pt", weights_only=True)
    resumed = torch.load(tmp_path / "interrupted" / "model_0000006.pt", weights_only=True)
    assert resumed["iteration"] == straight["iteration"] == 6
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name


@pytest.mark.slow
def test_torchrun_trains_on_two_gloo_processes(demo_dir, tmp_path):
    save = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "ssd_train.cli", "fit", *TINY, "--batch-size", "1", "--data", str(demo_dir), "--save", str(save),
               "--iterations", "3", "--no-final-eval"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    start = json.loads((save / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["global_batch"] == 2
    assert start["lr"] == pytest.approx(0.02 * 2 / 16)
    assert sorted(p.name for p in save.glob("*.pt")) == ["model_0000003.pt"]  # only rank 0 writes


def test_an_image_too_thin_to_resize_stops_training_before_the_first_step(tmp_path):
    """3000x1 resizes to 0 rows at 800/1333: inference finds nothing in it, training would crash mid-step."""
    from types import SimpleNamespace

    from ssd_common.layout import DatasetError
    from ssd_train.models.maskrcnn.train import check_resizable

    images = [{"id": 1, "file_name": "photo.jpg", "width": 640, "height": 480},
              {"id": 2, "file_name": "sliver.jpg", "width": 3000, "height": 1}]
    dataset = SimpleNamespace(images=images, annotation_file=tmp_path / "instances_train2017.json")
    check_resizable(SimpleNamespace(images=images[:1], annotation_file=dataset.annotation_file), MaskRCNNSpec())
    with pytest.raises(DatasetError, match=r"image 2 \(sliver.jpg\) is 3000x1, too thin to resize"):
        check_resizable(dataset, MaskRCNNSpec())
    check_resizable(dataset, MaskRCNNSpec(min_size=800, max_size=100_000))  # a larger max keeps a row
