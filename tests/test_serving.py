"""`ssd-serve` end to end on CPU: export a checkpoint, start the real tritonserver (the CPU flavour
on nvidia-pytriton's server), send real JPEG and PNG photos over HTTP and gRPC with tritonclient,
and compare with `ssd_train.predict.Predictor` on the same images. One server for the module."""

from __future__ import annotations

import asyncio
import io as bytes_io
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

from ssd_train.export import export_model_repository, install_configs
from ssd_train.serving import io
from ssd_train.serving.server import ServeError, TritonServer, production_server

DATA_DIR = Path(skimage.data.__file__).parent  # real photos shipped with scikit-image
CORRUPT = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 8  # a JPEG header, then noise


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
    """IPv4/IPv6 addresses listening on `port` (from /proc/net/tcp*)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                text = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
                addresses.add(text.removeprefix("::ffff:"))  # IPv4-mapped IPv6
    return addresses


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
    from ssd_train.predict import Predictor

    detections = Predictor.from_checkpoint(tiny_checkpoint).detect(photos())
    assert all(detections), "the test checkpoint must detect something to compare"
    return detections


class Serve:
    """`ssd-serve` run as a user runs it, its stdout collected by a thread."""

    def __init__(self, repository: Path):
        self.ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        self.process = subprocess.Popen(
            [*ssd_serve_command(), "--model-repository", str(repository), "--flavour", "auto",
             *(f"--{name}-port={port}" for name, port in self.ports.items())],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
    with pytest.raises(InferenceServerException, match="cannot decode image"):
        infer(url, [CORRUPT])
    with pytest.raises(InferenceServerException, match="input 1: cannot decode image"):
        infer(url, [photos()[0], CORRUPT])
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
    with pytest.raises(ServeError, match="not an SSD300 model repository"):
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


@pytest.mark.slow
def test_a_server_that_dies_shows_its_log(repository, tmp_path):
    broken = tmp_path / "repository"
    shutil.copytree(repository, broken)
    model = broken / io.MODEL_FP32 / "1" / io.TORCHSCRIPT_FILE
    model.unlink()  # the copy is independent of the exported file
    model.write_bytes(b"not a TorchScript archive")
    server = TritonServer(broken, http_port=0, grpc_port=0, metrics_port=0)
    with pytest.raises(ServeError, match="exited with code") as error:
        server.start()
    assert io.MODEL_FP32 in str(error.value)
    assert not server.running
    assert re.search(r"ssd300_fp32.*(failed|error)", str(error.value), re.IGNORECASE | re.DOTALL)
    assert not any(p.name.startswith("ssd-serve-") and str(os.getpid()) in p.name for p in Path("/dev/shm").iterdir())
