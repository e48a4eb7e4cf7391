"""The GPU check: one command that verifies the toolkit on a CUDA machine and measures it, in one run
of under ten minutes on one GPU.

    python tools/gpu_check.py --output gpu_check               # on a CUDA machine: the real sizes
    python tools/gpu_check.py --output /tmp/smoke --device cpu  # the CPU smoke run the tests do
    python tools/gpu_check.py --output rerun --section "ssd300 training"  # one section (repeatable)

It runs from a plain checkout on a bare, air-gapped machine that has torch, torchvision, numpy, onnx and
onnxruntime (tqdm beside them): it imports no DALI, tritonclient or pycocotools. Sections, in order,
each with a time budget (a measurement that would start past it is skipped, with the reason):

1. SSD300 checks: decode + NMS on the GPU == on the CPU; the postprocess on tensors handed over by
   DLPack (as Triton's python backend hands them) is zero-copy and gives the same detections; the
   exported fp16 TorchScript (written by the export's own code) agrees with the eager model on the
   GPU; AMP training steps keep the loss finite and bring it down.
2. SSD300 inference, batch 1..64, TF32 and AMP: NVIDIA's README table (eager, channels_last: the
   reference's setup), then the variants -- eager NCHW, the exported TorchScript fp16, CUDA graphs --
   and which won; decode + NMS at the largest batch as a share of the forward pass.
3. torch.compile of the channels_last model at the largest batch.
4. SSD300 training, batch 32 and 64, TF32 and AMP, synthetic data, through `train_step` (what `fit` runs).
5. Mask R-CNN checks: the scripted export agrees with the eager model on the GPU; the served postprocess
   (mask pasting) on DLPack-handed GPU tensors == on the CPU; AMP training loss finite and falling.
6. Mask R-CNN inference and training in NVIDIA's README table formats; the served postprocess (masks
   pasted and RLE-encoded; needs pycocotools, so carry its wheel) as a share of the model's forward pass.

Writes OUTPUT/gpu_check.json and OUTPUT/gpu_check.md (GPU, driver, CUDA and library versions, date),
rewritten after each section, so an interrupted run still leaves what it measured. Exits 1 when a
check failed or a section broke, 0 otherwise (a goal missed or a variant skipped is reported, not failed).

With `--device cpu` everything runs at tiny sizes (ResNet-18, batch 1-2, one timed iteration): a smoke
run that keeps this script working between GPU runs; its figures say nothing about a GPU and are marked so.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A plain checkout, nothing pip-installed: the toolkit and the client's torch-free ssd_common.
sys.path[:0] = [str(ROOT), str(ROOT / "client")]

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.utils.dlpack import from_dlpack, to_dlpack  # noqa: E402

from ssd_common.masks import encode_masks  # noqa: E402
from ssd_train.benchmark import time_iterations  # noqa: E402
from ssd_train.export import quiet_torch, sample_images  # noqa: E402
from ssd_train.inference import autocast  # noqa: E402
from ssd_train.models.maskrcnn import benchmark as maskrcnn_bench  # noqa: E402
from ssd_train.models.maskrcnn import export as maskrcnn_export  # noqa: E402
from ssd_train.models.maskrcnn.inference import decode_image  # noqa: E402
from ssd_train.models.maskrcnn.model import MaskRCNNSpec, build_maskrcnn, make_decisive  # noqa: E402
from ssd_train.models.maskrcnn.train import make_optimizer  # noqa: E402
from ssd_train.models.maskrcnn.train import train_step as maskrcnn_train_step  # noqa: E402
from ssd_train.models.ssd300 import export as ssd_export  # noqa: E402
from ssd_train.models.ssd300.benchmark import (BenchmarkResult, benchmark_inference, benchmark_training,  # noqa: E402
                                               normalize_on_device, prepare_model, synthetic_images,
                                               synthetic_targets, sweep_table)
from ssd_train.models.ssd300.boxes import SCORE_THRESHOLD, TOPK_PER_CLASS, postprocess  # noqa: E402
from ssd_train.models.ssd300.inference import scale_to_pixels  # noqa: E402
from ssd_train.models.ssd300.loss import SSDLoss  # noqa: E402
from ssd_train.models.ssd300.train import parameter_groups, train_step  # noqa: E402
from ssd_train.models.ssd300.transforms import to_model_input  # noqa: E402
from ssd_train.train import make_grad_scaler, set_math_modes  # noqa: E402

GOALS = {"inference": 2100.0, "training": 640.0}  # H100, batch 64, AMP, images/s
GOAL_GPU = "H100"
AGREEMENT = 0.995  # decode + NMS, GPU vs CPU: share of detections that must match (near-ties may swap)
DETECTION_TOLERANCE = 1e-4  # ... within this (normalised boxes and scores)


@dataclass(frozen=True)
class Sizes:
    """What a run measures, and for how long."""

    backbone: str
    amps: tuple[bool, ...]  # the precisions measured: False = FP32/TF32, True = AMP
    export_precision: str  # of the exported SSD300 TorchScript checked and measured
    batch_sizes: tuple[int, ...]  # inference sweep
    variant_sizes: tuple[int, ...]  # eager NCHW, TorchScript, CUDA graphs
    compile_sizes: tuple[int, ...]  # torch.compile: one compilation per batch size and precision
    compile_backend: str
    train_batch_sizes: tuple[int, ...]
    warmup: int
    iterations: int
    train_warmup: int
    train_iterations: int
    check_steps: int  # AMP training steps of the loss checks
    maskrcnn: MaskRCNNSpec
    maskrcnn_detections: int  # per image in the checks (the mask head's cost is per detection)
    maskrcnn_batch: int  # inference and training, per GPU
    # inference's box score threshold: 0 makes every image yield the cap of 100 detections, the cost of a
    # trained model's worst case (maskrcnn.benchmark's default); None keeps the model's 0.05, at which an
    # untrained model finds nothing and skips the mask head (the checks run it)
    maskrcnn_score_threshold: float | None
    maskrcnn_warmup: int
    maskrcnn_iterations: int
    budgets: dict[str, float] = field(default_factory=dict)  # seconds per section


SECTIONS = ("ssd300 checks", "ssd300 inference", "ssd300 torch.compile", "ssd300 training", "maskrcnn checks",
            "maskrcnn benchmarks")

# Under ten minutes on one H100: the budgets add up to 520 s, plus imports and model builds.
GPU_SIZES = Sizes(
    backbone="resnet50", amps=(False, True), export_precision="fp16", batch_sizes=(1, 2, 4, 8, 16, 32, 64),
    variant_sizes=(1, 2, 4, 8, 16, 32, 64), compile_sizes=(64,), compile_backend="inductor",
    train_batch_sizes=(32, 64), warmup=10, iterations=30, train_warmup=5, train_iterations=15, check_steps=12,
    maskrcnn=MaskRCNNSpec(), maskrcnn_detections=100, maskrcnn_batch=8, maskrcnn_score_threshold=0.0,
    maskrcnn_warmup=3, maskrcnn_iterations=10, budgets=dict(zip(SECTIONS, (60, 150, 120, 60, 50, 80))))

# Tiny, to finish in well under a minute on two idle CPU cores (SSD300's input is 300x300 whatever the
# backbone). As `ssd-train benchmark` on a CPU: FP32 figures only (the checks still train with AMP);
# the TorchScript is fp32 (half-precision convolutions are about 8x slower than fp32 on a CPU);
# torch.compile's "eager" backend traces the model without compiling kernels.
CPU_SIZES = Sizes(
    backbone="resnet18", amps=(False,), export_precision="fp32", batch_sizes=(1, 2), variant_sizes=(1,),
    compile_sizes=(1,), compile_backend="eager", train_batch_sizes=(2,), warmup=0, iterations=1, train_warmup=0,
    train_iterations=1, check_steps=2, maskrcnn=MaskRCNNSpec("resnet18", min_size=128, max_size=160),
    maskrcnn_detections=10, maskrcnn_batch=1, maskrcnn_score_threshold=None, maskrcnn_warmup=0,
    maskrcnn_iterations=1, budgets=dict(zip(SECTIONS, (60,) * len(SECTIONS))))


# ----------------------------------------------------------------------------------------------
# The report


class Report:
    """What the run found, written as JSON and Markdown after each section."""

    def __init__(self, output: Path, device: torch.device, sizes: Sizes):
        self.output, self.device, self.sizes = output, device, sizes
        self.smoke = device.type != "cuda"
        self.started = time.monotonic()
        self.data: dict = {"smoke": self.smoke, "environment": environment(device), "settings": asdict(sizes),
                           "checks": [], "skipped": [], "sections": [], "ssd300": {}, "maskrcnn": {}}
        if self.smoke:
            self.data["note"] = ("CPU smoke run: tiny sizes, one timed iteration; these figures say nothing about "
                                 "a GPU")

    def progress(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {message}", flush=True)

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.data["checks"].append({"name": name, "passed": passed, "detail": detail})
        self.progress(f"check {'passed' if passed else 'FAILED'}: {name}: {detail}")

    def skip(self, what: str, reason: str) -> None:
        self.data["skipped"].append({"what": what, "reason": reason})
        self.progress(f"skipped {what}: {reason}")

    @property
    def ok(self) -> bool:
        return (all(c["passed"] for c in self.data["checks"])
                and not any("error" in s for s in self.data["sections"]))

    def write(self) -> None:
        self.data["seconds"] = time.monotonic() - self.started
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "gpu_check.json").write_text(json.dumps(self.data, indent=1) + "\n")
        (self.output / "gpu_check.md").write_text(markdown(self.data))


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_section(report: Report, name: str, section, *args) -> None:
    """Run one section within its budget; a failure is recorded (first line and where) and the run goes on."""
    seconds = report.sizes.budgets[name]
    report.progress(f"== {name} (budget {seconds:.0f} s)")
    started = time.monotonic()
    record = {"name": name, "budget": seconds}
    try:
        section(report, Budget(seconds), *args)
    except Exception as err:  # any failure of a section is reported; the next section still runs
        where = traceback.extract_tb(err.__traceback__)[-1]
        record["error"] = f"{type(err).__name__}: {first_line(err)} ({Path(where.filename).name}:{where.lineno})"
        report.progress(f"section {name} broke: {record['error']}")
    finally:
        if report.device.type == "cuda":
            torch.cuda.empty_cache()
    record["seconds"] = time.monotonic() - started
    report.data["sections"].append(record)
    report.write()


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def environment(device: torch.device) -> dict:
    def version(*distributions):
        for name in distributions:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        return "not installed"

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": version("numpy"), "onnx": version("onnx"),
            "onnxruntime": version("onnxruntime", "onnxruntime-gpu"), "commit": _command(["git", "-C", str(ROOT),
                                                                                          "rev-parse", "HEAD"]),
            "device": str(device), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    compute_capability=f"{properties.major}.{properties.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    driver=_command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                                     f"--id={device.index or 0}"]))
    else:
        info["gpu"] = f"none (CPU: {platform.processor() or platform.machine()})"
    return info


def _command(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


# ----------------------------------------------------------------------------------------------
# Shared pieces


def ssd_sample() -> torch.Tensor:
    """The export's sample photos through the PyTorch evaluation transform (the export's own sample
    goes through DALI, which this machine need not have): 2 x 3 x 300 x 300."""
    import io

    from PIL import Image

    return torch.stack([to_model_input(Image.open(io.BytesIO(data)).convert("RGB")) for data in sample_images()])


def time_forward(model, batch: int, device: torch.device, amp: bool, channels_last: bool, warmup: int,
                 iterations: int, precision: str | None = None) -> BenchmarkResult:
    """The README's inference timing (`benchmark_inference`: host-to-device copy of a uint8 batch,
    normalisation, forward) without its decode + NMS timing, which is timed once, apart (`decode_share`).
    `precision`: the label of a model whose precision is its own (the fp16 TorchScript)."""
    result = benchmark_inference(model, batch, device, amp, warmup, iterations, channels_last,
                                 time_postprocess=False)
    if precision:
        result.precision = precision
    return result


class CudaGraphModel(torch.nn.Module):
    """`model`'s forward at one input shape captured as a CUDA graph: a call copies the input into the
    captured buffer and replays the graph (no per-kernel launch cost)."""

    def __init__(self, model, example: torch.Tensor, amp: bool):
        super().__init__()
        self.static_input = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side), autocast(example.device, amp):
            for _ in range(3):  # cuDNN picks its algorithms before the capture
                model(self.static_input)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # autocast's weight cache would hold casts made during the capture: off, so each replay casts
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=amp, cache_enabled=False), \
                torch.cuda.graph(self.graph):
            self.static_output = model(self.static_input)

    def forward(self, images: torch.Tensor):
        self.static_input.copy_(images)
        self.graph.replay()
        return self.static_output


def detections_agree(got, expected) -> tuple[float, int, float]:
    """(share of detections matched, number of detections, largest score difference of the matched):
    a detection matches one of the same image and label whose box and score are within
    DETECTION_TOLERANCE. Near-equal scores may swap places across a cut-off between devices."""
    matched = total = 0
    worst = 0.0
    for (g_boxes, g_scores, g_labels), (e_boxes, e_scores, e_labels) in zip(got.per_image(), expected.per_image()):
        total += max(len(g_scores), len(e_scores))
        if not len(g_scores) or not len(e_scores):
            continue
        box_diff = (g_boxes[:, None].cpu() - e_boxes[None].cpu()).abs().amax(-1)
        score_diff = (g_scores[:, None].cpu() - e_scores[None].cpu()).abs()
        fits = ((g_labels[:, None].cpu() == e_labels[None].cpu()) & (box_diff <= DETECTION_TOLERANCE)
                & (score_diff <= DETECTION_TOLERANCE))
        found = fits.any(1)
        matched += int(found.sum())
        if found.any():
            worst = max(worst, float(torch.where(fits, score_diff, torch.inf).amin(1)[found].max()))
    return (matched / total if total else 1.0), total, worst


def goal_rows(report: Report) -> list[dict]:
    """The issue's goals against what was measured (batch 64, AMP)."""
    ssd = report.data["ssd300"]
    rows = []
    for mode in ("inference", "training"):
        what = f"SSD300 {mode}, batch 64, AMP"
        measured = next((r["throughput_mean"] for r in ssd.get(mode, [])
                         if r["batch_size"] == 64 and r["precision"] == "amp"), None)
        rows.append({"goal": what, "target": GOALS[mode], "measured": measured,
                     "met": None if measured is None or report.smoke else measured >= GOALS[mode]})
    best = ssd.get("fastest", {}).get("64")
    if best:
        rows.append({"goal": f"SSD300 inference, batch 64, fastest variant ({best['variant']} {best['precision']})",
                     "target": GOALS["inference"], "measured": best["throughput"],
                     "met": None if report.smoke else best["throughput"] >= GOALS["inference"]})
    return rows


