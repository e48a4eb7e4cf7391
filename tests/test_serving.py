"""`ssd-serve` end to end on CPU: export a checkpoint, start the real tritonserver (the CPU flavour
on nvidia-pytriton's server), send real JPEG and PNG photos over HTTP and gRPC with tritonclient,
and compare with `ssd_train.models.ssd300.predict.Predictor` on the same images; then what hostile clients and
crashes must not do to it: take it over, blow its memory up with decompression bombs, fail good
requests beside bad ones, or leave servers and files behind when its owner is killed."""

from __future__ import annotations

import asyncio
import contextlib
import io as bytes_io
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from ssd_common import io
from ssd_train.export import export_model_repository, install_configs
from ssd_train.serving.manifest import MANIFEST_FILE, write_manifest
from ssd_train.serving.server import ADMIN_KEY_HEADER, ServeError, TritonServer, production_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from soak import PeakMemory, listening_sockets, oversized_image, process_tree, tree_rss  # noqa: E402

DATA_DIR = Path(skimage.data.__file__).parent  # real photos shipped with scikit-image
CORRUPT = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 8  # a JPEG header, then noise
BAD_INPUT = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}  # InferenceServerException.status()
SERVER_FAULT = {"http": "500", "grpc": "StatusCode.INTERNAL"}


def encode(array: np.ndarray, image_format: str) -> bytes:
    buffer = bytes_io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def photos() -> list[bytes]:
    """Real photos of four sizes: two JPEG, two PNG."""
    return [(DATA_DIR / "rocket.jpg").read_bytes(), (DATA_DIR / "astronaut.png").read_bytes(),
            encode(skimage.data.chelsea(), "JPEG"), encode(skimage.data.coffee(), "PNG")]


def padded(images: list[bytes]) -> np.ndarray:
    """The IMAGE tensor of a batch: each row one encoded image, zero-padded to the longest."""
    batch = np.zeros((len(images), max(len(image) for image in images)), np.uint8)
    for row, image in zip(batch, images):
        row[:len(image)] = np.frombuffer(image, np.uint8)
    return batch


