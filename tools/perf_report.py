"""Tables and plot from perf_analyzer's CSV files: every number here is read from a measured CSV
(or, for the in-process comparison, from `ssd-train benchmark --json-summary`).

perf_analyzer CSV units: "Inferences/Second" is images/s (requests/s x batch size), latencies and
server times are microseconds. Tables show images/s and milliseconds.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

THROUGHPUT = "Inferences/Second"
P50, P90, P95, P99 = "p50 latency", "p90 latency", "p95 latency", "p99 latency"
QUEUE = "Server Queue"
COMPUTE_INPUT, COMPUTE_INFER, COMPUTE_OUTPUT = (
    "Server Compute Input",
    "Server Compute Infer",
    "Server Compute Output",
)
OVERHEAD = "Network+Server Send/Recv"  # in a composing model's CSV: server overhead
GPU_UTILIZATION = "Avg GPU Utilization"
REQUIRED = (THROUGHPUT, P50, P99)

# The seeds' precision names: the served fp32 model is the "TF32" column (TF32 convolutions on
# Ampere and newer GPUs; plain fp32 on CPU), the fp16 model the "mixed precision" one.
TF32, MIXED = "fp32", "fp16"
IN_PROCESS_PRECISION = {TF32: "fp32", MIXED: "amp"}


class ReportError(ValueError):
    """A CSV or summary file that does not hold what perf_analyzer / the benchmark write."""


@dataclass
class ComposingStats:
    """One composing model of an ensemble, as perf_analyzer's `<model>_v<ver>.<csv>` file reports it."""

    model: str
    version: str
    csv: str
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float
    overhead_us: float

    @property
    def compute_us(self) -> float:
        return self.compute_input_us + self.compute_infer_us + self.compute_output_us


@dataclass
class Measurement:
    """One perf_analyzer run: one model, batch size and concurrency."""

    precision: str  # the sweep's --models name: "fp32", "fp16", "ensemble", "maskrcnn" or "maskrcnn_model"
    model: str
    batch_size: int
    concurrency: int
    csv: str  # file name inside the raw directory
    throughput: float  # images/s
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float
    gpu_utilization: float | None = None
    composing: list[ComposingStats] = field(default_factory=list)


def _number(row: dict, column: str, path: Path) -> float:
    value = row.get(column)
    if value is None or value == "":
        raise ReportError(f"{path.name}: no value in column {column!r}")
    try:
        return float(value)
    except ValueError:
        raise ReportError(f"{path.name}: column {column!r} holds {value!r}, not a number") from None


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ReportError(f"{path.name}: no measurement rows")
    return rows


def _one_row(path: Path, concurrency: int) -> dict:
    """The CSV row of `concurrency` (rows are sorted by throughput, not by concurrency)."""
    rows = read_rows(path)
    matching = [r for r in rows if r.get("Concurrency") == str(concurrency)]
    if len(matching) != 1:
        raise ReportError(f"{path.name}: expected one row for concurrency {concurrency}, found {len(matching)}")
    return matching[0]


def composing_files(raw_dir: Path, csv_name: str) -> list[Path]:
    """perf_analyzer names an ensemble's per-model files `<model>_v<version>.<csv name>`."""
    return sorted(p for p in raw_dir.glob(f"*_v*.{csv_name}") if p.name != csv_name)


def read_composing(path: Path, csv_name: str, concurrency: int) -> ComposingStats:
    model, _, version = path.name[: -len(csv_name) - 1].rpartition("_v")
    row = _one_row(path, concurrency)
    return ComposingStats(
        model=model,
        version=version,
        csv=path.name,
        queue_us=_number(row, QUEUE, path),
        compute_input_us=_number(row, COMPUTE_INPUT, path),
        compute_infer_us=_number(row, COMPUTE_INFER, path),
        compute_output_us=_number(row, COMPUTE_OUTPUT, path),
        overhead_us=_number(row, OVERHEAD, path),
    )


def read_measurement(raw_dir: Path, csv_name: str, precision: str, model: str, batch_size: int,
                     concurrency: int) -> Measurement:
    path = raw_dir / csv_name
    row = _one_row(path, concurrency)
    gpu = row.get(GPU_UTILIZATION)
    return Measurement(
        precision=precision,
        model=model,
        batch_size=batch_size,
        concurrency=concurrency,
        csv=csv_name,
        throughput=_number(row, THROUGHPUT, path),
        p50_us=_number(row, P50, path),
        p90_us=_number(row, P90, path),
        p95_us=_number(row, P95, path),
        p99_us=_number(row, P99, path),
        gpu_utilization=float(gpu) if gpu not in (None, "") else None,
        composing=[read_composing(p, csv_name, concurrency) for p in composing_files(raw_dir, csv_name)],
    )


def save_measurements(path: Path, measurements: Sequence[Measurement], meta: dict) -> None:
    path.write_text(json.dumps({**meta, "measurements": [asdict(m) for m in measurements]}, indent=1))