# ----------------------------------------------------------------------------------------------
# SSD300


def checked(report: Report, name: str, check, *args) -> None:
    """Run one check, which returns (passed, detail); an exception fails the check, not the section."""
    try:
        passed, detail = check(*args)
    except Exception as err:  # e.g. an exported file that does not run on this device
        passed, detail = False, f"{type(err).__name__}: {first_line(err)}"
    report.check(name, passed, detail)


def ssd_checks(report: Report, budget: Budget, state: dict) -> None:
    device, sizes = report.device, report.sizes
    set_math_modes(False)  # full fp32 references
    model = prepare_model(sizes.backbone, device, True, False).eval()
    batch = max(sizes.batch_sizes)
    with torch.no_grad():
        outputs = [t.float() for t in model(device_batch(batch, device))]
    checked(report, "ssd300 decode + NMS, device == CPU", ssd_nms_check, report, outputs)
    checked(report, "ssd300 postprocess via DLPack", ssd_dlpack_check, report, outputs)
    del outputs
    precision = sizes.export_precision
    checked(report, f"ssd300 {precision} TorchScript == eager", ssd_torchscript_check, report, model, state)
    del model
    checked(report, "ssd300 AMP training loss finite and falling", ssd_training_check, report)


def ssd_nms_check(report: Report, outputs) -> tuple[bool, str]:
    """decode + NMS of the same outputs: one NMS call over the batch on CUDA, one per (image, class) on the CPU."""
    on_device = postprocess(*outputs)
    on_cpu = postprocess(*(t.cpu() for t in outputs))
    share, total, worst = detections_agree(on_device, on_cpu)
    where = "CPU vs CPU (smoke)" if report.smoke else f"{report.device} vs CPU"
    return share >= AGREEMENT, (f"{where}, batch {len(outputs[0])}: {total} detections, {100 * share:.2f}% match, "
                                f"scores within {worst:.1e}")


