"""`ssd-train benchmark`: real timings in the seeds' table and the JSON summary the perf tools read."""

import json

from click.testing import CliRunner

from ssd_train.models.ssd300.benchmark import BenchmarkResult, sweep_table
from ssd_train.cli import cli


def test_table_columns_from_results():
    results = [BenchmarkResult("inference", 1, "fp32", [0.5]), BenchmarkResult("inference", 1, "amp", [0.25]),
               BenchmarkResult("inference", 4, "fp32", [1.0]), BenchmarkResult("inference", 4, "amp", [0.5])]
    rows = sweep_table(results, "TF32").splitlines()
    assert rows[0].startswith("| Batch size | Throughput - TF32 | Throughput - mixed precision |")
    assert rows[2] == "| 1 | 2.00 | 4.00 | 200% | 100% | 100% |"
    assert rows[3] == "| 4 | 4.00 | 8.00 | 200% | 200% | 200% |"


def _benchmark(tmp_path, mode, *extra, sizes="1,2"):
    summary = tmp_path / f"{mode}.json"
    result = CliRunner().invoke(cli, ["benchmark", "--mode", mode, "--batch-sizes", sizes, "--backbone", "resnet18",
                                      "--benchmark-warmup", "1", "--benchmark-iterations", "2",
                                      "--json-summary", str(summary), *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output, json.loads(summary.read_text())


def test_inference_sweep(tmp_path):
    output, summary = _benchmark(tmp_path, "inference")
    assert summary["mode"] == "inference" and [r["batch_size"] for r in summary["results"]] == [1, 2]
    for r in summary["results"]:
        assert 0 < r["throughput_min"] <= r["throughput_median"] <= r["throughput_max"]
        assert r["postprocess_mean_ms"] > 0 and r["iterations"] == 2
    table = [line for line in output.splitlines() if line.startswith("| 2 |")]
    assert table and f"{summary['results'][1]['throughput_mean']:.2f}" in table[0]


def test_training_on_a_dataset(tmp_path, shapes_dir):
    output, summary = _benchmark(tmp_path, "training", "--data", str(shapes_dir), "--data-backend", "pytorch",
                                 sizes="2,4")
    assert summary["mode"] == "training" and summary["data"] == str(shapes_dir)
    assert all(r["throughput_mean"] > 0 for r in summary["results"])
    assert "real images from" in output


def test_training_batch_of_one_is_refused():
    result = CliRunner().invoke(cli, ["benchmark", "--mode", "training", "--batch-size", "1"])
    assert result.exit_code == 2 and "at least 2 images per batch" in result.output
