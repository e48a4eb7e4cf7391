"""tools/perf_sweep.py: perf_analyzer input data and setup (fast), then real sweeps of SSD300 and of
Mask R-CNN against CPU servers started with the project's own API (slow): the tables and the plot must
hold exactly the numbers of the raw perf_analyzer CSVs and of `ssd-train benchmark`'s JSON summary."""

from __future__ import annotations

import base64
import csv
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from ssd_common import io

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "tools" / "perf_sweep.py"
sys.path.insert(0, str(ROOT / "tools"))

import perf_analyzer_env  # noqa: E402
import perf_inputs  # noqa: E402
import perf_report  # noqa: E402

BACKBONE = "resnet18"  # the smallest backbone: the sweep measures serving, not the network
ENSEMBLE_STEPS = (io.VALIDATE, io.PREPROCESS, io.MODEL_FP32, io.POSTPROCESS)  # the CPU flavour's ensemble
MASKRCNN_STEPS = (io.VALIDATE, io.MASKRCNN_PREPROCESS, io.MASKRCNN_MODEL, io.MASKRCNN_POSTPROCESS)


def run_sweep(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SWEEP), *args], capture_output=True, text=True, timeout=timeout)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr without the progress bar."""
    return [line for line in proc.stderr.splitlines() if line.strip() and "perf_analyzer:" not in line]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_csv_row(path: Path) -> dict[str, float]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1, f"{path.name}: one concurrency, one row"
    return {key: float(value) for key, value in rows[0].items() if value not in ("", None)}


def markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """{the heading above a table: its rows as {column: cell}}."""
    tables, heading, lines = {}, None, text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("# ").strip()
        if lines[i].startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([cell.strip() for cell in lines[i].strip().strip("|").split("|")])
                i += 1
            header, body = block[0], block[2:]
            tables[heading] = [dict(zip(header, row, strict=True)) for row in body]
            continue
        i += 1
    return tables


def assert_breakdown(tables, composing: dict, ensemble: str, steps) -> None:
    """The ensemble's per-model table: its composing models in step order at batch 1 and 2, each row from
    that model's own CSV."""
    breakdown = table_under(tables, f"`{ensemble}`: server time")
    assert [(row["Batch size"], row["Model"]) for row in breakdown] == [
        (str(b), f"`{step}`") for b in (1, 2) for step in steps]
    for row in breakdown:
        stats = composing[row["Model"].strip("`"), int(row["Batch size"])]
        assert row["Queue (ms)"] == f"{stats['Server Queue'] / 1000:.2f}"
        assert row["Compute infer (ms)"] == f"{stats['Server Compute Infer'] / 1000:.2f}"


def table_under(tables: dict, start: str) -> list[dict[str, str]]:
    found = [rows for heading, rows in tables.items() if heading.startswith(start)]
    assert len(found) == 1, f"one table under a heading starting {start!r}, headings: {list(tables)}"
    return found[0]


# ----------------------------------------------------------------------------------------------- inputs
def test_jpeg_input_is_padded_to_one_length_and_decodes_like_the_original():
    from ssd_train.data.dali import Preprocessor

    photos = perf_inputs.default_photos()
    steps = perf_inputs.encoded_image_data(photos)["data"]
    assert len(steps) == len(photos) >= 2
    lengths = {tuple(step[io.IMAGE]["shape"]) for step in steps}
    assert len(lengths) == 1  # perf_analyzer batches only equal shapes
    (length,) = lengths.pop()
    assert length == max(len(data) for _, data in photos)
    padded = [base64.b64decode(step[io.IMAGE]["b64"]) for step in steps]
    for (_, original), sent in zip(photos, padded, strict=True):
        assert len(sent) == length
        assert sent[: len(original)] == original and set(sent[len(original):]) <= {0}
    preprocess = Preprocessor(batch_size=len(photos))
    from_padded, sizes_padded = preprocess(padded)
    from_original, sizes_original = preprocess([data for _, data in photos])
    np.testing.assert_array_equal(from_padded, from_original)
    np.testing.assert_array_equal(sizes_padded, sizes_original)