def ssd_dlpack_check(report: Report, outputs) -> tuple[bool, str]:
    """What the served postprocess does: inputs handed over by DLPack, outputs handed back the same way."""
    handed = [from_dlpack(to_dlpack(t)) for t in outputs]
    zero_copy = all(h.data_ptr() == t.data_ptr() and h.device == t.device for h, t in zip(handed, outputs))
    sizes = torch.tensor([[480, 640]] * len(outputs[0]), device=report.device)
    served = scale_to_pixels(postprocess(*handed), sizes)
    returned = [from_dlpack(to_dlpack(t.contiguous())) for t in served]
    same = all(torch.equal(r, d) for r, d in zip(returned, scale_to_pixels(postprocess(*outputs), sizes)))
    return zero_copy and same, (f"on {report.device}: zero-copy {zero_copy}, detections identical to the "
                                f"direct call {same}")


def ssd_torchscript_check(report: Report, model, state: dict) -> tuple[bool, str]:
    """The TorchScript as `ssd-train export` writes it (traced on the CPU and verified there by the export's
    own code; ExportError otherwise), loaded onto the device and compared with the eager model there."""
    device, precision = report.device, report.sizes.export_precision
    cpu_model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()
    sample = ssd_sample()
    path = Path(state["scratch"]) / f"ssd300_{precision}.pt"
    with torch.no_grad():
        reference = ssd_export.traceable(cpu_model, "fp32")(sample)
        _, outputs = ssd_export.write_torchscript(cpu_model, precision, sample, reference, path)
        state["torchscript"] = path
        if device.type == "cuda":
            with quiet_torch():
                loaded = torch.jit.load(str(path), map_location=device).eval()
            outputs = [t.cpu() for t in loaded(sample.to(device))]
            reference = [t.cpu() for t in ssd_export.traceable(model, "fp32")(sample.to(device))]
    tolerance = ssd_export.TRACE_TOLERANCE[precision]
    error = ssd_export.check_candidates(f"{precision} TorchScript", "eager fp32", outputs, reference, tolerance)
    return True, f"on {device}: differs by {error:.1e} at most (tolerance {tolerance:.0e})"


