"""tools/gpu_check.py, run as the GPU machine runs it: from a plain checkout (neither the toolkit nor the
client installed) without DALI, tritonclient or pycocotools. Here on the CPU (`--device cpu`, tiny sizes),
so the command keeps working between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"

# Runs the script in a fresh interpreter where the packages the GPU machine lacks fail to import and
# the editable installs of this checkout are gone (the script must find the toolkit by itself).
PRELUDE = f"""
import importlib.util, runpy, sys

MISSING = ("nvidia.dali", "tritonclient", "pycocotools")

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if any(name == m or name.startswith(m + ".") for m in MISSING):
            raise ImportError(f"{{name}} is not installed on the GPU machine")
        return None

sys.meta_path[:] = [NotInstalled()] + [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
assert importlib.util.find_spec("ssd_train") is None and importlib.util.find_spec("ssd_common") is None
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

SECTIONS = ["ssd300 checks", "ssd300 inference", "ssd300 torch.compile", "ssd300 training", "maskrcnn checks",
            "maskrcnn benchmarks"]
CHECKS = ["ssd300 decode + NMS, device == CPU", "ssd300 postprocess via DLPack", "ssd300 fp32 TorchScript == eager",
          "ssd300 AMP training loss finite and falling", "maskrcnn TorchScript == eager",
          "maskrcnn postprocess via DLPack, device == CPU", "maskrcnn AMP training loss finite and falling"]


def run_check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One CPU smoke run: (completed process, JSON report, Markdown report)."""
    work = tmp_path_factory.mktemp("gpu_check")
    out = work / "out"
    result = run_check("--device", "cpu", "--output", str(out), cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_it_runs_without_dali_tritonclient_or_pycocotools_and_every_section_finishes(smoke_run):
    result, report, _ = smoke_run
    assert [s["name"] for s in report["sections"]] == SECTIONS
    assert not [s for s in report["sections"] if "error" in s]
    assert "== ssd300 checks" in result.stdout and "done in" in result.stdout  # progress, section by section
    assert report["smoke"] is True and "CPU smoke run" in report["note"]
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["date"] and env["torchvision"] and env["onnx"]


def test_every_check_runs_and_passes(smoke_run):
    _, report, _ = smoke_run
    assert [c["name"] for c in report["checks"]] == CHECKS
    failed = [c for c in report["checks"] if not c["passed"]]
    assert not failed, failed


def test_ssd300_inference_variants_and_decode_share_are_measured(smoke_run):
    _, report, _ = smoke_run
    ssd = report["ssd300"]
    assert [(r["batch_size"], r["precision"]) for r in ssd["inference"]] == [(1, "fp32"), (2, "fp32")]
    assert all(r["throughput_mean"] > 0 for r in ssd["inference"])
    variants = {r["variant"] for r in ssd["variants"]}
    assert variants == {"eager channels_last", "eager NCHW", "TorchScript (exported)", "torch.compile (eager)"}
    assert all(r["throughput_mean"] > 0 for r in ssd["variants"])
    assert ssd["fastest"]["1"]["variant"] in variants
    post = ssd["postprocess"]
    assert post["batch_size"] == 2 and post["decode_nms_ms"] > 0 and post["share_of_forward"]["fp32"] > 0
    assert post["candidates_per_image"] > 0
    skipped = {s["what"]: s["reason"] for s in report["skipped"]}
    assert skipped["ssd300 inference CUDA graphs"] == "needs a CUDA device"


def test_training_and_maskrcnn_figures_are_measured(smoke_run):
    _, report, _ = smoke_run
    assert [(r["batch_size"], r["precision"]) for r in report["ssd300"]["training"]] == [(2, "fp32")]
    for results in (report["ssd300"]["training"], report["maskrcnn"]["inference"], report["maskrcnn"]["training"]):
        assert results and all(r["throughput_mean"] > 0 for r in results)
    # the served postprocess encodes RLE: without pycocotools (as on the bare GPU host) it is skipped, saying so
    skipped = {s["what"]: s["reason"] for s in report["skipped"]}
    assert "pycocotools is not installed" in skipped["maskrcnn served postprocess"]
    assert "postprocess" not in report["maskrcnn"]


def test_the_markdown_has_nvidias_tables_and_says_these_are_cpu_figures(smoke_run):
    _, report, markdown = smoke_run
    assert markdown.startswith("# GPU check: CPU smoke run (not GPU figures)")
    assert "Every figure below is a CPU smoke figure" in markdown
    for heading in ("## Checks", "## SSD300 inference (images/s, NVIDIA's README format)",
                    "## SSD300 inference variants (images/s)", "## SSD300 decode + NMS at batch 2",
                    "## SSD300 training (images/s, NVIDIA's README format)",
                    "## Mask R-CNN inference (images/s, NVIDIA's README format)",
                    "## Mask R-CNN training (images/s, NVIDIA's README format)",
                    "## Goals (H100)", "## Skipped"):
        assert heading in markdown
    assert ("| Batch size | Throughput - FP32 | Throughput - mixed precision | Throughput speedup (FP32 - mixed "
            "precision) | Weak scaling - FP32 | Weak scaling - mixed precision |") in markdown
    assert "| GPUs | Batch size / GPU | Throughput - FP32 | Throughput - mixed precision |" in markdown
    batch_two = next(r for r in report["ssd300"]["inference"] if r["batch_size"] == 2)
    assert f"| 2 | {batch_two['throughput_mean']:.2f} | - |" in markdown
    assert "n/a (CPU smoke)" in markdown and "**FAIL**" not in markdown


def test_one_section_can_be_rerun_alone(tmp_path):
    result = run_check("--device", "cpu", "--output", str(tmp_path / "out"), "--section", "ssd300 training",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s["name"] for s in report["sections"]] == ["ssd300 training"]
    assert report["ssd300"]["training"] and not report["checks"]
    skipped = {s["what"]: s["reason"] for s in report["skipped"]}
    assert skipped == {name: "not asked for (--section)" for name in SECTIONS if name != "ssd300 training"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_without_a_gpu_it_asks_for_the_cpu_smoke_run(tmp_path):
    result = run_check("--output", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert "no CUDA device is visible; pass --device cpu for the CPU smoke run" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_bad_device_or_an_unwritable_output_is_refused_before_any_work(tmp_path):
    """GPU time is rare: what would only fail when the first section's results are written fails first."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for args, message in ((("--device", "tpu"), "--device tpu: expected cuda, cuda:N or cpu"),
                          (("--device", "cpu", "--output", str(blocker / "out")), "cannot write there")):
        result = run_check("--output", str(tmp_path / "out"), *args, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_gpu_report_says_which_goals_were_met_and_what_failed():
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check

    data = {"smoke": False, "environment": {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580.65"},
            "settings": asdict(gpu_check.GPU_SIZES), "checks": [{"name": "a check", "passed": False, "detail": "why"}],
            "skipped": [], "sections": [{"name": "ssd300 inference", "seconds": 1.0, "budget": 150,
                                         "error": "RuntimeError: boom (gpu_check.py:1)"}],
            "ssd300": {"inference": [{"batch_size": 64, "precision": "amp", "throughput_mean": 2500.0}],
                       "training": [{"batch_size": 64, "precision": "amp", "throughput_mean": 600.0}],
                       "fastest": {"64": {"variant": "CUDA graphs", "precision": "amp", "throughput": 2900.0}}},
            "maskrcnn": {}}
    data["goals"] = gpu_check.goal_rows(SimpleNamespace(data=data, smoke=False))
    assert [row["met"] for row in data["goals"]] == [True, False, True]
    markdown = gpu_check.markdown(data)
    assert markdown.startswith("# GPU check: NVIDIA H100 80GB HBM3\n") and "| driver | 580.65 |" in markdown
    assert "| SSD300 inference, batch 64, AMP | 2100 | 2500.0 | yes |" in markdown
    assert "| SSD300 training, batch 64, AMP | 640 | 600.0 | **no** |" in markdown
    assert "| SSD300 inference, batch 64, fastest variant (CUDA graphs amp) | 2100 | 2900.0 | yes |" in markdown
    assert "| a check | **FAIL** | why |" in markdown
    assert "Sections that broke: ssd300 inference: RuntimeError: boom" in markdown
    assert "The goals are set for an H100" not in markdown and "smoke" not in markdown


def test_with_pycocotools_the_served_postprocess_is_timed_against_the_model(tmp_path):
    """In this interpreter (pycocotools installed, as a GPU host may have it carried): the served postprocess
    at the detection cap, the whole-image way beside it, and its share of the served model's forward pass."""
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check

    report = gpu_check.Report(tmp_path, torch.device("cpu"), gpu_check.CPU_SIZES)
    gpu_check.maskrcnn_postprocess_share(report)
    post = report.data["maskrcnn"]["postprocess"]
    assert post["batch_size"] == 1 and post["detections_per_image"] == 10 and post["image_size"] == [128, 160]
    assert post["postprocess_ms"] > 0 and post["whole_image_ms"] > 0 and post["forward_ms"] > 0
    assert post["share_of_forward"] == post["postprocess_ms"] / post["forward_ms"]
    assert "## Mask R-CNN served postprocess at batch 1" in gpu_check.markdown(
        {**report.data, "goals": [], "sections": []})
