"""Mask R-CNN throughput benchmark: tiny resnet18 models on the CPU, 1 warmup and 1-2 timed iterations."""

import json
import math

import pytest

from ssd_train.models.maskrcnn import model as maskrcnn_model
from ssd_train.models.maskrcnn.benchmark import Result, result_line, run_benchmark, table, write_summary
from ssd_train.models.maskrcnn.model import MaskRCNNSpec

SPEC = MaskRCNNSpec("resnet18", num_classes=3, min_size=64, max_size=96)
TRAINING_HEADER = ("| GPUs | Batch size / GPU | Throughput - FP32 | Throughput - mixed precision | Throughput speedup "
                   "(FP32 - mixed precision) | Weak scaling - FP32 | Weak scaling - mixed precision |")
INFERENCE_HEADER = ("| GPUs | Batch size / GPU | Throughput - FP32 | Throughput - mixed precision | Throughput speedup "
                    "(FP32 - mixed precision) |")


@pytest.fixture
def light_heads(monkeypatch):
    """Fewer sampled RoIs and detections in models built in this process: the mask head's cost scales
    with them, and it is most of a tiny model's (spawned processes build the full model)."""
    monkeypatch.setattr(maskrcnn_model, "ROIS_PER_IMAGE", 32)
    monkeypatch.setattr(maskrcnn_model, "DETECTIONS_PER_IMAGE", 8)


def assert_measured(result: Result, iterations: int) -> None:
    assert all(len(seconds) == iterations for seconds in result.seconds)
    assert result.throughput > 0 and math.isfinite(result.throughput)
    summary = result.summary()
    assert summary["throughput_min"] <= summary["throughput_median"] <= summary["throughput_max"]
    assert "img/s" in result_line(result)


def test_training_gives_a_positive_finite_throughput_for_batches_1_and_2(light_heads):
    """Each batch size is timed over whole train_steps and reported once, in order."""
    results = run_benchmark("training", [1, 2], [False], "cpu", SPEC, warmup=1, iterations=1)
    assert [(r.mode, r.processes, r.batch_size, r.precision) for r in results] == [
        ("training", 1, 1, "fp32"), ("training", 1, 2, "fp32")]
    for result in results:
        assert_measured(result, 1)
        assert result.nonfinite_steps == 0


def test_inference_gives_a_positive_finite_throughput_with_masks_pasted(light_heads):
    """An untrained model finds nothing above the usual threshold; the benchmark keeps every detection
    up to the cap, so the mask head and mask pasting are part of what it times."""
    results = run_benchmark("inference", [1, 2], [False], "cpu", SPEC, warmup=1, iterations=2)
    assert [(r.processes, r.batch_size) for r in results] == [(1, 1), (1, 2)]
    for result in results:
        assert_measured(result, 2)
        assert result.detections_per_image == 8  # the cap (light_heads)


def test_tables_have_the_readme_columns_and_one_row_per_processes_and_batch_size():
    """The tables are meant to sit next to NVIDIA's: same columns, ratios written as the README does."""
    results = [Result("training", processes, batch, precision, [[batch / rate]] * processes)
               for processes in (1, 2) for batch in (1, 2)
               for precision, rate in (("fp32", 2.0), ("amp", 3.0))]
    lines = table(results, "FP32", "training").splitlines()
    assert lines[0] == TRAINING_HEADER
    assert len(lines) == 2 + 4
    # 2 processes at 2 img/s each: 4 img/s, twice one process's; mixed precision 1.5x faster.
    assert lines[2:] == ["| 1 | 1 | 2.00 | 3.00 | 1.50 | 1.00 | 1.00 |", "| 1 | 2 | 2.00 | 3.00 | 1.50 | 1.00 | 1.00 |",
                         "| 2 | 1 | 4.00 | 6.00 | 1.50 | 2.00 | 2.00 |", "| 2 | 2 | 4.00 | 6.00 | 1.50 | 2.00 | 2.00 |"]

    inference = [Result("inference", 1, batch, "fp32", [[1.0]]) for batch in (1, 8)]
    lines = table(inference, "FP32", "inference").splitlines()
    assert lines[0] == INFERENCE_HEADER
    assert lines[2:] == ["| 1 | 1 | 1.00 | - | - |", "| 1 | 8 | 8.00 | - | - |"]


def test_two_gloo_processes_train_and_report_weak_scaling(tmp_path):
    """Weak scaling needs the same step timed in 1 process and in a 2-process DDP group."""
    results = run_benchmark("training", [1], [False], "cpu", SPEC, warmup=1, iterations=1, processes=(1, 2))
    assert [r.processes for r in results] == [1, 2]
    two = results[1]
    assert len(two.seconds) == 2  # each process timed its own steps
    assert_measured(two, 1)
    assert two.throughput == pytest.approx(sum(two.summary()["throughput_per_process"]))
    assert table(results, "FP32", "training").splitlines()[3].startswith("| 2 | 1 | ")

    write_summary(tmp_path / "summary.json", results, mode="training", data="synthetic")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "training" and len(summary["results"]) == 2
    scaling = summary["results"][1]
    assert scaling["weak_scaling"] == pytest.approx(two.throughput / results[0].throughput)
    assert scaling["scaling_efficiency"] == pytest.approx(scaling["weak_scaling"] / 2)


def test_real_batches_from_a_coco_layout_dataset_train_and_infer(tmp_path, light_heads):
    """`data_dir` swaps the synthetic batches for the loaders' (with the dataset's classes)."""
    from ssd_train.data.shapes import make_shapes_dataset

    data = make_shapes_dataset(tmp_path, 4, 2, style="demo")
    annotations = json.loads((data / "annotations" / "instances_train2017.json").read_text())["annotations"]
    if not all(a.get("segmentation") for a in annotations):
        pytest.skip("the shapes dataset has no masks (segmentation) to train Mask R-CNN on")
    training = run_benchmark("training", [1], [False], "cpu", SPEC, warmup=1, iterations=1, data_dir=data)
    inference = run_benchmark("inference", [2], [False], "cpu", SPEC, warmup=1, iterations=1, data_dir=data)
    for result in training + inference:
        assert_measured(result, 1)


def test_the_input_pipeline_is_measured_alone(tmp_path):
    """`--mode input` times the training loader (decode, masks, flip, batching) without a model: the
    figure README sets against a training step to decide whether DALI would pay."""
    from click.testing import CliRunner

    from ssd_train.cli import cli
    from ssd_train.data.shapes import make_shapes_dataset

    data = make_shapes_dataset(tmp_path, 4, 1, style="demo")
    result = CliRunner().invoke(cli, ["benchmark", "--model", "maskrcnn", "--mode", "input", "--data", str(data),
                                      "--bs", "2", "--benchmark-warmup", "1", "--benchmark-iterations", "2"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("input pipeline")]
    assert lines and all(float(line.split(": ")[1].split()[0]) > 0 for line in lines)
    refused = CliRunner().invoke(cli, ["benchmark", "--mode", "input", "--data", str(data)])
    assert refused.exit_code != 0 and "--model maskrcnn" in refused.output


def test_the_cli_prints_the_readme_table():
    from click.testing import CliRunner

    from ssd_train.cli import cli

    result = CliRunner().invoke(cli, ["benchmark", "--model", "maskrcnn", "--mode", "training", "--backbone",
                                      "resnet18", "--min-size", "64", "--max-size", "64", "--bs", "1",
                                      "--benchmark-warmup", "0", "--benchmark-iterations", "1"])
    assert result.exit_code == 0, result.output
    assert TRAINING_HEADER in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("| 1 | 1 |"))
    assert float(row.split("|")[3]) > 0