def ssd_training_check(report: Report) -> tuple[bool, str]:
    """A few AMP steps on one fixed batch through train_step, the step `fit` takes."""
    device, sizes = report.device, report.sizes
    batch = sizes.train_batch_sizes[0]
    model = prepare_model(sizes.backbone, device, True, False).train()
    optimizer = torch.optim.SGD(parameter_groups(model, 5e-4), lr=2.6e-3, momentum=0.9)
    scaler = make_grad_scaler(str(device), True)
    fixed = (normalize_on_device(synthetic_images(batch)), *synthetic_targets(batch))
    losses = [float(train_step(model, SSDLoss(), optimizer, scaler, fixed, device, True, True))
              for _ in range(sizes.check_steps)]
    finite = all(torch.isfinite(torch.tensor(losses)))
    return finite and losses[-1] < losses[0], f"batch {batch}, {len(losses)} steps: " + ", ".join(
        f"{v:.3f}" for v in losses)


def ssd_inference(report: Report, budget: Budget, state: dict) -> None:
    device, sizes = report.device, report.sizes
    set_math_modes(True)
    amps = sizes.amps
    channels_last = prepare_model(sizes.backbone, device, True, False).eval()
    measured: list[dict] = []

    def measure(variant: str, model, batch: int, amp: bool, layout: bool, precision: str | None = None):
        label = f"{variant} batch {batch} {precision or ('amp' if amp else 'fp32')}"
        if budget.left() <= 0:
            report.skip(f"ssd300 inference {label}", "the section's time budget is spent")
            return None
        try:
            result = time_forward(model, batch, device, amp, layout, sizes.warmup, sizes.iterations, precision)
        except Exception as err:  # e.g. out of memory: this measurement only
            report.skip(f"ssd300 inference {label}", f"{type(err).__name__}: {first_line(err)}")
            return None
        measured.append({"variant": variant, **result.summary()})
        report.progress(f"ssd300 inference {label}: {result.throughput:.1f} img/s")
        return result

    # NVIDIA's table: the reference's setup (eager, channels_last), TF32 and AMP
    table = [r for batch in sizes.batch_sizes for amp in amps
             if (r := measure("eager channels_last", channels_last, batch, amp, True)) is not None]
    report.data["ssd300"]["inference"] = [r.summary() for r in table]
    report.data["ssd300"]["inference_table"] = sweep_table(table, math_name(report)) if table else ""

    nchw = prepare_model(sizes.backbone, device, False, False).eval()
    for batch in sizes.variant_sizes:
        for amp in amps:
            measure("eager NCHW", nchw, batch, amp, False)
    del nchw
    if state.get("torchscript"):
        with quiet_torch():
            scripted = torch.jit.load(str(state["torchscript"]), map_location=device).eval()
        for batch in sizes.variant_sizes:  # fp32 in and out, fp16 inside (the served model's interface)
            measure("TorchScript (exported)", scripted, batch, False, False, sizes.export_precision)
        del scripted
    else:
        report.skip("ssd300 inference TorchScript", "no exported file (the checks section did not write one)")
    if device.type == "cuda":
        for batch in sizes.variant_sizes:
            for amp in amps:
                try:
                    graphed = CudaGraphModel(channels_last, device_batch(batch, device), amp)
                except Exception as err:  # a capture that fails skips this measurement only
                    report.skip(f"ssd300 inference CUDA graphs batch {batch} {'amp' if amp else 'fp32'}",
                                f"{type(err).__name__}: {first_line(err)}")
                    continue
                measure("CUDA graphs", graphed, batch, amp, True)
                del graphed
                torch.cuda.empty_cache()
    else:
        report.skip("ssd300 inference CUDA graphs", "needs a CUDA device")
    report.data["ssd300"]["variants"] = measured
    report.data["ssd300"]["fastest"] = fastest(measured)

    forward = [r for r in table if r.batch_size == max(sizes.batch_sizes)]
    if not forward:
        report.skip("ssd300 decode + NMS", f"no forward pass was timed at batch {max(sizes.batch_sizes)}")
        return
    try:
        decode_share(report, channels_last, forward)
    except Exception as err:  # e.g. out of memory in the NMS of the whole batch
        report.skip("ssd300 decode + NMS", f"{type(err).__name__}: {first_line(err)}")