def test_model_input_is_the_photos_through_the_dali_preprocessing(tmp_path):
    from ssd_train.data.dali import Preprocessor

    for i, colour in enumerate(((200, 30, 30), (20, 180, 60))):
        Image.new("RGB", (320 + 40 * i, 240), colour).save(tmp_path / f"photo{i}.jpg", quality=95)
    (tmp_path / "notes.txt").write_text("not an image")
    photos = perf_inputs.directory_images(tmp_path, limit=8)
    assert [name for name, _ in photos] == ["photo0.jpg", "photo1.jpg"]
    steps = perf_inputs.preprocessed_image_data(photos)["data"]
    expected, _ = Preprocessor(batch_size=2)([data for _, data in photos])
    for step, tensor in zip(steps, expected, strict=True):
        assert step[io.MODEL_INPUT]["shape"] == [3, io.INPUT_SIZE, io.INPUT_SIZE]
        sent = np.frombuffer(base64.b64decode(step[io.MODEL_INPUT]["b64"]), np.float32).reshape(tensor.shape)
        np.testing.assert_array_equal(sent, tensor)


def small_photos(directory: Path) -> Path:
    """Two small photos of opposite aspect ratios (they resize to different sizes): cheap masks to paste."""
    directory.mkdir()
    Image.fromarray(skimage.data.chelsea()[:120, :160]).save(directory / "landscape.jpg", quality=90)
    Image.fromarray(skimage.data.astronaut()[:160, :120]).save(directory / "portrait.jpg", quality=90)
    return directory


def test_maskrcnn_model_input_is_the_photos_preprocessed_as_one_padded_batch(tmp_path):
    from ssd_train.models.maskrcnn.preprocess import MaskRCNNPreprocessor

    photos = perf_inputs.directory_images(small_photos(tmp_path / "photos"), limit=8)
    steps = perf_inputs.maskrcnn_preprocessed_data(photos, 128, 160)["data"]
    images, sizes = io.MASKRCNN_LIBTORCH_INPUTS
    # One shape for every step (perf_analyzer batches only equal shapes): the batch's padded one.
    assert [step[images]["shape"] for step in steps] == [[3, 160, 160]] * 2
    assert [step[sizes]["shape"] for step in steps] == [[2]] * 2
    expected, resized, _ = MaskRCNNPreprocessor(128, 160, batch_size=2)([data for _, data in photos])
    for step, tensor, size in zip(steps, expected, resized, strict=True):
        sent = np.frombuffer(base64.b64decode(step[images]["b64"]), np.float32).reshape(tensor.shape)
        np.testing.assert_array_equal(sent, tensor)
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(step[sizes]["b64"]), np.int64), size)
    assert resized.tolist() == [[120, 160], [160, 120]]  # each inside the padding, as the model reads it


def test_a_directory_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(perf_inputs.InputDataError, match="no .jpg/.jpeg/.png images"):
        perf_inputs.directory_images(tmp_path, limit=4)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(perf_inputs.InputDataError, match="cannot preprocess"):
        perf_inputs.preprocessed_image_data(perf_inputs.directory_images(tmp_path, limit=4))


# ----------------------------------------------------------------------------------------------- setup
def test_perf_analyzer_is_found_and_runs():
    analyzer = perf_analyzer_env.locate()
    assert perf_analyzer_env.missing_libraries(analyzer.path, analyzer.library_dirs) == []
    assert analyzer.version().split(".")[0].isdigit()


