"""Sweep batch sizes (and concurrency) of the served SSD300 and Mask R-CNN with perf_analyzer, Triton's
load generator.

    python tools/perf_sweep.py --url localhost:8000 --output-dir perf_results
    python tools/perf_sweep.py --protocol grpc --url gpu-host:8001 --measurement-request-count 50 \
        --stability-percentage 10 --concurrency 1,4 --collect-metrics --compare-in-process
    python tools/perf_sweep.py --models maskrcnn,maskrcnn_model --model-repository model_repository \
        --compare-in-process

Measures the fp32 and fp16 SSD models alone (NVIDIA's "TF32" and "mixed precision" columns), SSD300's
whole ensemble (JPEG bytes in, detections out), and Mask R-CNN's model alone and whole ensemble (JPEG
bytes in, detections and masks out); keeps every raw perf_analyzer CSV under OUTPUT_DIR/raw/, and
writes OUTPUT_DIR/perf_sweep.md (NVIDIA's README tables with latency, each ensemble's per-model
breakdown), OUTPUT_DIR/perf_sweep.png and OUTPUT_DIR/measurements.json.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules when run as a script

import perf_inputs  # noqa: E402
import perf_report  # noqa: E402
from perf_analyzer_env import PerfAnalyzer, PerfAnalyzerSetupError, locate  # noqa: E402
from perf_server import ServerCheckError, check_server, mean_detections  # noqa: E402

from ssd_common import io  # noqa: E402

MODEL_CHOICES = {"fp32": io.MODEL_FP32, "fp16": io.MODEL_FP16, "ensemble": io.ENSEMBLE,
                 "maskrcnn": io.MASKRCNN_ENSEMBLE, "maskrcnn_model": io.MASKRCNN_MODEL}
SSD_ALONE = {"fp32", "fp16"}
MASKRCNN = {"maskrcnn", "maskrcnn_model"}
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
UNSTABLE_EXIT_CODE = 2  # perf_analyzer: "Failed to obtain stable measurement"


@dataclass(frozen=True)
class Run:
    precision: str
    model: str
    batch_size: int
    concurrency: int

    @property
    def csv_name(self) -> str:
        return f"{self.model}_b{self.batch_size}_c{self.concurrency}.csv"


def int_list(minimum: int = 1):
    """A click callback: comma-separated integers of at least `minimum` -> sorted, without repeats."""
    def parse(ctx, param, value: str | None) -> list[int] | None:
        if value is None:
            return None
        try:
            numbers = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
        if not numbers or any(n < minimum for n in numbers):
            kind = {0: "non-negative", 1: "positive"}.get(minimum, f"at least {minimum}:")
            raise click.BadParameter(f"expected {kind} integers, got {value!r}")
        return sorted(set(numbers))
    return parse


def model_list(ctx, param, value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in MODEL_CHOICES]
    if not names or unknown:
        raise click.BadParameter(f"choose from {', '.join(MODEL_CHOICES)} (got {value!r})")
    return list(dict.fromkeys(names))


def strip_scheme(url: str) -> str:
    """perf_analyzer and tritonclient take host:port."""
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            return url[len(scheme):]
    return url


def metrics_url_for(url: str) -> str:
    host = url.rsplit(":", 1)[0] if ":" in url else url
    return f"{host}:8002/metrics"


def perf_analyzer_args(run: Run, url: str, protocol: str, input_data: Path, options: dict) -> list[str]:
    args = [
        "-m", run.model,
        "-u", url,
        "-i", protocol,
        "-b", str(run.batch_size),
        "--concurrency-range", str(run.concurrency),
        "--input-data", str(input_data),
        "--measurement-mode", "count_windows",
        "--measurement-request-count", str(options["measurement_request_count"]),
        "--stability-percentage", str(options["stability_percentage"]),
        "--max-trials", str(options["max_trials"]),
        "-f", run.csv_name,  # relative: perf_analyzer prefixes the composing models' file names to it
        "--verbose-csv",
    ]
    if options["collect_metrics"]:
        args += ["--collect-metrics", "--metrics-url", options["metrics_url"]]
    return args


def run_perf_analyzer(pa: PerfAnalyzer, run: Run, args: list[str], raw_dir: Path) -> None:
    for stale in [raw_dir / run.csv_name, *perf_report.composing_files(raw_dir, run.csv_name)]:
        stale.unlink(missing_ok=True)
    proc = pa.run(args, raw_dir)
    log = raw_dir / (Path(run.csv_name).stem + ".log")
    log.write_text(f"$ perf_analyzer {shlex.join(proc.args[1:])}\n{proc.stdout}{proc.stderr}")
    where = f"{run.model} batch {run.batch_size} concurrency {run.concurrency}"
    if proc.returncode == UNSTABLE_EXIT_CODE:
        raise click.ClickException(
            f"unstable measurement for {where}: raise --measurement-request-count or "
            f"--stability-percentage (or --max-trials); perf_analyzer's log: {log}"
        )
    if proc.returncode != 0:
        lines = [l.strip() for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
        errors = [l for l in lines if l.lower().startswith("error")] or lines[-1:] or ["no output"]
        raise click.ClickException(f"perf_analyzer failed for {where} (exit {proc.returncode}): {errors[0]}")
    if not (raw_dir / run.csv_name).is_file():
        raise click.ClickException(f"perf_analyzer wrote no {run.csv_name} for {where}; see {log}")


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    if shutil.which("nvidia-smi"):
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True)
        names = [g.strip() for g in gpus.stdout.splitlines() if g.strip()] if gpus.returncode == 0 else []
        if names:
            text += ", " + ", ".join(f"{n}x {g}" for g, n in Counter(names).items())
    return text


def find_ssd_train() -> str:
    beside = Path(sys.executable).parent / "ssd-train"
    found = str(beside) if beside.is_file() else shutil.which("ssd-train")
    if not found:
        raise click.ClickException("--compare-in-process needs the `ssd-train` command (pip install the project)")
    return found


def run_in_process_benchmark(batch_sizes: list[int], summary: Path, args: list[str]) -> dict:
    command = [find_ssd_train(), "benchmark", "--mode", "inference",
               "--batch-sizes", ",".join(map(str, batch_sizes)), "--json-summary", str(summary), *args]
    click.echo(f"in-process benchmark: {shlex.join(command)}", err=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    summary.with_suffix(".log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        last = ([l for l in proc.stderr.splitlines() if l.strip()] or ["no output"])[-1]
        raise click.ClickException(f"ssd-train benchmark failed (exit {proc.returncode}): {last}")
    try:
        return perf_report.read_in_process(summary)
    except perf_report.ReportError as err:
        raise click.ClickException(str(err)) from None


def run_in_process(swept: set[str], sizes: dict, maskrcnn: dict | None, in_process_args: str, out: Path
                   ) -> tuple[dict | None, dict | None]:
    """`ssd-train benchmark --mode inference` of each detector whose models are swept, at their batch
    sizes: (SSD300's figures, Mask R-CNN's), None for a detector not swept."""
    ssd = mask = None
    extra = shlex.split(in_process_args)
    if SSD_ALONE & swept:
        batches = sorted({b for m in SSD_ALONE & swept for b in sizes[m]})
        ssd = run_in_process_benchmark(batches, out / "in_process.json", extra)
    if MASKRCNN & swept:
        batches = sorted({b for m in MASKRCNN & swept for b in sizes[m]})
        # The served export's sizes and backbone last: they win over --in-process-args (SSD300's get them too).
        served = ["--min-size", str(maskrcnn["min_size"]), "--max-size", str(maskrcnn["max_size"])]
        served += ["--backbone", maskrcnn["backbone"]] if maskrcnn["backbone"] else []
        mask = run_in_process_benchmark(batches, out / "in_process_maskrcnn.json",
                                        ["--model", "maskrcnn", *extra, *served])
    return ssd, mask


def maskrcnn_export(repository: Path | None, min_size: int | None, max_size: int | None) -> dict:
    """The served Mask R-CNN's image sizes: --min-size/--max-size, else its export's in --model-repository
    (the file its preprocess step reads), with the backbone its manifest records (for the in-process run)."""
    from ssd_train.models.maskrcnn.preprocess import read_resize
    from ssd_train.serving.manifest import ManifestError, read_manifest

    if min_size and max_size:
        return {"min_size": min_size, "max_size": max_size, "backbone": None}
    try:
        min_size, max_size = read_resize(repository / io.MASKRCNN_PREPROCESS / "1" / io.RESIZE_FILE)
        backbone = read_manifest(repository).get("exports", {}).get("maskrcnn", {}).get("backbone")
    except (ValueError, ManifestError) as err:
        raise click.ClickException(str(err)) from None
    return {"min_size": min_size, "max_size": max_size, "backbone": backbone}


def load_images(images_dir: Path | None, num_images: int) -> list[tuple[str, bytes]]:
    try:
        return (perf_inputs.directory_images(images_dir, num_images) if images_dir
                else perf_inputs.default_photos()[:num_images])
    except perf_inputs.InputDataError as err:
        raise click.ClickException(str(err)) from None


def build_inputs(models: list[str], images: list[tuple[str, bytes]], maskrcnn: dict | None, out: Path
                 ) -> tuple[dict[str, Path], list[str]]:
    """One --input-data file per input kind the sweep needs (JPEG bytes; preprocessed tensors), by
    --models name, and a description of each."""
    names = ", ".join(name for name, _ in images)
    paths, described = {}, [f"{len(images)} real photo(s) ({names})"]
    try:
        if {"ensemble", "maskrcnn"} & set(models):
            jpeg = perf_inputs.write_input_data(out / "input_jpeg.json", perf_inputs.encoded_image_data(images))
            paths["ensemble"] = paths["maskrcnn"] = jpeg
        if SSD_ALONE & set(models):
            tensor = perf_inputs.write_input_data(
                out / "input_preprocessed.json", perf_inputs.preprocessed_image_data(images))
            paths["fp32"] = paths["fp16"] = tensor
        if "maskrcnn_model" in models:
            data = perf_inputs.maskrcnn_preprocessed_data(images, maskrcnn["min_size"], maskrcnn["max_size"])
            paths["maskrcnn_model"] = perf_inputs.write_input_data(out / "input_maskrcnn.json", data)
            shape = data["data"][0][io.MASKRCNN_LIBTORCH_INPUTS[0]]["shape"]
            described.append(
                f"`{io.MASKRCNN_MODEL}` takes them preprocessed at min/max size {maskrcnn['min_size']}/"
                f"{maskrcnn['max_size']} as one batch, each padded to the batch's {'x'.join(map(str, shape))}")
    except perf_inputs.InputDataError as err:
        raise click.ClickException(str(err)) from None
    return paths, described


def batch_sizes_per_model(models: list[str], requested: list[int] | None, server) -> tuple[dict, list[str]]:
    """Each model's batch sizes: --batch-sizes as given (check_server refused any over a model's
    max_batch_size), or the default sweep up to the model's max_batch_size (Mask R-CNN's is 8), with a
    note of what that skipped."""
    sizes, notes = {}, []
    for name in models:
        if requested:
            sizes[name] = requested
            continue
        limit = server.max_batch_size(MODEL_CHOICES[name])
        sizes[name] = [b for b in DEFAULT_BATCH_SIZES if b <= limit]
        skipped = [b for b in DEFAULT_BATCH_SIZES if b > limit]
        if skipped:
            notes.append(f"`{MODEL_CHOICES[name]}`: batch sizes over its max_batch_size {limit} skipped "
                         f"({', '.join(map(str, skipped))})")
    return sizes, notes


def ssd_sections(measurements: list, models: list[str], c: int, math: str, steps: list[str],
                 in_process: dict | None) -> list[str]:
    math_note = ("The served fp32 model runs on CPU here, so NVIDIA's TF32 column is plain FP32."
                 if math == "FP32" else "TF32 = the fp32 model (TF32 convolutions on Ampere and newer GPUs).")
    sections = []
    if SSD_ALONE & set(models):
        sections += [
            (f"## SSD300 alone: `{io.MODEL_FP32}` ({math}) and `{io.MODEL_FP16}` (mixed precision), "
            f"concurrency {c}"),
            "",
            f"Throughput in images/s. {math_note}",
            "",
            perf_report.models_table(measurements, c, math),
            "",
        ]
    if "ensemble" in models:
        sections += [
            f"## Whole ensemble `{io.ENSEMBLE}` (JPEG bytes in, detections out), concurrency {c}",
            "",
            "Throughput in images/s.",
            "",
            perf_report.ensemble_table(measurements, c),
            "",
            f"### `{io.ENSEMBLE}`: server time per request in each composing model, concurrency {c}",
            "",
            perf_report.breakdown_table(measurements, c, order=steps),
            "",
        ]
    if in_process is not None:
        sections += [
            (f"## Served model alone (concurrency {c}) vs in-process `ssd-train benchmark` on "
            f"{in_process['device']}"),
            "",
            "Throughput in images/s (in-process: throughput_mean of its JSON summary).",
            "",
            perf_report.compare_table(measurements, in_process, c, math),
            "",
        ]
    return sections


def maskrcnn_sections(measurements: list, models: list[str], c: int, math: str, steps: list[str],
                      in_process: dict | None, served_detections: float | None) -> list[str]:
    sections = []
    if "maskrcnn_model" in models:
        sections += [
            f"## Mask R-CNN alone: `{io.MASKRCNN_MODEL}` ({math}), concurrency {c}",
            "",
            ("Throughput in images/s, as NVIDIA's Mask R-CNN inference table (without its mixed-precision "
             "columns: Mask R-CNN is exported in fp32 only), with weak scaling and latency."),
            "",
            perf_report.ensemble_table(measurements, c, precision="maskrcnn_model", math=math),
            "",
        ]
    if "maskrcnn" in models:
        sections += [
            (f"## Whole ensemble `{io.MASKRCNN_ENSEMBLE}` (JPEG bytes in, detections and masks out), "
             f"concurrency {c}"),
            "",
            "Throughput in images/s.",
            "",
            perf_report.ensemble_table(measurements, c, precision="maskrcnn"),
            "",
            f"### `{io.MASKRCNN_ENSEMBLE}`: server time per request in each composing model, concurrency {c}",
            "",
            perf_report.breakdown_table(measurements, c, order=steps, precision="maskrcnn"),
            "",
        ]
    if in_process is not None:
        local = [v for (p, _), v in in_process["detections"].items() if p == "fp32"]
        detections = f"in-process {sum(local) / len(local):.1f}" if local else "in-process not recorded"
        if served_detections is not None:
            detections += f", served {served_detections:.1f} on the sweep's photos (the checkpoint's score threshold)"
        sections += [
            (f"## Mask R-CNN served (concurrency {c}) vs in-process `ssd-train benchmark --model maskrcnn` on "
             f"{in_process['device']}"),
            "",
            ("Throughput in images/s, fp32, at the served export's min/max size (in-process: throughput_mean "
             "of its JSON summary, synthetic images, the resize, the model and the masks pasted at the image "
             "size; the served model alone leaves out the resize and the pasting, the ensemble adds decoding, "
             "the image check and RLE-encoding the masks). The mask head's cost grows with the detections: "
             f"per image {detections}; in-process scores are not thresholded, so every image gets the "
             "100-detection cap."),
            "",
            perf_report.maskrcnn_compare_table(measurements, in_process, c),
            "",
        ]
    return sections


def write_report(out: Path, title: str, header_lines: list[str], sections: list[str]) -> Path:
    path = out / "perf_sweep.md"
    path.write_text("\n".join([f"# {title} served by Triton: perf_analyzer sweep", "", *header_lines, "",
                               *sections]))
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--url", default=None, help="Triton host:port [default: localhost:8000 (http), localhost:8001 (grpc)]")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http")
@click.option("--models", "models", default="fp32,fp16,ensemble", callback=model_list,
              help="Any of fp32, fp16 (the SSD models alone), ensemble (SSD300's whole pipeline), maskrcnn "
                   "(Mask R-CNN's whole pipeline) and maskrcnn_model (the Mask R-CNN model alone).")
@click.option("--batch-sizes", default=None, callback=int_list(),
              help="[default: 1,2,4,8,16,32,64, each model's up to its max_batch_size (Mask R-CNN's: 8)]")
@click.option("--concurrency", default="1", callback=int_list(), help="Concurrent requests, e.g. 1,2,4.")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Directory of JPEG/PNG photos [default: scikit-image's sample photos]")
@click.option("--num-images", default=8, type=click.IntRange(1), help="Photos used from --images.")
@click.option("--model-repository", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The served repository: Mask R-CNN's image sizes (and backbone) from its export, for "
                   "maskrcnn_model and --compare-in-process.")
@click.option("--min-size", type=click.IntRange(1), default=None,
              help="Mask R-CNN's shorter image side, with --max-size, instead of --model-repository's.")
@click.option("--max-size", type=click.IntRange(1), default=None, help="Mask R-CNN's longer image side at most.")
@click.option("--measurement-request-count", default=5, type=click.IntRange(1),
              help="Requests per measurement window (count_windows mode); raise it on a GPU (e.g. 50).")
@click.option("--stability-percentage", default=50.0, type=click.FloatRange(min=0, min_open=True),
              help="Allowed spread of the last 3 windows; 10 (perf_analyzer's default) suits a quiet GPU server.")
@click.option("--max-trials", default=10, type=click.IntRange(3), help="Windows before giving up as unstable.")
@click.option("--collect-metrics", is_flag=True, help="Also record the server's GPU metrics (GPU servers).")
@click.option("--metrics-url", default=None, help="[default: the --url host, port 8002]")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("perf_results"))
@click.option("--compare-in-process", is_flag=True,
              help="Also run `ssd-train benchmark --mode inference` here (SSD300 and/or Mask R-CNN, as swept) "
                   "and add a served/in-process table.")
@click.option("--in-process-args", default="",
              help="Extra arguments for `ssd-train benchmark`, quoted: both detectors' runs (Mask R-CNN's then "
                   "gets the served export's --min-size, --max-size and --backbone).")
@click.option("--perf-analyzer", "perf_analyzer_path", type=click.Path(dir_okay=False), default=None,
              help="perf_analyzer binary [default: PATH, then beside this Python]")
def main(url, protocol, models, batch_sizes, concurrency, images_dir, num_images, model_repository, min_size,
         max_size, measurement_request_count, stability_percentage, max_trials, collect_metrics, metrics_url,
         output_dir, compare_in_process, in_process_args, perf_analyzer_path):
    """Sweep the served SSD300 and Mask R-CNN with perf_analyzer and write NVIDIA's README tables and a plot."""
    swept = set(models)
    if compare_in_process and not (SSD_ALONE | MASKRCNN) & swept:
        raise click.UsageError("--compare-in-process compares the SSD model alone (fp32, fp16) or Mask R-CNN "
                               "(maskrcnn, maskrcnn_model): add one to --models")
    if (min_size is None) != (max_size is None):
        raise click.UsageError("pass both --min-size and --max-size, or neither")
    needs_sizes = "maskrcnn_model" in swept or (compare_in_process and "maskrcnn" in swept)
    if needs_sizes and model_repository is None and min_size is None:
        raise click.UsageError("the Mask R-CNN model alone and --compare-in-process need the served image sizes: "
                               "pass --model-repository (the served repository) or --min-size and --max-size")
    maskrcnn = maskrcnn_export(model_repository, min_size, max_size) if needs_sizes else None
    url = strip_scheme(url or f"localhost:{DEFAULT_PORTS[protocol]}")
    try:
        pa = locate(perf_analyzer_path)
        server = check_server(url, protocol, [MODEL_CHOICES[m] for m in models],
                              max(batch_sizes) if batch_sizes else None)
    except (PerfAnalyzerSetupError, ServerCheckError) as err:
        raise click.ClickException(str(err)) from None
    sizes, skipped = batch_sizes_per_model(models, batch_sizes, server)
    for note in skipped:
        click.echo(f"note: {note}", err=True)

    raw_dir = output_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    images = load_images(images_dir, num_images)
    inputs, input_description = build_inputs(models, images, maskrcnn, output_dir)
    options = {"measurement_request_count": measurement_request_count, "stability_percentage": stability_percentage,
               "max_trials": max_trials, "collect_metrics": collect_metrics,
               "metrics_url": metrics_url or metrics_url_for(url)}
    runs = [Run(p, MODEL_CHOICES[p], b, c) for p in models for c in concurrency for b in sizes[p]]
    measurements = sweep(pa, runs, url, protocol, inputs, options, raw_dir)

    ssd_in_process = maskrcnn_in_process = served_detections = None
    if compare_in_process:
        ssd_in_process, maskrcnn_in_process = run_in_process(swept, sizes, maskrcnn, in_process_args, output_dir)
    if maskrcnn_in_process and "maskrcnn" in swept:
        try:
            served_detections = mean_detections(url, protocol, io.MASKRCNN_ENSEMBLE, [d for _, d in images])
        except ServerCheckError as err:
            raise click.ClickException(str(err)) from None

    header = [
        f"- Command: `python tools/perf_sweep.py {shlex.join(sys.argv[1:])}`",
        f"- Server: Triton {server.version} at {url} ({protocol}); "
        + "; ".join(f"`{MODEL_CHOICES[m]}` ({server.describe(MODEL_CHOICES[m])})" for m in models),
        f"- Client machine (perf_analyzer {pa.version()}): {machine_description()}",
        (f"- Measurement: count_windows, {measurement_request_count} requests per window, stability "
        f"{stability_percentage:g}%, up to {max_trials} windows; input: {'; '.join(input_description)}"),
        *(f"- {note}" for note in skipped),
        f"- Raw perf_analyzer CSVs and logs: `{raw_dir}`",
    ]
    ssd_alone = next((MODEL_CHOICES[p] for p in ("fp32", "fp16") if p in models), None)
    ssd_math = "FP32" if ssd_alone and server.on_cpu(ssd_alone) else "TF32"
    mask_math = "FP32" if "maskrcnn_model" in swept and server.on_cpu(io.MASKRCNN_MODEL) else "TF32"
    sections = []
    for c in concurrency:
        sections += ssd_sections(measurements, models, c, ssd_math, server.steps(io.ENSEMBLE), ssd_in_process)
        sections += maskrcnn_sections(measurements, models, c, mask_math, server.steps(io.MASKRCNN_ENSEMBLE),
                                      maskrcnn_in_process, served_detections)
    detectors = " and ".join(name for name, choices in (("SSD300", SSD_ALONE | {"ensemble"}), ("Mask R-CNN", MASKRCNN))
                             if choices & swept)
    report = write_report(output_dir, detectors, header, sections)
    kind = server.describe(next((MODEL_CHOICES[m] for m in models if m in SSD_ALONE | {"maskrcnn_model"}),
                                MODEL_CHOICES[models[0]]))
    plot = perf_report.plot(measurements, output_dir / "perf_sweep.png",
                            f"{detectors} on Triton {server.version} ({protocol}, {kind}), perf_analyzer")
    perf_report.save_measurements(output_dir / "measurements.json", measurements,
                                  {"url": url, "protocol": protocol, "server_version": server.version})
    click.echo(report.read_text())
    click.echo(f"wrote {report}, {plot}, {output_dir / 'measurements.json'} and {len(runs)} raw CSVs in {raw_dir}",
               err=True)


def sweep(pa: PerfAnalyzer, runs: list[Run], url: str, protocol: str, inputs: dict, options: dict,
          raw_dir: Path) -> list[perf_report.Measurement]:
    """One perf_analyzer process per run; each run's CSV read back as soon as it is written."""
    measurements = []
    progress = tqdm(runs, desc="perf_analyzer", unit="run")
    for run in progress:
        progress.set_postfix_str(f"{run.model} b{run.batch_size} c{run.concurrency}")
        args = perf_analyzer_args(run, url, protocol, inputs[run.precision], options)
        run_perf_analyzer(pa, run, args, raw_dir)
        try:
            measurements.append(perf_report.read_measurement(
                raw_dir, run.csv_name, run.precision, run.model, run.batch_size, run.concurrency))
        except perf_report.ReportError as err:
            raise click.ClickException(str(err)) from None
    return measurements


if __name__ == "__main__":
    main()