def device_batch(batch: int, device: torch.device) -> torch.Tensor:
    """A normalised synthetic batch on the device, channels_last."""
    return normalize_on_device(synthetic_images(batch).to(device)).contiguous(memory_format=torch.channels_last)


def decode_share(report: Report, model, forward: list[BenchmarkResult]) -> None:
    """decode + NMS of the model's outputs at the largest batch, on the device, against its forward pass."""
    device, batch = report.device, forward[0].batch_size
    with torch.no_grad(), autocast(device, report.sizes.amps[-1]):
        locs, scores = (t.float() for t in model(device_batch(batch, device)))
    with torch.no_grad():
        top = torch.softmax(scores, 1)[:, 1:].topk(TOPK_PER_CLASS, dim=2).values
        candidates = int((top > SCORE_THRESHOLD).sum()) / batch
    seconds = time_iterations(lambda: postprocess(locs, scores), 1, max(3, report.sizes.iterations // 3), device)
    post_ms = 1000 * sum(seconds) / len(seconds)
    forward_ms = {r.precision: r.summary()["latency_mean_ms"] for r in forward}
    shares = {precision: post_ms / ms for precision, ms in forward_ms.items()}
    report.data["ssd300"]["postprocess"] = {"batch_size": batch, "decode_nms_ms": post_ms,
                                            "candidates_per_image": candidates, "forward_ms": forward_ms,
                                            "share_of_forward": shares}
    report.progress(f"ssd300 decode + NMS batch {batch}: {post_ms:.1f} ms, "
                    + ", ".join(f"{100 * s:.0f}% of the {p} forward" for p, s in shares.items()))


def fastest(measured: list[dict]) -> dict:
    """Per batch size, the variant and precision with the highest throughput."""
    best: dict = {}
    for r in measured:
        key = str(r["batch_size"])
        if key not in best or r["throughput_mean"] > best[key]["throughput"]:
            best[key] = {"variant": r["variant"], "precision": r["precision"], "throughput": r["throughput_mean"]}
    return best


def ssd_compile(report: Report, budget: Budget, state: dict) -> None:
    device, sizes = report.device, report.sizes
    set_math_modes(True)
    model = prepare_model(sizes.backbone, device, True, False).eval()
    compiled = torch.compile(model, backend=sizes.compile_backend)
    amps = sizes.amps[::-1]  # AMP first: if the budget covers one compilation, that is the one to have
    longest = 0.0
    results = []
    for batch in sizes.compile_sizes:
        for amp in amps:
            label = f"torch.compile batch {batch} {'amp' if amp else 'fp32'}"
            if budget.left() < longest:
                report.skip(f"ssd300 inference {label}", "the section's time budget would not cover another "
                                                         "compilation")
                continue
            started = time.monotonic()
            try:
                with torch.no_grad(), autocast(device, amp):
                    compiled(device_batch(batch, device))  # compiles for this shape and precision
                seconds = time.monotonic() - started
                result = time_forward(compiled, batch, device, amp, True, sizes.warmup, sizes.iterations)
            except Exception as err:  # no compiler, unsupported GPU, ...: the variant is skipped
                report.skip(f"ssd300 inference {label}", f"{type(err).__name__}: {first_line(err)}")
                break
            longest = max(longest, seconds)
            results.append({"variant": f"torch.compile ({sizes.compile_backend})", **result.summary(),
                            "compile_seconds": seconds})
            report.progress(f"ssd300 inference {label}: {result.throughput:.1f} img/s (compiled in {seconds:.0f} s)")
    ssd = report.data["ssd300"]
    ssd["variants"] = ssd.get("variants", []) + results
    ssd["fastest"] = fastest(ssd["variants"])


def ssd_training(report: Report, budget: Budget, state: dict) -> None:
    device, sizes = report.device, report.sizes
    set_math_modes(True)
    model = prepare_model(sizes.backbone, device, True, False)
    results = []
    for batch in sizes.train_batch_sizes:
        for amp in sizes.amps:
            label = f"batch {batch} {'amp' if amp else 'fp32'}"
            if budget.left() <= 0:
                report.skip(f"ssd300 training {label}", "the section's time budget is spent")
                continue
            try:
                result = benchmark_training(model, batch, device, amp, sizes.train_warmup, sizes.train_iterations)
            except Exception as err:  # e.g. out of memory: this measurement only
                report.skip(f"ssd300 training {label}", f"{type(err).__name__}: {first_line(err)}")
                continue
            results.append(result)
            report.progress(f"ssd300 training {label}: {result.throughput:.1f} img/s")
    report.data["ssd300"]["training"] = [r.summary() for r in results]
    report.data["ssd300"]["training_table"] = sweep_table(results, math_name(report)) if results else ""


def math_name(report: Report) -> str:
    return "FP32" if report.smoke else "TF32"


# ----------------------------------------------------------------------------------------------
# Mask R-CNN


def maskrcnn_checks(report: Report, budget: Budget, state: dict) -> None:
    device, spec = report.device, report.sizes.maskrcnn
    set_math_modes(False)
    torch.manual_seed(0)
    model = make_decisive(build_maskrcnn(spec)).to(device).eval()
    model.roi_heads.detections_per_img = report.sizes.maskrcnn_detections
    images = [decode_image(data).to(device) for data in sample_images()]
    inputs = maskrcnn_export.preprocess(images, spec)
    served = maskrcnn_export.ServedMaskRCNN(model).eval()
    with torch.no_grad():
        eager = served(*inputs)
    checked(report, "maskrcnn TorchScript == eager", maskrcnn_torchscript_check, report, served, inputs, eager, state)
    checked(report, "maskrcnn postprocess via DLPack, device == CPU", maskrcnn_dlpack_check, report, eager, inputs,
            maskrcnn_export.sizes_of(images))
    del model, served, eager
    checked(report, "maskrcnn AMP training loss finite and falling", maskrcnn_training_check, report)


def maskrcnn_torchscript_check(report: Report, served, inputs, eager, state: dict) -> tuple[bool, str]:
    """The scripted export (as `ssd-train export` scripts it), saved, loaded onto the device, against eager."""
    path = Path(state["scratch"]) / "maskrcnn_fp32.pt"
    with torch.no_grad(), quiet_torch():
        torch.jit.save(torch.jit.script(served), str(path))
        got = torch.jit.load(str(path), map_location=report.device).eval()(*inputs)
    tolerance = maskrcnn_export.TOLERANCE["torchscript"]
    worst = maskrcnn_export.check_outputs("the TorchScript file", [t.cpu() for t in got], [t.cpu() for t in eager],
                                          tolerance, float(served.roi_heads.score_thresh))
    return True, (f"on {report.device}: {int(eager[4].sum())} detections; boxes {worst['boxes']:.1e} px, scores "
                  f"{worst['scores']:.1e}, masks {worst['masks']:.1e} at most (tolerance {tolerance:.0e})")


def maskrcnn_dlpack_check(report: Report, outputs, inputs, original_sizes) -> tuple[bool, str]:
    """The served postprocess (boxes to original pixels, masks pasted there) on DLPack-handed tensors on the
    device, against the same on the CPU."""
    handed = [from_dlpack(to_dlpack(t)) for t in outputs]
    zero_copy = all(h.data_ptr() == t.data_ptr() for h, t in zip(handed, outputs))
    on_device = maskrcnn_export.postprocess(*handed, inputs[1], original_sizes)
    on_cpu = maskrcnn_export.postprocess(*(t.cpu() for t in outputs), inputs[1].cpu(), original_sizes)
    same_rows = all(torch.equal(a["labels"], b["labels"]) and torch.equal(a["scores"], b["scores"])
                    for a, b in zip(on_device, on_cpu))
    box_error = max((float((a["boxes"] - b["boxes"]).abs().max()) for a, b in zip(on_device, on_cpu)
                     if len(a["boxes"])), default=0.0)
    pixels = sum(a["masks"].numel() for a in on_device) or 1
    mask_error = sum(int((a["masks"] != b["masks"]).sum()) for a, b in zip(on_device, on_cpu)) / pixels
    passed = zero_copy and same_rows and box_error <= 1e-3 and mask_error <= 1e-3
    return passed, (f"on {report.device}: zero-copy {zero_copy}, same detections {same_rows}, boxes "
                    f"{box_error:.1e} px, {100 * mask_error:.3f}% of mask pixels differ")


def maskrcnn_training_check(report: Report) -> tuple[bool, str]:
    """A few AMP steps on one fixed batch through train_step, the step `fit` takes."""
    device, spec, batch = report.device, report.sizes.maskrcnn, report.sizes.maskrcnn_batch
    torch.manual_seed(0)
    model = build_maskrcnn(spec).to(device).train()
    # the recipe's learning rate for this batch at the start of its warmup (0.02 for 16 images, x 0.33)
    optimizer = make_optimizer(model, 0.02 * batch / 16 * 0.33, 0.9, 1e-4)
    scaler = make_grad_scaler(str(device), True)
    fixed = maskrcnn_bench.synthetic_batch(spec, batch)
    losses = []
    for _ in range(report.sizes.check_steps):
        torch.manual_seed(0)  # the RPN and RoI heads sample the same anchors and RoIs: only the weights change
        losses.append(maskrcnn_train_step(model, optimizer, scaler, [fixed], device, True)["loss"])
    finite = all(torch.isfinite(torch.tensor(losses)))
    return finite and losses[-1] < losses[0], f"batch {batch}, {len(losses)} steps: " + ", ".join(
        f"{v:.3f}" for v in losses)


def maskrcnn_benchmarks(report: Report, budget: Budget, state: dict) -> None:
    device, sizes = report.device, report.sizes
    data = report.data["maskrcnn"]
    for mode in maskrcnn_bench.MODES:
        if budget.left() <= 0:
            report.skip(f"maskrcnn {mode}", "the section's time budget is spent")
            continue

        def progress(result, mode=mode):
            report.progress(f"maskrcnn {mode} batch {result.batch_size} {result.precision}: "
                            f"{result.throughput:.1f} img/s")

        try:
            results = maskrcnn_bench.run_benchmark(mode, [sizes.maskrcnn_batch], sizes.amps, device, sizes.maskrcnn,
                                                   sizes.maskrcnn_warmup, sizes.maskrcnn_iterations, tf32=True,
                                                   progress=progress, score_threshold=sizes.maskrcnn_score_threshold)
        except Exception as err:  # e.g. out of memory: this mode only
            report.skip(f"maskrcnn {mode}", f"{type(err).__name__}: {first_line(err)}")
            continue
        data[mode] = [r.summary() for r in results]
        data[f"{mode}_table"] = maskrcnn_bench.table(results, math_name(report), mode)
    if budget.left() <= 0:
        report.skip("maskrcnn served postprocess", "the section's time budget is spent")
        return
    try:
        maskrcnn_postprocess_share(report)
    except Exception as err:  # e.g. out of memory: this measurement only
        report.skip("maskrcnn served postprocess", f"{type(err).__name__}: {first_line(err)}")


def maskrcnn_postprocess_share(report: Report) -> None:
    """The served postprocess (`export.postprocess_rle`: each mask pasted and RLE-encoded from its box's
    region) at the benchmark's batch, every image at the detection cap, against the served model's forward
    pass of the same batch; beside it the same masks pasted at the whole image's size and encoded from that
    (`export.postprocess` + `encode_masks`), the way it was done before. RLE needs pycocotools, which the GPU
    machine may lack (carry its wheel)."""
    device, sizes = report.device, report.sizes
    spec = sizes.maskrcnn
    torch.manual_seed(0)
    model = make_decisive(build_maskrcnn(spec)).to(device).eval()
    model.roi_heads.score_thresh = 0.0  # every image keeps the cap: the postprocess's worst case
    model.roi_heads.detections_per_img = sizes.maskrcnn_detections
    served = maskrcnn_export.ServedMaskRCNN(model).eval()
    images = [image.to(device) for image in maskrcnn_bench.synthetic_images(spec, sizes.maskrcnn_batch)]
    inputs = maskrcnn_export.preprocess(images, spec)
    originals = maskrcnn_export.sizes_of(images)
    with torch.no_grad():
        outputs = served(*inputs)

    def forward():
        with torch.no_grad():
            served(*inputs)

    def postprocess():
        return maskrcnn_export.postprocess_rle(*outputs, inputs[1], originals)

    def whole_image():
        return [encode_masks(image["masks"].numpy())
                for image in maskrcnn_export.postprocess(*outputs, inputs[1], originals)]

    try:
        postprocess()  # imports pycocotools
    except ImportError:
        report.skip("maskrcnn served postprocess", "pycocotools is not installed (carry its wheel to time it)")
        return
    repeats = max(2, sizes.maskrcnn_iterations // 2)
    ms = {name: 1000 * statistics.fmean(time_iterations(step, 1, repeats, device))
          for name, step in (("forward", forward), ("postprocess", postprocess))}
    # the old way only for comparison, twice: at the GPU sizes it takes seconds of CPU per batch
    ms["whole_image"] = 1000 * statistics.fmean(time_iterations(whole_image, 0, 2, device))
    post = {"batch_size": len(images), "image_size": list(originals[0]),
            "detections_per_image": int(outputs[4].sum()) / len(images), "forward_ms": ms["forward"],
            "postprocess_ms": ms["postprocess"], "whole_image_ms": ms["whole_image"],
            "share_of_forward": ms["postprocess"] / ms["forward"]}
    report.data["maskrcnn"]["postprocess"] = post
    report.progress(f"maskrcnn served postprocess batch {len(images)}: {ms['postprocess']:.0f} ms "
                    f"({ms['whole_image']:.0f} ms pasting whole images), {100 * post['share_of_forward']:.0f}% of "
                    f"the model's {ms['forward']:.0f} ms")


# ----------------------------------------------------------------------------------------------
# Markdown


def markdown(data: dict) -> str:
    env = data["environment"]
    smoke = data["smoke"]
    title = "CPU smoke run (not GPU figures)" if smoke else env.get("gpu", "?")
    lines = [f"# GPU check: {title}", ""]
    if smoke:
        lines += [f"**{data['note']}.** Every figure below is a CPU smoke figure.", ""]
    lines += ["| | |", "|---|---|"]
    keys = ("date", "gpu", "gpu_memory_gib", "compute_capability", "driver", "cuda", "cudnn", "torch", "torchvision",
            "numpy", "onnx", "onnxruntime", "python", "commit", "host", "cpu_threads")
    lines += [f"| {key} | {env[key]} |" for key in keys if key in env]
    settings = data["settings"]
    lines += ["", f"SSD300 backbone {settings['backbone']}; {settings['iterations']} timed inference iterations after "
              f"{settings['warmup']} warmup, {settings['train_iterations']} training after {settings['train_warmup']}; "
              f"synthetic data. Run time {data.get('seconds', 0):.0f} s.", ""]

    lines += ["## Checks", "", "| Check | Result | Detail |", "|---|---|---|"]
    lines += [f"| {c['name']} | {'pass' if c['passed'] else '**FAIL**'} | {c['detail']} |" for c in data["checks"]]
    errors = [s for s in data["sections"] if "error" in s]
    if errors:
        lines += ["", "Sections that broke: " + "; ".join(f"{s['name']}: {s['error']}" for s in errors)]

    ssd = data["ssd300"]
    if ssd.get("inference_table"):
        lines += ["", "## SSD300 inference (images/s, NVIDIA's README format)", "",
                  "Host-to-device copy, normalisation and forward pass, no decode/NMS; eager, channels_last.", "",
                  ssd["inference_table"]]
    if ssd.get("variants"):
        sizes = sorted({r["batch_size"] for r in ssd["variants"]})
        rows = {}
        for r in ssd["variants"]:
            rows.setdefault((r["variant"], r["precision"]), {})[r["batch_size"]] = r["throughput_mean"]
        lines += ["", "## SSD300 inference variants (images/s)", "",
                  "Timed as the table above. The TorchScript is the file `ssd-train export` writes (float32 in and "
                  "out); torch.compile's figures exclude the compilation.", "",
                  "| Variant | Precision | " + " | ".join(f"batch {s}" for s in sizes) + " |",
                  "|---|---|" + "---:|" * len(sizes)]
        for (variant, precision), values in rows.items():
            cells = [f"{values[s]:.1f}" if s in values else "-" for s in sizes]
            lines.append(f"| {variant} | {precision} | " + " | ".join(cells) + " |")
        best = sorted(ssd["fastest"].items(), key=lambda item: int(item[0]))
        lines += ["", "Fastest: " + "; ".join(f"batch {s}: {b['variant']} {b['precision']} ({b['throughput']:.1f} "
                                              "img/s)" for s, b in best) + "."]
    post = ssd.get("postprocess")
    if post:
        shares = ", ".join(f"{100 * s:.0f}% of the {p} forward pass ({post['forward_ms'][p]:.1f} ms)"
                           for p, s in post["share_of_forward"].items())
        lines += ["", f"## SSD300 decode + NMS at batch {post['batch_size']}", "",
                  f"{post['decode_nms_ms']:.1f} ms on the device: {shares}. The untrained model gives "
                  f"{post['candidates_per_image']:.0f} candidates per image above the 0.05 score threshold, "
                  "far more than a trained one: an upper bound."]
    if ssd.get("training_table"):
        lines += ["", "## SSD300 training (images/s, NVIDIA's README format)", "",
                  "`train_step` (what `fit` runs): forward, loss, backward, SGD step; weak scaling is against the "
                  "smallest batch.", "", ssd["training_table"]]

    spec, threshold = settings["maskrcnn"], settings["maskrcnn_score_threshold"]
    threshold = "the model's 0.05" if threshold is None else f"{threshold:g}"
    for mode in ("inference", "training"):
        table = data["maskrcnn"].get(f"{mode}_table")
        if table:
            what = f"{spec['backbone']}-FPN, images {spec['min_size']}/{spec['max_size']}"
            if mode == "inference":
                found = [r["detections_per_image"] for r in data["maskrcnn"]["inference"]]
                what += (f"; host-to-device copy and `detect` (masks pasted at the image size); box score threshold "
                         f"{threshold}: {sum(found) / len(found):.0f} detections per image")
            lines += ["", f"## Mask R-CNN {mode} (images/s, NVIDIA's README format)", "", what + ".", "", table]

    post = data["maskrcnn"].get("postprocess")
    if post:
        lines += ["", f"## Mask R-CNN served postprocess at batch {post['batch_size']}", "",
                  f"{post['detections_per_image']:.0f} detections per image of {post['image_size'][0]}x"
                  f"{post['image_size'][1]}: {post['postprocess_ms']:.1f} ms (each mask pasted and RLE-encoded "
                  f"from its box's region; {post['whole_image_ms']:.1f} ms pasting and encoding whole images), "
                  f"{100 * post['share_of_forward']:.0f}% of the served model's forward pass "
                  f"({post['forward_ms']:.1f} ms). One postprocess instance keeps up with the model while this is "
                  "under 100%; `ssd-train export --score-threshold` and more postprocess instances lower it."]

    lines += ["", f"## Goals ({GOAL_GPU})", "", "| Goal | Target | Measured | Met |", "|---|---:|---:|---|"]
    for row in data.get("goals", []):
        measured = f"{row['measured']:.1f}" if row["measured"] is not None else "-"
        met = "n/a (CPU smoke)" if smoke else "-" if row["met"] is None else "yes" if row["met"] else "**no**"
        lines.append(f"| {row['goal']} | {row['target']:.0f} | {measured} | {met} |")
    if not smoke and GOAL_GPU not in env.get("gpu", ""):
        lines += ["", f"The goals are set for an {GOAL_GPU}; this GPU is {env.get('gpu')}."]

    if data["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s['what']}: {s['reason']}" for s in data["skipped"]]
    lines += ["", "## Sections", "", "| Section | Seconds | Budget |", "|---|---:|---:|"]
    lines += [f"| {s['name']} | {s['seconds']:.0f} | {s['budget']:.0f} |" for s in data["sections"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Verify and measure the toolkit on a GPU (or, with --device cpu, "
                                     "a smoke run at tiny sizes).")  # argparse: nothing to install
    parser.add_argument("--output", type=Path, required=True, help="Directory for gpu_check.json and gpu_check.md.")
    parser.add_argument("--device", default=None,
                        help="cuda or cuda:N (default when one is visible), or cpu for the smoke run at tiny sizes.")
    parser.add_argument("--section", action="append", choices=SECTIONS, dest="sections",
                        help="Run only this section (repeat for several; default: all), e.g. to rerun one that "
                             "broke without spending the whole run's GPU time again.")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device {args.device}: expected cuda, cuda:N or cpu")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: expected cuda, cuda:N or cpu")
    if device.type != "cuda" and args.device is None or device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; pass --device cpu for the CPU smoke run")
    try:  # before any GPU time is spent: the results are written after each section
        args.output.mkdir(parents=True, exist_ok=True)
        probe = args.output / ".gpu_check_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        parser.error(f"--output {args.output}: cannot write there ({err.strerror})")
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    report = Report(args.output, device, GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    report.progress(f"GPU check on {report.data['environment']['gpu']}, torch {torch.__version__}, "
                    f"writing {args.output}")
    state: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        state["scratch"] = scratch
        for name, section in zip(SECTIONS, (ssd_checks, ssd_inference, ssd_compile, ssd_training, maskrcnn_checks,
                                            maskrcnn_benchmarks)):
            if args.sections and name not in args.sections:
                report.skip(name, "not asked for (--section)")
                continue
            run_section(report, name, section, state)
    report.data["goals"] = goal_rows(report)
    report.write()
    failed = [c["name"] for c in report.data["checks"] if not c["passed"]]
    broken = [s["name"] for s in report.data["sections"] if "error" in s]
    report.progress(f"done in {report.data['seconds']:.0f} s: {len(report.data['checks']) - len(failed)} checks passed"
                    + (f", FAILED: {', '.join(failed)}" if failed else "")
                    + (f", sections that broke: {', '.join(broken)}" if broken else "")
                    + f"; wrote {args.output / 'gpu_check.md'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