def test_relative_input_data_is_found_from_the_directory_perf_analyzer_runs_in(tmp_path, monkeypatch):
    """The tools run perf_analyzer in OUTPUT_DIR/raw with input data written by a relative OUTPUT_DIR: the
    path must reach it absolute, or it takes the name for a data kind and stops before measuring."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raw").mkdir()
    perf_inputs.write_input_data(Path("input.json"), perf_inputs.encoded_image_data([("x.jpg", b"\xff\xd8")]))
    args = ["-m", io.ENSEMBLE, "-u", f"localhost:{free_port()}", "--input-data", "input.json", "-f", "x.csv"]
    proc = perf_analyzer_env.locate().run(args, Path("raw"))
    assert proc.args[1:] == [*args[:5], str(tmp_path / "input.json"), *args[6:]]
    assert proc.returncode != 0 and "Unsupported type" not in proc.stdout + proc.stderr
    assert "Couldn't connect to server" in proc.stderr  # past the input data: no server is listening
    assert perf_analyzer_env.absolute_input_data(["--input-data=random", "--input-data", "zero"]) == [
        "--input-data=random", "--input-data", "zero"]


@pytest.mark.skipif(not (shutil.which("apt-get") and shutil.which("dpkg")), reason="needs apt-get and dpkg")
def test_libb64_is_fetched_without_root_into_a_cache(tmp_path):
    first = perf_analyzer_env.find_or_fetch_libb64(tmp_path / "cache")
    assert (first / perf_analyzer_env.LIBB64).is_file()
    assert first.is_relative_to(tmp_path / "cache")
    assert perf_analyzer_env.find_or_fetch_libb64(tmp_path / "cache") == first  # cached, not fetched again


def test_a_missing_binary_is_a_clear_error(tmp_path):
    with pytest.raises(perf_analyzer_env.PerfAnalyzerSetupError, match="not an executable perf_analyzer"):
        perf_analyzer_env.find_binary(tmp_path / "perf_analyzer")


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "1,x"], "expected comma-separated integers"),
    (["--batch-sizes", "0"], "expected positive integers"),
    (["--models", "fp32,int8"], "choose from fp32, fp16, ensemble"),
    (["--models", "ensemble", "--compare-in-process"], "compares the SSD model alone"),
    (["--models", "maskrcnn_model"], "need the served image sizes: pass --model-repository"),
    (["--models", "maskrcnn", "--compare-in-process"], "need the served image sizes: pass --model-repository"),
    (["--models", "maskrcnn_model", "--min-size", "128"], "pass both --min-size and --max-size"),
])
def test_bad_options_are_one_line_usage_errors(args, message):
    proc = run_sweep(*args, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_no_server_is_a_clear_error(tmp_path):
    url = f"127.0.0.1:{free_port()}"
    for protocol in ("http", "grpc"):
        proc = run_sweep("--url", url, "--protocol", protocol, "--output-dir", str(tmp_path), timeout=120)
        assert proc.returncode == 1
        assert error_lines(proc) == [error_lines(proc)[0]]
        assert error_lines(proc)[0].startswith(f"Error: no Triton server answers at {url} ({protocol})")


# ----------------------------------------------------------------------------------------------- served
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The CPU flavour served by the project's own launcher, from a random-weight checkpoint
    exported by the project's exporter (fp32 only: fp16 convolutions on a CPU are slow)."""
    from ssd_train.checkpoint import save_checkpoint
    from ssd_train.export import export_model_repository
    from ssd_train.models.ssd300.model import build_model
    from ssd_train.serving.server import TritonServer

    root = tmp_path_factory.mktemp("perf_served")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(root / "random.pt", {"model": build_model(BACKBONE).state_dict(),
                                                      "backbone": BACKBONE})
    export_model_repository(checkpoint, root / "model_repository", precisions=["fp32"])
    with TritonServer(root / "model_repository", http_port=0, grpc_port=0, metrics_port=0) as triton:
        yield triton