def assert_same_detections(outputs: dict, expected: list[list[dict]]) -> None:
    """Served outputs of a batch == Predictor.detect of the same images."""
    for i, wanted in enumerate(expected):
        count = int(outputs[io.NUM_DETECTIONS][i, 0])
        assert count == len(wanted)
        boxes, scores, classes = (outputs[name][i] for name in (io.DETECTION_BOXES, io.DETECTION_SCORES,
                                                                io.DETECTION_CLASSES))
        np.testing.assert_array_equal(classes[:count], [d["category_id"] for d in wanted])
        np.testing.assert_allclose(boxes[:count], np.array([d["box"] for d in wanted]).reshape(-1, 4),
                                   rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(scores[:count], [d["score"] for d in wanted], rtol=1e-4, atol=1e-6)
        assert not classes[count:].any() and not scores[count:].any()  # zero padding


def infer(client_module, url: str, images: list[bytes]) -> dict:
    """One zero-padded batch through the ensemble with tritonclient's http or grpc module."""
    batch = padded(images)
    image = client_module.InferInput(io.IMAGE, list(batch.shape), io.ENSEMBLE_INPUT_DTYPES[io.IMAGE])
    image.set_data_from_numpy(batch)
    with client_module.InferenceServerClient(url) as client:
        result = client.infer(io.ENSEMBLE, [image])
    return {name: result.as_numpy(name) for name in io.DETECTION_OUTPUTS}


def http_infer(url: str, images: list[bytes]) -> dict:
    return infer(httpclient, url, images)


def grpc_infer(url: str, images: list[bytes]) -> dict:
    return infer(grpcclient, url, images)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """IPv4/IPv6 addresses listening on `port`."""
    return {address for address, _ in listening_sockets(port)}


def ssd_serve_command() -> list[str]:
    script = Path(sys.executable).with_name("ssd-serve")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from ssd_train.serving.server import main; main()"]


@pytest.fixture(scope="module")
def repository(tiny_checkpoint, tmp_path_factory) -> Path:
    repository = tmp_path_factory.mktemp("serving") / "repository"
    export_model_repository(tiny_checkpoint, repository, precisions=["fp32"])
    return repository


@pytest.fixture(scope="module")
def expected(tiny_checkpoint) -> list[list[dict]]:
    from ssd_train.models.ssd300.predict import Predictor

    detections = Predictor.from_checkpoint(tiny_checkpoint).detect(photos())
    assert all(detections), "the test checkpoint must detect something to compare"
    return detections


class Serve:
    """`ssd-serve` run as a user runs it, its stdout collected by a thread."""

    def __init__(self, repository: Path, *options: str, env: dict | None = None, command: list[str] | None = None):
        self.ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        self.process = subprocess.Popen(
            [*(command or ssd_serve_command()), "--model-repository", str(repository), "--flavour", "auto",
             *(f"--{name}-port={port}" for name, port in self.ports.items()), *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.output.append(line)
            if text in line:
                return
        raise AssertionError(f"ssd-serve did not print {text!r}; it printed:\n" + "\n".join(self.output[-30:]))

    def endpoint(self, label: str) -> str:
        (line,) = [line for line in self.output if line.strip().startswith(label)]
        return line.split()[-1]


@pytest.fixture(scope="module")
def serve(repository):
    server = Serve(repository)
    try:
        server.wait_for("Ctrl-C to stop.", timeout=900)
        yield server
    finally:
        if server.process.poll() is None:
            server.process.terminate()
            try:
                server.process.wait(60)
            except subprocess.TimeoutExpired:
                server.process.kill()


# ----------------------------------------------------------------------------------------------
# A served model (tests run in file order; the last one stops the server)


@pytest.mark.slow
def test_prints_its_endpoints_and_binds_localhost(serve):
    http, grpc, metrics = (serve.endpoint(label) for label in ("HTTP", "gRPC", "metrics"))
    assert http == f"127.0.0.1:{serve.ports['http']}"
    assert grpc == f"127.0.0.1:{serve.ports['grpc']}"
    assert metrics == f"http://127.0.0.1:{serve.ports['metrics']}/metrics"
    for port in serve.ports.values():
        assert listening_addresses(port) == {"127.0.0.1"}
    with urllib.request.urlopen(metrics, timeout=10) as response:
        assert "nv_inference_request_success" in response.read().decode()
    assert "cpu flavour" in "\n".join(serve.output)
    assert serve.endpoint("models") == io.ENSEMBLE  # the only detector exported into it


@pytest.mark.slow
def test_http_batch_of_mixed_photos_matches_predict(serve, expected):
    assert_same_detections(http_infer(serve.endpoint("HTTP"), photos()), expected)


@pytest.mark.slow
def test_grpc_batches_match_predict(serve, expected):
    images = photos()
    order = [3, 0]  # another batch composition and order than over HTTP
    assert_same_detections(grpc_infer(serve.endpoint("gRPC"), [images[i] for i in order]),
                           [expected[i] for i in order])
    assert_same_detections(grpc_infer(serve.endpoint("gRPC"), images[1:3]), expected[1:3])


@pytest.mark.slow
def test_concurrent_requests_of_different_lengths_match_predict(serve, expected):
    """Single-image requests at once: the dynamic batchers may put images of different byte lengths
    into one batch (ragged); every answer must still be its own image's."""
    images = photos()
    with httpclient.InferenceServerClient(serve.endpoint("HTTP"), concurrency=len(images)) as client:
        pending = []
        for image in images:
            tensor = httpclient.InferInput(io.IMAGE, [1, len(image)], "UINT8")
            tensor.set_data_from_numpy(padded([image]))
            pending.append(client.async_infer(io.ENSEMBLE, [tensor]))
        for request, wanted in zip(pending, expected):
            result = request.get_result()
            assert_same_detections({name: result.as_numpy(name) for name in io.DETECTION_OUTPUTS}, [wanted])


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_corrupt_or_empty_image_fails_its_request_alone(serve, expected, protocol):
    url, infer = (serve.endpoint("HTTP"), http_infer) if protocol == "http" else (serve.endpoint("gRPC"), grpc_infer)
    with pytest.raises(InferenceServerException, match="cannot decode image") as error:
        infer(url, [CORRUPT])
    assert str(error.value.status()) == BAD_INPUT[protocol]  # the caller's fault, not the server's
    with pytest.raises(InferenceServerException, match="input 1: cannot decode image: truncated JPEG"):
        infer(url, [photos()[0], photos()[2][:5000]])
    with pytest.raises(InferenceServerException, match="empty image"):
        infer(url, [b""])
    assert_same_detections(infer(url, photos()[:1]), expected[:1])  # the server keeps answering


@pytest.mark.slow
def test_a_bad_request_among_concurrent_good_ones_fails_alone(serve, expected):
    async def run():
        import tritonclient.grpc.aio as aioclient

        async with aioclient.InferenceServerClient(serve.endpoint("gRPC")) as client:
            async def infer(image):
                tensor = aioclient.InferInput(io.IMAGE, [1, len(image)], "UINT8")
                tensor.set_data_from_numpy(padded([image]))
                return await client.infer(io.ENSEMBLE, [tensor])

            return await asyncio.gather(*(infer(image) for image in [photos()[0], CORRUPT, photos()[1]]),
                                        return_exceptions=True)

    good, bad, also_good = asyncio.run(run())
    assert isinstance(bad, InferenceServerException) and "cannot decode image" in str(bad)
    for result, wanted in ((good, expected[0]), (also_good, expected[1])):
        assert_same_detections({name: result.as_numpy(name) for name in io.DETECTION_OUTPUTS}, [wanted])


# What hostile clients cannot do

INTRUDER_CONFIG = json.dumps({"name": "intruder", "backend": "python", "max_batch_size": 0,
                              "input": [{"name": "X", "data_type": "TYPE_UINT8", "dims": [1]}],
                              "output": [{"name": "Y", "data_type": "TYPE_UINT8", "dims": [1]}]})


def client_for(serve, protocol: str):
    module = httpclient if protocol == "http" else grpcclient
    return module.InferenceServerClient(serve.endpoint("HTTP" if protocol == "http" else "gRPC"))


def admin_headers(protocol: str, key: str) -> dict:
    return {ADMIN_KEY_HEADER if protocol == "http" else f"triton-grpc-protocol-{ADMIN_KEY_HEADER}": key}


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_clients_cannot_unload_load_or_upload_models(serve, expected, protocol, tmp_path):
    marker = tmp_path / "uploaded-code-ran"
    code = f"open({str(marker)!r}, 'w').close()\nclass TritonPythonModel:\n    pass\n".encode()
    with client_for(serve, protocol) as client:
        attempts = [lambda: client.unload_model(io.ENSEMBLE), lambda: client.unload_model(io.MODEL_FP32),
                    lambda: client.unload_model(io.ENSEMBLE, headers=admin_headers(protocol, "a guess")),
                    lambda: client.load_model("intruder", config=INTRUDER_CONFIG, files={"file:1/model.py": code})]
        for attempt in attempts:
            with pytest.raises(InferenceServerException, match="not allowed"):  # model control "none"
                attempt()
        assert client.is_model_ready(io.ENSEMBLE) and client.is_model_ready(io.MODEL_FP32)
        assert not client.is_model_ready("intruder")
    assert not marker.exists()  # the uploaded code never ran
    url = serve.endpoint("HTTP" if protocol == "http" else "gRPC")
    assert_same_detections((http_infer if protocol == "http" else grpc_infer)(url, photos()[:1]), expected[:1])


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_clients_cannot_register_shared_memory_or_change_log_and_trace_files(serve, protocol, tmp_path):
    with client_for(serve, protocol) as client:
        for attempt in (lambda: client.register_system_shared_memory("intruder", "/intruder", 64),
                        lambda: client.update_log_settings({"log_file": str(tmp_path / "log")}),
                        lambda: client.update_trace_settings(settings={"trace_file": str(tmp_path / "trace")})):
            with pytest.raises(InferenceServerException, match="restricted"):
                attempt()
    assert not list(tmp_path.iterdir())


def preprocess_counts(url: str) -> tuple[int, int]:
    """(successful, failed) requests of the DALI step so far."""
    with httpclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(io.PREPROCESS)["model_stats"][0]["inference_stats"]
    return int(stats["success"]["count"]), int(stats["fail"]["count"])


@pytest.mark.slow
def test_decompression_bombs_fail_alone_and_never_reach_the_decoder(serve, expected):
    """4 concurrent 20000x20000 JPEGs (4.7 MB each, 1.2 GB each once decoded) beside 4 good photos:
    the bombs are refused from their headers, the photos answered, the server barely grows."""
    bomb, good = oversized_image(), photos()
    url = serve.endpoint("HTTP")
    before = preprocess_counts(url)
    baseline = tree_rss(serve.process.pid)  # ssd-serve, the watchdog, tritonserver and its stubs
    images = [bomb, good[0], bomb, good[1], bomb, good[2], bomb, good[3]]
    with PeakMemory(serve.process.pid) as memory, \
            httpclient.InferenceServerClient(url, concurrency=len(images)) as client:
        pending = []
        for image in images:
            tensor = httpclient.InferInput(io.IMAGE, [1, len(image)], "UINT8")
            tensor.set_data_from_numpy(padded([image]))
            pending.append(client.async_infer(io.ENSEMBLE, [tensor]))
        results = []
        for request in pending:
            try:
                results.append(request.get_result())
            except InferenceServerException as err:
                results.append(err)
    for error in results[0::2]:
        assert isinstance(error, InferenceServerException) and str(error.status()) == BAD_INPUT["http"]
        assert "20000x20000 pixels (400.0 MP), over the limit of 40.0 MP per image (max_image_pixels)" in str(error)
    for result, wanted in zip(results[1::2], expected):
        assert_same_detections({name: result.as_numpy(name) for name in io.DETECTION_OUTPUTS}, [wanted])
    assert memory.peak - baseline < 2**30, f"the server grew by {(memory.peak - baseline) / 2**30:.2f} GiB"
    for _ in range(50):  # statistics are recorded just after the responses go out
        after = preprocess_counts(url)
        if after[0] - before[0] >= 4:
            break
        time.sleep(0.1)
    assert (after[0] - before[0], after[1] - before[1]) == (4, 0)  # only the photos reached the decoder


@pytest.mark.slow
def test_the_soak_tool_counts_what_the_server_did(serve, tmp_path):
    summary_file = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "soak.py"),
                          "--url", serve.endpoint("gRPC"), "--protocol", "grpc", "--clients", "2", "--requests", "5",
                          "--corrupt-every", "3", "--oversized-every", "5", "--json-summary", str(summary_file)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(summary_file.read_text())
    # Requests 1..10: 5 and 10 oversized, 3, 6 and 9 corrupt, the other 5 photos.
    assert (summary["good_requests"], summary["answered"]) == (5, 5)
    assert (summary["bad_requests"], summary["rejected"]) == (5, 5)
    assert summary["collateral_failures"] == summary["bad_answered"] == 0
    assert summary["server_pid"] in process_tree(serve.process.pid)  # found from the port
    assert 0 < summary["rss_after_warmup"] <= summary["rss_peak"]
    assert "collateral failures   0" in run.stdout


@pytest.mark.slow
def test_sigterm_stops_the_server_and_frees_its_ports(serve):
    serve.process.send_signal(signal.SIGTERM)
    assert serve.process.wait(120) == 0
    for port in serve.ports.values():
        assert not listening_addresses(port)


# ----------------------------------------------------------------------------------------------
# Errors before a server runs


def test_a_repository_without_weights_says_to_export(tmp_path):
    install_configs(tmp_path)
    with pytest.raises(ServeError, match="run ssd-train export first"):
        TritonServer(tmp_path).start()
    run = subprocess.run([*ssd_serve_command(), "--model-repository", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1
    assert "run ssd-train export first" in run.stderr and "Traceback" not in run.stderr


def test_a_directory_that_is_no_repository_is_named(tmp_path):
    with pytest.raises(ServeError, match="not a model repository of ours"):
        TritonServer(tmp_path).start()


def test_a_taken_port_is_named(repository):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=f"port {port} on 127.0.0.1 is taken"):
            TritonServer(repository, http_port=port, grpc_port=0, metrics_port=0).start()


@pytest.mark.skipif(production_server() is not None, reason="an NGC tritonserver is installed here")
def test_the_gpu_flavour_needs_the_ngc_server(repository):
    with pytest.raises(ServeError, match="NGC"):
        TritonServer(repository, flavour="gpu").start()


def rewrite_manifest(repository: Path) -> None:
    """Vouch for the repository's current files, as a (broken) export would have."""
    write_manifest(repository, [path for path in repository.rglob("*") if path.name in (io.TORCHSCRIPT_FILE, io.LABELS_FILE)])


def test_a_repository_that_does_not_match_its_manifest_is_refused(repository, tmp_path):
    mixed = tmp_path / "repository"
    shutil.copytree(repository, mixed)
    (mixed / io.MODEL_FP16 / "1" / io.TORCHSCRIPT_FILE).write_bytes(b"an fp16 model of an older export")
    with pytest.raises(ServeError, match="ssd300_fp16/1/model.pt is not part of the last export"):
        TritonServer(mixed).start()
    (mixed / io.MODEL_FP16 / "1" / io.TORCHSCRIPT_FILE).unlink()
    (mixed / MANIFEST_FILE).unlink()
    run = subprocess.run([*ssd_serve_command(), "--model-repository", str(mixed)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].endswith("has no manifest.json (exported by an older ssd-train, or "
                                                         "assembled by hand): run ssd-train export again")


@pytest.mark.slow
def test_a_server_that_dies_shows_its_log(repository, tmp_path):
    broken = tmp_path / "repository"
    shutil.copytree(repository, broken)
    model = broken / io.MODEL_FP32 / "1" / io.TORCHSCRIPT_FILE
    model.unlink()  # the copy is independent of the exported file
    model.write_bytes(b"not a TorchScript archive")
    rewrite_manifest(broken)
    server = TritonServer(broken, http_port=0, grpc_port=0, metrics_port=0)
    with pytest.raises(ServeError, match="exited with code") as error:
        server.start()
    assert io.MODEL_FP32 in str(error.value)
    assert not server.running
    assert re.search(r"ssd300_fp32.*(failed|error)", str(error.value), re.IGNORECASE | re.DOTALL)
    assert not any(p.name.startswith("ssd-serve-") and str(os.getpid()) in p.name for p in Path("/dev/shm").iterdir())


@pytest.mark.slow
def test_a_server_fault_is_internal_not_bad_input(repository, tmp_path):
    broken = tmp_path / "repository"
    shutil.copytree(repository, broken)
    labels = broken / io.POSTPROCESS / "1" / io.LABELS_FILE
    labels.unlink()
    labels.write_text('[{"id": 1, "name": "circle"}]')  # fewer classes than the model scores
    rewrite_manifest(broken)
    with TritonServer(broken, http_port=0, grpc_port=0, metrics_port=0) as server:
        for protocol, url, infer in (("http", server.http_url, http_infer), ("grpc", server.grpc_url, grpc_infer)):
            with pytest.raises(InferenceServerException, match="re-run ssd-train export") as error:
                infer(url, photos()[:1])
            assert str(error.value.status()) == SERVER_FAULT[protocol]


@pytest.mark.slow
def test_an_admin_key_opens_model_control_and_shared_memory_is_an_opt_in(repository, expected):
    from multiprocessing import shared_memory

    key = "a key the operator chose"
    region = shared_memory.SharedMemory(create=True, size=4096)
    try:
        with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, admin_key=key,
                          allow_shared_memory=True) as server, \
                httpclient.InferenceServerClient(server.http_url) as http, \
                grpcclient.InferenceServerClient(server.grpc_url) as grpc:
            http.register_system_shared_memory("client", f"/{region.name}", 4096)  # no key needed: opted in
            http.unregister_system_shared_memory("client")
            for protocol, client in (("http", http), ("grpc", grpc)):
                for headers in ({}, admin_headers(protocol, "a guess")):
                    with pytest.raises(InferenceServerException, match="restricted"):
                        client.unload_model(io.ENSEMBLE, headers=headers)
            http.unload_model(io.ENSEMBLE, headers=admin_headers("http", key))
            assert not http.is_model_ready(io.ENSEMBLE)
            grpc.load_model(io.ENSEMBLE, headers=admin_headers("grpc", key))
            assert http.is_model_ready(io.ENSEMBLE)
            assert_same_detections(http_infer(server.http_url, photos()[:1]), expected[:1])
    finally:
        region.close()
        region.unlink()


# A Python process that starts a server with the TritonServer API, as the tests and tools do.
API_OWNER = """
import sys, time
from ssd_train.serving.server import TritonServer
ports = dict(a.lstrip("-").split("=") for a in sys.argv[1:] if a.startswith("--") and "=" in a)
TritonServer(sys.argv[2], http_port=int(ports["http-port"]), grpc_port=int(ports["grpc-port"]),
             metrics_port=int(ports["metrics-port"])).start()
print("Ctrl-C to stop.", flush=True)
time.sleep(3600)
"""


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is gone
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["SIGKILL of ssd-serve", "SIGKILL of a TritonServer owner", "Ctrl-C twice"])
def test_a_dead_owner_leaves_no_server_ports_or_files(repository, tmp_path, ending):
    """Whatever ends the owner, tritonserver and its stubs end within seconds, the ports are free, and
    no scratch directory (derived repository, log, python stub) or shared memory is left."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    log = tmp_path / "server.log"
    if ending == "SIGKILL of a TritonServer owner":
        command = [sys.executable, "-c", API_OWNER]
        serve = Serve(repository, env=env, command=command)
    else:
        serve = Serve(repository, "--log-file", str(log), env=env)
    processes = [serve.process.pid]
    try:
        serve.wait_for("Ctrl-C to stop.", timeout=300)
        processes = process_tree(serve.process.pid)
        assert len(processes) >= 4  # owner, watchdog, tritonserver, stubs
        assert [p.name for p in scratch.iterdir()][0].startswith("ssd-serve-")
        if ending == "Ctrl-C twice":
            serve.process.send_signal(signal.SIGINT)
            serve.wait_for("stopping", timeout=30)
            serve.process.send_signal(signal.SIGINT)  # do not wait for in-flight requests
            serve.process.wait(30)
            assert "Traceback" not in "\n".join(serve.output)
        else:
            serve.process.kill()
            serve.process.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = [pid for pid in processes if not gone(pid)]
            listening = [port for port in serve.ports.values() if listening_addresses(port)]
            files = list(scratch.iterdir()) + list(Path("/dev/shm").glob(f"ssd-serve-{serve.process.pid}-*"))
            if not left and not listening and not files:
                break
            time.sleep(0.5)
        assert not left and not listening and not files, (left, listening, files)
        if ending == "SIGKILL of ssd-serve":
            assert "Started HTTPService" in log.read_text()  # --log-file kept the server's log
    finally:  # a failed run leaves no server behind for the rest of the suite
        for pid in processes:
            if not gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