# ----------------------------------------------------------------------------------------------
# Markdown


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def _ips(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _percent(num: float | None, den: float | None) -> str:
    """The seeds write speedup and weak scaling as percentages ("85%", "187%")."""
    return "-" if num is None or not den else f"{100 * num / den:.0f}%"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], text_columns: int = 0) -> str:
    """Numbers right-aligned; the first `text_columns` columns after the first are left-aligned."""
    align = ["---:" if i == 0 or i > text_columns else ":---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _index(measurements: Iterable[Measurement], precision: str, concurrency: int) -> dict[int, Measurement]:
    return {m.batch_size: m for m in measurements if m.precision == precision and m.concurrency == concurrency}


def _scaling_note(batch_sizes: Sequence[int]) -> str:
    """Weak scaling is relative to batch 1; say so when the sweep starts elsewhere."""
    return "" if not batch_sizes or min(batch_sizes) == 1 else f" (vs batch {min(batch_sizes)})"


def models_table(measurements: Sequence[Measurement], concurrency: int, math: str = "TF32") -> str:
    """The seeds' table for the SSD models alone: the fp32 model (the "TF32" column; `math="FP32"`
    names it so for a CPU server) vs the fp16 model ("mixed precision"), speedup, weak scaling
    (throughput at B / throughput at the smallest batch, same column), plus p50/p99 latency."""
    full, mixed = _index(measurements, TF32, concurrency), _index(measurements, MIXED, concurrency)
    batch_sizes = sorted(set(full) | set(mixed))
    note = _scaling_note(batch_sizes)
    header = [
        "Batch size",
        f"Throughput - {math}",
        "Throughput - mixed precision",
        f"Throughput speedup ({math} - mixed precision)",
        f"Weak scaling - {math}{note}",
        f"Weak scaling - mixed precision{note}",
        f"p50 latency - {math} (ms)",
        f"p99 latency - {math} (ms)",
        "p50 latency - mixed precision (ms)",
        "p99 latency - mixed precision (ms)",
    ]
    first = batch_sizes[0] if batch_sizes else None
    full_base = full[first].throughput if first in full else None
    mixed_base = mixed[first].throughput if first in mixed else None
    rows = []
    for b in batch_sizes:
        f, m = full.get(b), mixed.get(b)
        f_ips, m_ips = (f.throughput if f else None), (m.throughput if m else None)
        rows.append([
            str(b),
            _ips(f_ips),
            _ips(m_ips),
            _percent(m_ips, f_ips),
            _percent(f_ips, full_base),
            _percent(m_ips, mixed_base),
            _ms(f.p50_us) if f else "-",
            _ms(f.p99_us) if f else "-",
            _ms(m.p50_us) if m else "-",
            _ms(m.p99_us) if m else "-",
        ])
    return markdown_table(header, rows)


def ensemble_table(measurements: Sequence[Measurement], concurrency: int, precision: str = "ensemble",
                   math: str | None = None) -> str:
    """One served model (by default SSD300's whole pipeline): throughput, weak scaling, p50/p99 latency
    (and GPU utilisation if collected); `math` names the throughput column's ("Throughput - FP32")."""
    ens = _index(measurements, precision, concurrency)
    batch_sizes = sorted(ens)
    base = ens[batch_sizes[0]].throughput if batch_sizes else None
    with_gpu = any(m.gpu_utilization is not None for m in ens.values())
    header = ["Batch size", f"Throughput - {math}" if math else "Throughput",
              f"Weak scaling{_scaling_note(batch_sizes)}", "p50 latency (ms)",
              "p99 latency (ms)"] + (["Avg GPU utilization"] if with_gpu else [])
    rows = []
    for b in batch_sizes:
        m = ens[b]
        row = [str(b), _ips(m.throughput), _percent(m.throughput, base), _ms(m.p50_us), _ms(m.p99_us)]
        if with_gpu:
            row.append("-" if m.gpu_utilization is None else f"{100 * m.gpu_utilization:.0f}%")
        rows.append(row)
    return markdown_table(header, rows)


def breakdown_table(measurements: Sequence[Measurement], concurrency: int, order: Sequence[str] = (),
                    precision: str = "ensemble") -> str:
    """Where a request's server time goes: queue and compute per composing model, per request
    (models in `order`, the ensemble's step order, when given)."""
    ens = _index(measurements, precision, concurrency)
    header = ["Batch size", "Model", "Queue (ms)", "Compute input (ms)", "Compute infer (ms)",
              "Compute output (ms)", "Compute total (ms)", "Overhead (ms)"]
    rows = []
    for b in sorted(ens):
        rank = {name: i for i, name in enumerate(order)}
        for c in sorted(ens[b].composing, key=lambda c: (rank.get(c.model, len(rank)), c.model)):
            rows.append([str(b), f"`{c.model}`", _ms(c.queue_us), _ms(c.compute_input_us),
                         _ms(c.compute_infer_us), _ms(c.compute_output_us), _ms(c.compute_us),
                         _ms(c.overhead_us)])
    return markdown_table(header, rows, text_columns=1)


# ----------------------------------------------------------------------------------------------
# In-process comparison (`ssd-train benchmark --mode inference --json-summary F`)


def read_in_process(path: Path) -> dict:
    """{"device": str, "results": {(precision, batch): throughput_mean}, "detections": {(precision, batch):
    detections_per_image}} from the benchmark summary (Mask R-CNN's records its detections per image)."""
    try:
        summary = json.loads(Path(path).read_text())
        results = {
            (r["precision"], int(r["batch_size"])): float(r["throughput_mean"]) for r in summary["results"]
        }
        detections = {(r["precision"], int(r["batch_size"])): float(r["detections_per_image"])
                      for r in summary["results"] if "detections_per_image" in r}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ReportError(f"{path}: not a benchmark summary ({type(err).__name__}: {err})") from None
    if summary.get("mode") != "inference":
        raise ReportError(f"{path}: benchmark mode is {summary.get('mode')!r}, expected 'inference'")
    return {"device": summary.get("device", "unknown"), "results": results, "detections": detections}


def compare_table(measurements: Sequence[Measurement], in_process: dict, concurrency: int,
                  math: str = "TF32") -> str:
    """Served (perf_analyzer, model alone) vs in-process (`ssd-train benchmark`) images/s, same batch sizes."""
    header = ["Batch size"]
    columns = []
    for precision, label in ((TF32, math), (MIXED, "mixed precision")):
        served = _index(measurements, precision, concurrency)
        local = {b: v for (p, b), v in in_process["results"].items() if p == IN_PROCESS_PRECISION[precision]}
        if served:
            header += [f"Served - {label}", f"In-process - {label}", f"Served / in-process - {label}"]
            columns.append((served, local))
    batch_sizes = sorted({b for served, _ in columns for b in served})
    rows = []
    for b in batch_sizes:
        row = [str(b)]
        for served, local in columns:
            s = served[b].throughput if b in served else None
            row += [_ips(s), _ips(local.get(b)), _percent(s, local.get(b))]
        rows.append(row)
    return markdown_table(header, rows)


def maskrcnn_compare_table(measurements: Sequence[Measurement], in_process: dict, concurrency: int) -> str:
    """Served Mask R-CNN (the model alone and/or the whole ensemble, as swept) vs in-process
    `ssd-train benchmark --model maskrcnn` (fp32), images/s, same batch sizes."""
    local = {b: v for (p, b), v in in_process["results"].items() if p == "fp32"}
    header = ["Batch size", "In-process"]
    columns = []
    for precision, label in (("maskrcnn_model", "model alone"), ("maskrcnn", "ensemble")):
        served = _index(measurements, precision, concurrency)
        if served:
            header += [f"Served {label}", f"Served {label} / in-process"]
            columns.append(served)
    rows = []
    for b in sorted({b for served in columns for b in served}):
        row = [str(b), _ips(local.get(b))]
        for served in columns:
            s = served[b].throughput if b in served else None
            row += [_ips(s), _percent(s, local.get(b))]
        rows.append(row)
    return markdown_table(header, rows)


# ----------------------------------------------------------------------------------------------
# Plot


PLOT_METADATA_KEY = "perf_sweep_series"  # PNG text chunk holding the plotted numbers


def plot_series(measurements: Sequence[Measurement]) -> dict[str, dict[str, list]]:
    """The plotted numbers: {line label: {batch_size, throughput (images/s), p99_ms}}, one line per
    model and concurrency, batch sizes ascending."""
    concurrencies = {m.concurrency for m in measurements}
    series: dict[str, dict[str, list]] = {}
    for m in sorted(measurements, key=lambda m: (m.model, m.concurrency, m.batch_size)):
        label = m.model if len(concurrencies) == 1 else f"{m.model}, concurrency {m.concurrency}"
        line = series.setdefault(label, {"batch_size": [], "throughput": [], "p99_ms": []})
        line["batch_size"].append(m.batch_size)
        line["throughput"].append(m.throughput)
        line["p99_ms"].append(m.p99_us / 1000)
    return series


def plot(measurements: Sequence[Measurement], path: Path, title: str) -> Path:
    """Throughput and p99 latency against batch size; the plotted numbers are also stored in the
    PNG's text chunk `PLOT_METADATA_KEY` (JSON), so the figure says what it was drawn from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = plot_series(measurements)
    batch_sizes = sorted({m.batch_size for m in measurements})
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, line in series.items():
        ax_t.plot(line["batch_size"], line["throughput"], marker="o", label=label)
        ax_l.plot(line["batch_size"], line["p99_ms"], marker="o", label=label)
    for ax, ylabel in ((ax_t, "throughput (images/s)"), (ax_l, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={PLOT_METADATA_KEY: json.dumps(series)})
    plt.close(fig)
    return path