@pytest.mark.slow
def test_tiny_sweep_tables_and_plot_hold_the_measured_numbers(server, tmp_path):
    out = tmp_path / "sweep"
    proc = run_sweep(
        "--url", server.http_url, "--models", "fp32,ensemble", "--batch-sizes", "2,1",
        "--measurement-request-count", "3", "--stability-percentage", "100", "--output-dir", str(out),
        "--compare-in-process",
        "--in-process-args", f"--backbone {BACKBONE} --benchmark-warmup 1 --benchmark-iterations 2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = out / "raw"
    measured = {(model, b): read_csv_row(raw / f"{model}_b{b}_c1.csv")
                for model in (io.MODEL_FP32, io.ENSEMBLE) for b in (1, 2)}
    for row in measured.values():
        assert row["Inferences/Second"] > 0 and 0 < row["p50 latency"] <= row["p99 latency"]
    composing = {(step, b): read_csv_row(raw / f"{step}_v1.{io.ENSEMBLE}_b{b}_c1.csv")
                 for step in ENSEMBLE_STEPS for b in (1, 2)}
    for row in composing.values():
        assert row["Server Compute Infer"] > 0

    def ips(model, b):
        return measured[model, b]["Inferences/Second"]

    def ms(model, b, column):
        return f"{measured[model, b][column] / 1000:.2f}"

    tables = markdown_tables((out / "perf_sweep.md").read_text())
    # The seed-format table for the model alone: on a CPU server the TF32 column is named FP32.
    alone = table_under(tables, "SSD300 alone")
    assert [row["Batch size"] for row in alone] == ["1", "2"]
    for row, b in zip(alone, (1, 2), strict=True):
        assert row["Throughput - FP32"] == f"{ips(io.MODEL_FP32, b):.2f}"
        assert row["Throughput - mixed precision"] == "-"  # fp16 was not swept
        assert row["Weak scaling - FP32"] == f"{100 * ips(io.MODEL_FP32, b) / ips(io.MODEL_FP32, 1):.0f}%"
        assert row["p50 latency - FP32 (ms)"] == ms(io.MODEL_FP32, b, "p50 latency")
        assert row["p99 latency - FP32 (ms)"] == ms(io.MODEL_FP32, b, "p99 latency")
    assert alone[0]["Weak scaling - FP32"] == "100%"
    # The whole ensemble.
    ensemble = table_under(tables, f"Whole ensemble `{io.ENSEMBLE}`")
    assert [row["Batch size"] for row in ensemble] == ["1", "2"]
    for row, b in zip(ensemble, (1, 2), strict=True):
        assert row["Throughput"] == f"{ips(io.ENSEMBLE, b):.2f}"
        assert row["Weak scaling"] == f"{100 * ips(io.ENSEMBLE, b) / ips(io.ENSEMBLE, 1):.0f}%"
        assert row["p99 latency (ms)"] == ms(io.ENSEMBLE, b, "p99 latency")
    # Its composing models, in step order, each from its own CSV.
    assert_breakdown(tables, composing, io.ENSEMBLE, ENSEMBLE_STEPS)
    # Served vs in-process, from the real `ssd-train benchmark --json-summary`.
    summary = json.loads((out / "in_process.json").read_text())
    in_process = {r["batch_size"]: r["throughput_mean"] for r in summary["results"] if r["precision"] == "fp32"}
    assert sorted(in_process) == [1, 2]
    compare = table_under(tables, "Served model alone")
    for row, b in zip(compare, (1, 2), strict=True):
        assert row["Served - FP32"] == f"{ips(io.MODEL_FP32, b):.2f}"
        assert row["In-process - FP32"] == f"{in_process[b]:.2f}"
        assert row["Served / in-process - FP32"] == f"{100 * ips(io.MODEL_FP32, b) / in_process[b]:.0f}%"
    # The plot: a real PNG whose drawn numbers are the CSVs'.
    with Image.open(out / "perf_sweep.png") as png:
        assert png.format == "PNG" and png.width > 400 and png.height > 200
        series = json.loads(png.text[perf_report.PLOT_METADATA_KEY])
    assert set(series) == {io.MODEL_FP32, io.ENSEMBLE}
    for model, line in series.items():
        assert line["batch_size"] == [1, 2]
        assert line["throughput"] == [ips(model, 1), ips(model, 2)]
        assert line["p99_ms"] == [measured[model, b]["p99 latency"] / 1000 for b in (1, 2)]


@pytest.mark.slow
def test_a_model_the_server_does_not_serve_is_a_clear_error(server, tmp_path):
    proc = run_sweep("--url", server.http_url, "--models", "fp16", "--output-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert line.startswith(f"Error: model {io.MODEL_FP16} is not ready at {server.http_url} (models there: ")
    assert f"{io.MODEL_FP32} READY" in line
    proc = run_sweep("--url", server.http_url, "--models", "fp32", "--batch-sizes", "1,128",
                     "--output-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 1
    assert "batch size 128 exceeds ssd300_fp32's max_batch_size" in proc.stderr


@pytest.mark.slow
def test_an_unstable_measurement_stops_with_advice(server, tmp_path):
    # 0.01% spread between three windows of one request each: no real server is that steady.
    proc = run_sweep("--url", server.grpc_url, "--protocol", "grpc", "--models", "fp32", "--batch-sizes", "1",
                     "--measurement-request-count", "1", "--stability-percentage", "0.01", "--max-trials", "3",
                     "--output-dir", str(tmp_path))
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert line.startswith(f"Error: unstable measurement for {io.MODEL_FP32} batch 1 concurrency 1")
    assert "--measurement-request-count" in line and "--stability-percentage" in line
    assert (tmp_path / "raw" / f"{io.MODEL_FP32}_b1_c1.log").is_file()


# ----------------------------------------------------------------------------------------------- Mask R-CNN
@pytest.fixture(scope="module")
def maskrcnn_server(tmp_path_factory):
    """An untrained resnet18 Mask R-CNN (min/max size 128/160) exported by the project's exporter and served
    (CPU flavour), with its repository (where the sweep reads the export's sizes). Its classifier favours the
    background, so it detects nothing: the mask head, which runs once per detection (about 90% of a request
    with the 100-detection cap), is left out and the sweep stays short; it measures serving, not the network."""
    from ssd_common.labels import LabelMap
    from ssd_train.checkpoint import save_checkpoint
    from ssd_train.export import export_model_repository
    from ssd_train.models.maskrcnn.model import MaskRCNNSpec, build_maskrcnn
    from ssd_train.serving.server import TritonServer

    root = tmp_path_factory.mktemp("perf_maskrcnn")
    label_map = LabelMap.from_coco_categories([{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}])
    spec = MaskRCNNSpec(BACKBONE, label_map.num_classes, min_size=128, max_size=160, norm="batch",
                        trainable_layers=5)
    torch.manual_seed(0)
    model = build_maskrcnn(spec).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[0] = 50.0  # background: every other score ~e-20
    checkpoint = save_checkpoint(root / "background.pt", {
        "epoch": 0, "iteration": 0, "model": model.state_dict(), "backbone": BACKBONE, "detector": "maskrcnn",
        "label_map": label_map.to_nvidia(), "categories": label_map.to_json(), "spec": spec.to_json()})
    export_model_repository(checkpoint, root / "model_repository", precisions=["fp32"])
    with TritonServer(root / "model_repository", http_port=0, grpc_port=0, metrics_port=0, flavour="cpu") as triton:
        yield triton, root / "model_repository"


@pytest.mark.slow
def test_tiny_maskrcnn_sweep_tables_hold_the_measured_numbers(maskrcnn_server, tmp_path):
    server, repository = maskrcnn_server
    out = tmp_path / "sweep"
    proc = run_sweep(
        "--url", server.http_url, "--models", "maskrcnn,maskrcnn_model", "--model-repository", str(repository),
        "--batch-sizes", "1,2", "--images", str(small_photos(tmp_path / "photos")),
        "--measurement-request-count", "1", "--stability-percentage", "100", "--output-dir", str(out),
        "--compare-in-process", "--in-process-args", "--benchmark-warmup 0 --benchmark-iterations 1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = out / "raw"
    models = (io.MASKRCNN_MODEL, io.MASKRCNN_ENSEMBLE)
    measured = {(model, b): read_csv_row(raw / f"{model}_b{b}_c1.csv") for model in models for b in (1, 2)}
    for row in measured.values():
        assert row["Inferences/Second"] > 0 and 0 < row["p50 latency"] <= row["p99 latency"]
    composing = {(step, b): read_csv_row(raw / f"{step}_v1.{io.MASKRCNN_ENSEMBLE}_b{b}_c1.csv")
                 for step in MASKRCNN_STEPS for b in (1, 2)}

    def ips(model, b):
        return measured[model, b]["Inferences/Second"]

    def ms(model, b, column):
        return f"{measured[model, b][column] / 1000:.2f}"

    text = (out / "perf_sweep.md").read_text()
    assert text.startswith("# Mask R-CNN served by Triton")
    assert "padded to the batch's 3x160x160" in text  # the model alone's input: both photos in one padded shape
    assert "served 0.0 on the sweep's photos" in text  # the detections behind the served figures
    tables = markdown_tables(text)
    for heading, model, throughput in (
            ("Mask R-CNN alone", io.MASKRCNN_MODEL, "Throughput - FP32"),
            (f"Whole ensemble `{io.MASKRCNN_ENSEMBLE}`", io.MASKRCNN_ENSEMBLE, "Throughput")):
        table = table_under(tables, heading)
        assert [row["Batch size"] for row in table] == ["1", "2"]
        for row, b in zip(table, (1, 2), strict=True):
            assert row[throughput] == f"{ips(model, b):.2f}"
            assert row["Weak scaling"] == f"{100 * ips(model, b) / ips(model, 1):.0f}%"
            assert row["p50 latency (ms)"] == ms(model, b, "p50 latency")
            assert row["p99 latency (ms)"] == ms(model, b, "p99 latency")
    assert_breakdown(tables, composing, io.MASKRCNN_ENSEMBLE, MASKRCNN_STEPS)
    # In-process at the export's sizes and backbone, from the real `ssd-train benchmark --json-summary`.
    summary = json.loads((out / "in_process_maskrcnn.json").read_text())
    assert (summary["spec"]["min_size"], summary["spec"]["max_size"], summary["spec"]["backbone"]) == (
        128, 160, "resnet18")
    in_process = {r["batch_size"]: r["throughput_mean"] for r in summary["results"]}
    compare = table_under(tables, "Mask R-CNN served")
    assert [row["Batch size"] for row in compare] == ["1", "2"]
    for row, b in zip(compare, (1, 2), strict=True):
        assert row["In-process"] == f"{in_process[b]:.2f}"
        assert row["Served model alone"] == f"{ips(io.MASKRCNN_MODEL, b):.2f}"
        assert row["Served ensemble / in-process"] == f"{100 * ips(io.MASKRCNN_ENSEMBLE, b) / in_process[b]:.0f}%"


@pytest.mark.slow
def test_maskrcnn_batch_sizes_stop_at_its_max_batch_size(maskrcnn_server, tmp_path):
    import perf_server
    import perf_sweep

    server, repository = maskrcnn_server
    # Asked for: one line before any load is sent.
    proc = run_sweep("--url", server.http_url, "--models", "maskrcnn", "--batch-sizes", "1,16",
                     "--output-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert line == f"Error: batch size 16 exceeds {io.MASKRCNN_ENSEMBLE}'s max_batch_size 8: lower --batch-sizes"
    # The default sweep: each model's batch sizes up to its own limit, the rest noted.
    info = perf_server.check_server(server.http_url, "http", [io.MASKRCNN_ENSEMBLE, io.MASKRCNN_MODEL], None)
    sizes, notes = perf_sweep.batch_sizes_per_model(["maskrcnn", "maskrcnn_model"], None, info)
    assert sizes == {"maskrcnn": [1, 2, 4, 8], "maskrcnn_model": [1, 2, 4, 8]}
    assert notes == [f"`{model}`: batch sizes over its max_batch_size 8 skipped (16, 32, 64)"
                     for model in (io.MASKRCNN_ENSEMBLE, io.MASKRCNN_MODEL)]


# ----------------------------------------------------------------------------------------------- tools/soak.py
# Its refusals and its verdict, without a server (its runs against real servers: tests/test_serving.py and
# tests/test_serving_maskrcnn.py).
SOAK = ROOT / "tools" / "soak.py"


def run_soak(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SOAK), *args], capture_output=True, text=True, timeout=120)


def test_a_soak_without_a_server_fails_in_one_line():
    port = free_port()  # nothing listens there
    proc = run_soak("--url", f"127.0.0.1:{port}", "--model", io.MASKRCNN_ENSEMBLE, "--requests", "2", "--clients",
                    "1", "--warmup", "0", "--corrupt-every", "1", "--oversized-every", "1")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.splitlines() == [
        f"soak: no Triton server answers at 127.0.0.1:{port} (http): [Errno 111] Connection refused"]


@pytest.mark.parametrize("args, message", [
    (["--corrupt-every", "-1"], "argument --corrupt-every: -1 is below 0"),
    (["--oversized-every", "x"], "argument --oversized-every: 'x' is not an integer"),
    (["--warmup", "-2"], "argument --warmup: -2 is below 0"),
    (["--clients", "0"], "argument --clients: 0 is below 1"),
    (["--server-pid", "999999999"], "argument --server-pid: no process 999999999 on this machine (its memory is "
                                    "read from /proc)"),
    (["--url", "localhost"], "--url 'localhost' is not host:port"),
    (["--json-summary", "/no/such/dir/soak.json"], "--json-summary /no/such/dir/soak.json: no directory /no/such/dir"),
])
def test_bad_soak_options_are_one_line_usage_errors(args, message):
    proc = run_soak(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == f"soak.py: error: {message}"


def test_a_soak_whose_requests_failed_unexpectedly_says_so():
    import argparse

    import soak

    args = argparse.Namespace(url="127.0.0.1:8000", protocol="http", model=io.ENSEMBLE, clients=1, requests=6,
                              corrupt_every=3, oversized_every=0)
    memory = dict.fromkeys(("rss_after_warmup", "rss_at_end", "rss_peak", "server_pid"))
    tally = soak.Tally(answered=4, latencies=[0.1] * 4, bad_failed_otherwise=2)
    for _ in range(2):
        tally.note_error("[Errno 111] Connection refused")
    summary = soak.summarise(args, tally, 1.0, memory)
    report = soak.format_report(summary)
    assert "every 3rd request corrupt, no request oversized" in report.splitlines()[0]
    assert "unexpected (2x)    [Errno 111] Connection refused" in report
    assert soak.verdict(summary) == ("soak: FAILED: 2 bad request(s) failed otherwise than as bad input (the "
                                     "unexpected errors are listed above)")
    assert soak.verdict(soak.summarise(args, soak.Tally(answered=4, rejected=2), 1.0, memory)) is None
    assert [soak.every(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 111)] == [
        "every request", *(f"every {n} request" for n in ("2nd", "3rd", "4th", "11th", "12th", "13th", "21st",
                                                          "22nd", "23rd", "111th"))]
