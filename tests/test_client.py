"""ssd_client: input normalisation, padding, batching, model checks, response parsing, label names and
shared memory (no server), then detection through a real Triton server (slow)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from ssd_client import (AsyncSSDClient, ImageError, InferenceError, ModelMismatchError, ModelNotFoundError,
                        ServerUnavailableError, SSDClient, SSDClientError)
from ssd_client import protocol as wire
from ssd_client.images import (as_image_list, chunks, encode_image, encode_images, EncodedImage, image_name,
                               pad_batch)
from ssd_client.shm import SharedMemorySlot, unique_prefix
from ssd_common import io as sio
from ssd_common.labels import LabelMap
from ssd_train.models.ssd300.boxes import MAX_DETECTIONS

DATA_DIR = Path(skimage.data.__file__).parent  # real photos shipped with scikit-image


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def test_the_client_does_not_import_torch():
    code = ("import sys, ssd_client, ssd_client.cli, ssd_client.evaluate, ssd_common.draw; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------- input normalisation
def test_single_images_and_sequences_become_lists():
    photo = skimage.data.astronaut()
    assert len(as_image_list(str(DATA_DIR / "rocket.jpg"))) == 1
    assert len(as_image_list(DATA_DIR / "rocket.jpg")) == 1
    assert len(as_image_list(b"\xff\xd8")) == 1
    assert len(as_image_list(photo)) == 1
    assert len(as_image_list(skimage.data.camera())) == 1  # 2-D gray
    assert len(as_image_list(Image.fromarray(photo))) == 1
    assert len(as_image_list(np.stack([photo, photo, photo]))) == 3  # B x H x W x 3 batch
    assert len(as_image_list([photo, DATA_DIR / "rocket.jpg"])) == 2
    assert len(as_image_list(p for p in [photo])) == 1
    with pytest.raises(ImageError, match="expected an image"):
        as_image_list(42)


def test_encoded_files_pass_through_unchanged():
    for name in ("rocket.jpg", "astronaut.png"):
        path = DATA_DIR / name
        encoded = encode_image(path, image_name(path, 0))
        assert encoded.data == path.read_bytes()
        assert encoded.name == str(path)
        assert encode_image(path.read_bytes(), "x").data == path.read_bytes()


def test_arrays_and_pil_images_are_sent_as_lossless_png():
    photo = skimage.data.chelsea()
    encoded = encode_image(photo, "cat")
    assert encoded.data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(decode(encoded.data), photo)
    rgba = np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)])
    np.testing.assert_array_equal(decode(encode_image(Image.fromarray(rgba), "rgba").data), photo)
    gray = skimage.data.camera()
    with Image.open(io.BytesIO(encode_image(gray, "gray").data)) as img:
        np.testing.assert_array_equal(np.asarray(img), gray)


def test_formats_the_server_cannot_decode_are_reencoded(tmp_path):
    gif = DATA_DIR / "no_time_for_that_tiny.gif"
    encoded = encode_image(gif, str(gif))
    assert encoded.data[:8] == b"\x89PNG\r\n\x1a\n"
    bmp = tmp_path / "chelsea.bmp"  # DALI could decode it, but the server's image check takes JPEG/PNG only
    Image.fromarray(skimage.data.chelsea()).save(bmp)
    assert encode_image(bmp, str(bmp)).data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(gif) as img:
        np.testing.assert_array_equal(decode(encoded.data), np.asarray(img.convert("RGB")))


def test_an_image_over_pils_pixel_limit_goes_to_the_server_whose_cap_decides(tmp_path):
    """PIL refuses to open 20000x20000 (a decompression bomb to it): a JPEG or PNG is sent as it is, so the
    server's own cap refuses it in its words; another format, which would have to be converted, is refused here."""
    import struct

    jpeg = tmp_path / "bomb.jpg"
    Image.new("L", (20000, 20000), 128).save(jpeg, "JPEG")
    assert encode_image(jpeg, str(jpeg)).data == jpeg.read_bytes()
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "BMP")
    bmp = bytearray(buffer.getvalue())
    bmp[18:26] = struct.pack("<ii", 20000, 20000)  # a header claiming 20000x20000
    with pytest.raises(ImageError, match="bomb.bmp: too many pixels to convert for the server"):
        encode_image(bytes(bmp), "bomb.bmp")


def test_names_follow_positions_for_unnamed_images():
    photo = skimage.data.coffee()
    encoded = encode_images([photo, DATA_DIR / "rocket.jpg", photo], start=10)
    assert [e.name for e in encoded] == ["image 10", str(DATA_DIR / "rocket.jpg"), "image 12"]


@pytest.mark.parametrize("image, message", [
    (b"", "empty image data"),
    (b"definitely not an image", "not a readable image"),
    (np.zeros((4, 4, 3), np.float32), "must be uint8"),
    (np.zeros((4, 4, 5), np.uint8), "must be HxWx3"),
    (np.zeros((0, 4, 3), np.uint8), "must be HxWx3"),
    (3.5, "unsupported image type"),
])
def test_unreadable_inputs_raise_image_error_naming_them(image, message):
    with pytest.raises(ImageError, match=f"^bad one: .*{message}"):
        encode_image(image, "bad one")


def test_missing_truncated_and_non_image_files_name_the_path(tmp_path):
    with pytest.raises(ImageError, match=f"^{tmp_path / 'missing.jpg'}: no such file"):
        encode_images([tmp_path / "missing.jpg"])
    with pytest.raises(ImageError, match="cannot read it"):
        encode_images([tmp_path])
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(ImageError, match=f"^{text}: not a readable image"):
        encode_images([text])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((DATA_DIR / "astronaut.png").read_bytes()[:5000])
    with pytest.raises(ImageError, match=f"^{truncated}: not a readable image"):
        encode_images([truncated])


# --------------------------------------------------------------------------------------- padding, batching
def test_pad_batch_zero_pads_to_the_longest_image():
    images = [EncodedImage("a", b"\x01\x02\x03"), EncodedImage("b", b"\x04"), EncodedImage("c", b"\x05\x06")]
    batch = pad_batch(images)
    assert batch.dtype == np.uint8 and batch.shape == (3, 3)
    np.testing.assert_array_equal(batch, [[1, 2, 3], [4, 0, 0], [5, 6, 0]])
    with pytest.raises(ValueError):
        pad_batch([])


def test_chunks_split_at_the_max_batch_size():
    items = list(range(130))
    split = chunks(items, 64)
    assert [start for start, _ in split] == [0, 64, 128]
    assert [len(c) for _, c in split] == [64, 64, 2]
    assert [x for _, c in split for x in c] == items
    assert chunks(items[:3], 64) == [(0, [0, 1, 2])]
    assert chunks([], 4) == []
    with pytest.raises(ValueError):
        chunks(items, 0)


# ------------------------------------------------------------------------------------------ URLs, labels
@pytest.mark.parametrize("url, protocol, expected", [
    (None, "http", "localhost:8000"),
    (None, "grpc", "localhost:8001"),
    ("http://127.0.0.1:9000/", "http", "127.0.0.1:9000"),
    ("grpc://server:9001", "grpc", "server:9001"),
    ("server", "grpc", "server:8001"),
    ("localhost:8000", "http", "localhost:8000"),
])
def test_urls_are_normalised(url, protocol, expected):
    assert wire.normalise_url(url, protocol) == expected


def test_unknown_protocol_and_https_are_refused():
    with pytest.raises(SSDClientError, match="unknown protocol 'ftp'"):
        wire.check_protocol("ftp")
    with pytest.raises(SSDClientError, match="https"):
        wire.normalise_url("https://x:1", "http")


def test_label_maps_default_to_coco_and_load_exported_labels(tmp_path):
    assert wire.resolve_label_map(None) == LabelMap.coco()
    custom = LabelMap(((7, "circle"), (3, "square")))
    custom.save(tmp_path / sio.LABELS_FILE)
    assert wire.resolve_label_map(tmp_path / sio.LABELS_FILE) == custom
    assert wire.resolve_label_map(custom) is custom
    with pytest.raises(SSDClientError, match="cannot read label map"):
        wire.resolve_label_map(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------ model checks
def ensemble_metadata(grpc_style: bool = False, **changes) -> dict:
    """Model metadata as Triton answers it for the ensemble (gRPC's JSON writes int64 dims as strings)."""
    dim = str if grpc_style else int
    tensors = {
        "inputs": [(sio.IMAGE, "UINT8", [-1, -1])],
        "outputs": [(sio.DETECTION_BOXES, "FP32", [-1, MAX_DETECTIONS, 4]),
                    (sio.DETECTION_SCORES, "FP32", [-1, MAX_DETECTIONS]),
                    (sio.DETECTION_CLASSES, "INT32", [-1, MAX_DETECTIONS]),
                    (sio.NUM_DETECTIONS, "INT32", [-1, 1])],
    }
    for name, spec in changes.items():
        for kind in tensors.values():
            for i, entry in enumerate(kind):
                if entry[0] == name:
                    kind[i] = spec if spec is None else (name, *spec)
    return {"name": sio.ENSEMBLE, "versions": ["1"], "platform": "ensemble",
            **{kind: [{"name": n, "datatype": d, "shape": [dim(s) for s in shape]}
                      for n, d, shape in (e for e in entries if e is not None)]
               for kind, entries in tensors.items()}}


@pytest.mark.parametrize("grpc_style", [False, True])
def test_check_model_accepts_the_ensemble(grpc_style):
    config = {"config": {"max_batch_size": 64}} if grpc_style else {"max_batch_size": 64}
    spec = wire.check_model(sio.ENSEMBLE, ensemble_metadata(grpc_style), wire.as_json(config))
    assert spec.max_batch_size == 64
    assert spec.output_shapes[sio.DETECTION_BOXES] == (MAX_DETECTIONS, 4)
    assert spec.output_byte_sizes(2)[sio.DETECTION_BOXES] == 2 * MAX_DETECTIONS * 4 * 4
    assert spec.output_byte_sizes(3)[sio.NUM_DETECTIONS] == 3 * 4


@pytest.mark.parametrize("changes, config, message", [
    ({sio.DETECTION_SCORES: None}, {"max_batch_size": 8}, f"no output {sio.DETECTION_SCORES}"),
    ({sio.DETECTION_CLASSES: ("INT64", [-1, 200])}, {"max_batch_size": 8}, "is INT64, expected INT32"),
    ({sio.IMAGE: ("FP32", [-1, 3, 300, 300])}, {"max_batch_size": 8}, "input IMAGE is FP32"),
    ({sio.DETECTION_BOXES: ("FP32", [-1, 200, 5])}, {"max_batch_size": 8}, "per-image shape"),
    ({sio.DETECTION_SCORES: ("FP32", [-1, 100])}, {"max_batch_size": 8}, "per-image shape"),
    ({}, {}, r"does not batch \(max_batch_size 0\); the SSD300 and Mask R-CNN ensembles \('ssd300', 'maskrcnn'\) do"),
])
def test_check_model_rejects_other_models(changes, config, message):
    with pytest.raises(ModelMismatchError, match=message) as refused:
        wire.check_model("other", ensemble_metadata(**changes), config)
    if config:  # without masks it may have been meant as either ensemble: both are named
        assert str(refused.value).startswith("model 'other' is neither the SSD300 ensemble ('ssd300') nor the "
                                             "Mask R-CNN one ('maskrcnn'): ")


def test_model_not_found_lists_what_is_served_or_why_not_ready():
    http_index = [{"name": sio.ENSEMBLE, "version": "1", "state": "READY"},
                  {"name": sio.POSTPROCESS, "version": "1", "state": "UNAVAILABLE", "reason": "load failed"}]
    err = wire.model_not_found("yolo", "h:1", http_index)
    assert isinstance(err, ModelNotFoundError)
    assert f"'yolo' is not served by h:1 (models: {sio.ENSEMBLE}, {sio.POSTPROCESS})" in str(err)
    err = wire.model_not_found(sio.POSTPROCESS, "h:1", {"models": http_index})  # gRPC's shape
    assert "is not ready (state UNAVAILABLE: load failed)" in str(err)
    assert "(models: none)" in str(wire.model_not_found("x", "h:1", {}))


def test_server_errors_become_client_errors():
    unavailable = InferenceServerException("connection refused", status="StatusCode.UNAVAILABLE")
    deadline = InferenceServerException("deadline", status="StatusCode.DEADLINE_EXCEEDED")
    rejected = InferenceServerException("decode failed\n  at line 3", status="400")
    assert isinstance(wire.server_error(unavailable, "h:1", "grpc", "x"), ServerUnavailableError)
    assert "timed out while detecting" in str(wire.server_error(deadline, "h:1", "grpc", "detecting"))
    err = wire.server_error(rejected, "h:1", "http", "detecting in a.jpg")
    assert isinstance(err, InferenceError) and "\n" not in str(err) and "a.jpg" in str(err)
    assert isinstance(wire.server_error(ConnectionRefusedError(111, "refused"), "h:1", "http", "x"),
                      ServerUnavailableError)
    assert "timed out" in str(wire.server_error(TimeoutError(), "h:1", "http", "x"))


# ------------------------------------------------------------------------------- requests and responses
def fake_outputs(batch: int, counts: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Ensemble outputs as the server lays them out: padded to MAX_DETECTIONS, count per image."""
    rng = np.random.default_rng(seed)
    boxes = np.zeros((batch, MAX_DETECTIONS, 4), np.float32)
    scores = np.zeros((batch, MAX_DETECTIONS), np.float32)
    classes = np.zeros((batch, MAX_DETECTIONS), np.int32)
    ids = np.array(LabelMap.coco().category_ids(), np.int32)
    for i, n in enumerate(counts):
        xy = rng.uniform(0, 200, (n, 2)).astype(np.float32)
        boxes[i, :n] = np.concatenate([xy, xy + rng.uniform(1, 100, (n, 2)).astype(np.float32)], axis=1)
        scores[i, :n] = np.sort(rng.uniform(0.05, 1, n).astype(np.float32))[::-1]
        classes[i, :n] = rng.choice(ids, n)
    return {sio.DETECTION_BOXES: boxes, sio.DETECTION_SCORES: scores, sio.DETECTION_CLASSES: classes,
            sio.NUM_DETECTIONS: np.array(counts, np.int32).reshape(batch, 1)}


def http_result(outputs: dict[str, np.ndarray]):
    """A real tritonclient HTTP InferResult from a binary-data response body, as the server sends it."""
    header = {"model_name": sio.ENSEMBLE, "outputs": [
        {"name": name, "datatype": wire.OUTPUT_DTYPES[name], "shape": list(array.shape),
         "parameters": {"binary_data_size": array.nbytes}} for name, array in outputs.items()]}
    head = json.dumps(header).encode()
    body = head + b"".join(array.tobytes() for array in outputs.values())
    return httpclient.InferResult.from_response_body(body, header_length=len(head))


def grpc_result(outputs: dict[str, np.ndarray]):
    response = service_pb2.ModelInferResponse(model_name=sio.ENSEMBLE)
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=wire.OUTPUT_DTYPES[name], shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
    return grpcclient.InferResult(response)


def ensemble_spec(max_batch_size: int = 64) -> wire.ModelSpec:
    return wire.check_model(sio.ENSEMBLE, ensemble_metadata(), {"max_batch_size": max_batch_size})


def test_responses_parse_the_same_over_both_protocols():
    outputs = fake_outputs(3, [5, 0, 200])
    spec, coco = ensemble_spec(), LabelMap.coco()
    parsed = wire.parse_response(http_result(outputs), 3, spec, coco)
    assert parsed == wire.parse_response(grpc_result(outputs), 3, spec, coco)
    assert [len(p) for p in parsed] == [5, 0, 200]
    first = parsed[0][0]
    assert first.box == tuple(float(v) for v in outputs[sio.DETECTION_BOXES][0, 0])
    assert first.score == float(outputs[sio.DETECTION_SCORES][0, 0])
    assert first.category_name == coco.names_by_id()[first.category_id]
    assert first.to_dict()["box"] == list(first.box)


def test_threshold_and_custom_label_names():
    outputs = fake_outputs(1, [50], seed=3)
    spec = ensemble_spec()
    threshold = float(np.median(outputs[sio.DETECTION_SCORES][0, :50]))
    kept = wire.parse_response(http_result(outputs), 1, spec, LabelMap.coco(), threshold)[0]
    assert len(kept) == int((outputs[sio.DETECTION_SCORES][0, :50] >= threshold).sum())
    assert all(d.score >= threshold for d in kept)
    person_only = LabelMap(((1, "human"),))
    named = wire.parse_response(http_result(outputs), 1, spec, person_only)[0]
    assert {d.category_name for d in named if d.category_id == 1} <= {"human"}
    assert all(d.category_name == f"category {d.category_id}" for d in named if d.category_id != 1)


@pytest.mark.parametrize("tc", [httpclient, grpcclient])
def test_requests_carry_the_padded_batch(tc):
    batch = pad_batch(encode_images([DATA_DIR / "rocket.jpg", DATA_DIR / "astronaut.png"]))
    inputs, outputs = wire.build_request(tc, batch, ensemble_spec())
    assert [i.name() for i in inputs] == [sio.IMAGE]
    assert inputs[0].shape() == list(batch.shape) and inputs[0].datatype() == "UINT8"
    assert [o.name() for o in outputs] == list(wire.OUTPUT_DTYPES)


# --------------------------------------------------------------------------------------- shared memory
def test_shared_memory_slot_round_trip_and_cleanup():
    spec = ensemble_spec(max_batch_size=4)
    slot = SharedMemorySlot(spec, unique_prefix())
    shm_files = [Path("/dev/shm") / r.key.lstrip("/") for r in slot.regions()]
    assert all(f.exists() for f in shm_files)
    batch = pad_batch(encode_images([DATA_DIR / "rocket.jpg", DATA_DIR / "astronaut.png"]))
    assert slot.input_too_small(batch.nbytes)
    region = slot.grow_input(batch.nbytes)
    assert region.byte_size >= batch.nbytes and not slot.input_too_small(batch.nbytes)
    name, size = slot.write_input(batch)
    assert (name, size) == (region.name, batch.nbytes)
    with open(Path("/dev/shm") / region.key.lstrip("/"), "rb") as f:  # what the server maps
        assert f.read(batch.nbytes) == batch.tobytes()
    # Outputs: write each where the request tells the server to, read them back through the parser.
    outputs = fake_outputs(2, [3, 7])
    with open(Path("/dev/shm") / slot.output.key.lstrip("/"), "r+b") as f:
        for out_name, array in outputs.items():
            region_name, byte_size, offset = slot.output_location(out_name, 2)
            assert region_name == slot.output.name and byte_size == array.nbytes
            assert offset + spec.output_byte_sizes(4)[out_name] <= slot.output.byte_size
            f.seek(offset)
            f.write(array.tobytes())
    parsed = wire.parse_response(None, 2, spec, LabelMap.coco(), shm=slot)
    assert parsed == wire.parse_response(http_result(outputs), 2, spec, LabelMap.coco())
    shm_files.append(Path("/dev/shm") / region.key.lstrip("/"))
    slot.close()
    assert not any(f.exists() for f in shm_files)


@pytest.mark.parametrize("tc", [httpclient, grpcclient])
def test_shared_memory_requests_point_at_the_regions(tc):
    spec = ensemble_spec(max_batch_size=4)
    slot = SharedMemorySlot(spec, unique_prefix())
    try:
        batch = pad_batch(encode_images([DATA_DIR / "rocket.jpg"]))
        slot.grow_input(batch.nbytes)
        inputs, outputs = wire.build_request(tc, batch, spec, slot)
        params = inputs[0]._get_tensor()["parameters"] if tc is httpclient else inputs[0]._get_tensor().parameters
        region = params["shared_memory_region"]
        assert (region if tc is httpclient else region.string_param) == slot.input.name
    finally:
        slot.close()


# ------------------------------------------------------------------------------- no server / dead server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DroppingProxy:
    """A real TCP peer that drops connections as a server going away mid-request does: each of the next
    `drops` connections it accepts has its request read and is then closed unanswered (reset, with
    `reset=True`). Later connections are forwarded to `target` (host:port) both ways. `drop(n)` also
    cuts the connections being forwarded, as a server restart would."""

    def __init__(self, target: str | None = None, drops: int = 1 << 30, reset: bool = False):
        self.target = target
        self.reset = reset
        self.to_drop, self.dropped = drops, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._forwarded: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def drop(self, connections: int) -> None:
        with self._lock:
            self.to_drop = connections
            for sock in self._forwarded:
                _shut(sock)

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for sock in self._forwarded:
                _shut(sock)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                drop = self.to_drop > 0 or self.target is None
                self.to_drop -= drop
                self.dropped += drop
            if drop:
                threading.Thread(target=self._hang_up, args=(conn,), daemon=True).start()
                continue
            host, _, port = self.target.rpartition(":")
            upstream = socket.create_connection((host, int(port)))
            with self._lock:
                self._forwarded += [conn, upstream]
            for source, sink in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()

    def _hang_up(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(1 << 16)  # the request (or gRPC's connection preface): the drop is mid-request
            except OSError:
                pass
            if self.reset:  # linger 0: close sends RST instead of FIN
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
    except OSError:
        pass
    _shut(source)
    _shut(sink)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes the other direction's recv, unlike close()
    except OSError:
        pass


def connect(url: str, protocol: str, asynchronous: bool, **options):
    """Connect (and disconnect) a sync or asyncio client; its errors as they come."""
    if not asynchronous:
        SSDClient(url, protocol, **options).close()
        return

    async def run():
        async with AsyncSSDClient(url, protocol, **options):
            pass

    asyncio.run(run())


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_down_is_one_clear_error(protocol):
    url = f"127.0.0.1:{free_port()}"
    for asynchronous in (False, True):
        with pytest.raises(ServerUnavailableError, match=f"^cannot reach the Triton server at {url} "
                                                         f"\\({protocol}\\): is it running\\? .*after 4 attempts"):
            connect(url, protocol, asynchronous, timeout=5, retry_backoff=0.01)


def test_a_server_that_never_answers_times_out():
    with socket.socket() as listener:  # accepts connections, never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="timed out while checking liveness$"):
            SSDClient(url, "http", timeout=1)  # no retries: a second try would wait as long again
        assert time.monotonic() - start < 3
        with pytest.raises(ServerUnavailableError, match="timed out|cannot reach"):
            SSDClient(url, "grpc", timeout=1, retry_backoff=0.01)


@pytest.mark.parametrize("protocol, asynchronous, reset", [
    ("http", False, False), ("http", True, False), ("http", False, True), ("http", True, True),
    ("grpc", False, False), ("grpc", True, False),
])
def test_a_dropped_connection_is_server_unavailable_after_the_retries(protocol, asynchronous, reset):
    peer = DroppingProxy(reset=reset)  # drops every connection
    try:
        with pytest.raises(ServerUnavailableError, match=f"^(lost|cannot reach) the Triton server at {peer.url} "
                                                         f"\\({protocol}\\)"):
            connect(peer.url, protocol, asynchronous, retries=0)
        once = peer.dropped  # tritonclient's HTTP stacks try a closed connection again once or twice
        with pytest.raises(ServerUnavailableError, match=r"\(gave up after 3 attempts\)$") as raised:
            connect(peer.url, protocol, asynchronous, retries=2, retry_backoff=0.25)
        assert "\n" not in str(raised.value)
        assert peer.dropped - once >= 3 * once  # each retry connected again
    finally:
        peer.close()


def test_retry_delays_double_up_to_a_cap_with_jitter():
    policy = wire.RetryPolicy(retries=8, backoff=0.5)
    for retry in range(8):
        ceiling = min(wire.MAX_RETRY_BACKOFF, 0.5 * 2 ** retry)
        delays = [policy.delay(retry) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered
    dropped = ConnectionResetError(104, "Connection reset by peer")
    assert 0.25 <= policy.delay_after(dropped, 0) <= 0.5
    assert policy.delay_after(dropped, 8) is None  # retries used up
    assert wire.RetryPolicy(retries=0).delay_after(dropped, 0) is None
    for retries, backoff in ((-1, 0.5), (1.5, 0.5), (3, -1.0)):
        with pytest.raises(SSDClientError, match="retr"):
            wire.RetryPolicy(retries, backoff)


def test_only_errors_a_retry_can_help_are_retried():
    retried = [ConnectionRefusedError(111, "Connection refused"), ConnectionResetError(104, "reset"),
               InferenceServerException("Socket closed", status="StatusCode.UNAVAILABLE"),
               InferenceServerException("Server not ready", status="503")]
    final = [InferenceServerException("image 2 is not a JPEG or PNG", status="StatusCode.INVALID_ARGUMENT"),
             InferenceServerException("decode failed", status="400"),
             InferenceServerException("deadline", status="StatusCode.DEADLINE_EXCEEDED"),
             TimeoutError("timed out"),
             # Triton's refusal of a restricted API: gRPC calls it UNAVAILABLE, but it will not change.
             InferenceServerException("This protocol is restricted, expecting header "
                                      "'triton-grpc-protocol-admin-key'", status="StatusCode.UNAVAILABLE")]
    assert all(wire.retryable(err) for err in retried)
    assert not any(wire.retryable(err) for err in final)
    bad_image = wire.server_error(final[0], "h:1", "grpc", "detecting in a.jpg")
    assert isinstance(bad_image, InferenceError) and str(bad_image).endswith("a.jpg: image 2 is not a JPEG or PNG")


# ========================================================================================================
# Through a real Triton server (the CPU flavour of an exported repository), started once for the module.
SMALL_MAX_BATCH = 4  # the test repository's ensemble batches at most 4 images, so splitting is cheap to see


def shrink_max_batch(repository: Path, max_batch_size: int) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = repository / sio.ENSEMBLE / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    config.max_batch_size = max_batch_size
    path.write_text(text_format.MessageToString(config))


class Served:
    def __init__(self, server, root: Path):
        self.server = server
        self.http_url, self.grpc_url = server.http_url, server.grpc_url
        self.dataset = root / "shapes"
        self.checkpoint = root / "checkpoint.pt"
        self.labels = root / "repository" / sio.POSTPROCESS / "1" / sio.LABELS_FILE

    def url(self, protocol: str) -> str:
        return self.http_url if protocol == "http" else self.grpc_url


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Shapes val split, a random-weight resnet18 checkpoint with its label map (3 classes: random
    weights then score many boxes above the 0.05 cut), exported and served. Its boxes are the default
    boxes of the four coarser levels, which overlap the shapes: recall and mAP are small but not 0."""
    import torch

    from ssd_train.checkpoint import save_checkpoint
    from ssd_train.data.shapes import make_shapes_dataset
    from ssd_train.export import export_model_repository
    from ssd_train.models.ssd300.model import build_model
    from ssd_train.serving.server import TritonServer

    root = tmp_path_factory.mktemp("served")
    make_shapes_dataset(root / "shapes", train=0, val=8, seed=0)
    annotations = json.loads((root / "shapes" / "annotations" / "instances_val2017.json").read_text())
    label_map = LabelMap.from_coco_categories(annotations["categories"])
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=label_map.num_classes)
    with torch.no_grad():
        for head in model.loc:  # zero box offsets: every detection is a default box
            head.weight.zero_()
            head.bias.zero_()
        for head in model.conf[:2]:  # the two finest levels say background: their boxes are smaller than shapes
            head.weight.zero_()
            head.bias.zero_()
            head.bias.view(label_map.num_classes, -1)[0] = 20.0  # channels are class-major (SSD300.forward)
    save_checkpoint(root / "checkpoint.pt", {"model": model.state_dict(), "label_map": label_map.to_nvidia(),
                                             "categories": label_map.to_json(), "backbone": "resnet18", "epoch": 0})
    export_model_repository(root / "checkpoint.pt", root / "repository", precisions=["fp32"])
    shrink_max_batch(root / "repository", SMALL_MAX_BATCH)
    with TritonServer(root / "repository", http_port=0, grpc_port=0, metrics_port=0,
                      allow_shared_memory=True) as server:
        yield Served(server, root)


def photos() -> list:
    """Four real photos, one of each input kind."""
    return [DATA_DIR / "rocket.jpg", (DATA_DIR / "astronaut.png").read_bytes(), skimage.data.coffee(),
            Image.fromarray(skimage.data.chelsea())]


def photo_sizes() -> list[tuple[int, int]]:
    """(width, height) of `photos()`."""
    with Image.open(DATA_DIR / "rocket.jpg") as rocket:
        size = rocket.size
    return [size, (512, 512), skimage.data.coffee().shape[1::-1], skimage.data.chelsea().shape[1::-1]]


def request_counts(stats: dict) -> tuple[int, int]:
    """(requests, images) the server has answered for the model (gRPC's JSON writes int64 as strings)."""
    model = stats["model_stats"][0]
    return int(model["inference_stats"]["success"]["count"]), int(model["inference_count"])


def settled_counts(client: SSDClient) -> tuple[int, int]:
    """`request_counts` once they hold still: the server counts a request just after it answers it, so a
    request answered a moment ago may not be counted yet."""
    now = request_counts(client.statistics())
    while True:
        time.sleep(0.3)
        now, previous = request_counts(client.statistics()), now
        if now == previous:
            return now


def counts_after(client: SSDClient, before: tuple[int, int], images: int) -> tuple[int, int]:
    """(requests, images) answered since `before`, once the server has recorded `images` more images
    (it updates the statistics just after it sends a response)."""
    for _ in range(100):
        now = request_counts(client.statistics())
        if now[1] - before[1] >= images:
            break
        time.sleep(0.1)
    return now[0] - before[0], now[1] - before[1]


def detect_async(url: str, protocol: str, images, **options):
    async def run():
        async with AsyncSSDClient(url, protocol, **options) as client:
            return await client.detect(images)
    return asyncio.run(run())


def assert_close(found, expected):
    """Same detections up to the last bits a different server-side batch may change."""
    assert len(found) == len(expected)
    for image_found, image_expected in zip(found, expected):
        assert [d.category_id for d in image_found] == [d.category_id for d in image_expected]
        np.testing.assert_allclose([d.box for d in image_found], [d.box for d in image_expected], rtol=1e-4,
                                   atol=1e-3)
        np.testing.assert_allclose([d.score for d in image_found], [d.score for d in image_expected], atol=1e-5)


@pytest.mark.slow
def test_connect_reads_the_served_model(served):
    with SSDClient(served.http_url, label_map=served.labels) as client:
        assert client.spec.max_batch_size == SMALL_MAX_BATCH  # read from the model config
        assert client.batch_size == SMALL_MAX_BATCH
    with SSDClient(served.grpc_url, "grpc", batch_size=100) as client:
        assert client.batch_size == SMALL_MAX_BATCH
    with SSDClient(served.grpc_url, "grpc", batch_size=3) as client:
        assert client.batch_size == 3


@pytest.mark.slow
def test_detect_is_identical_over_http_grpc_sync_async_and_shared_memory(served):
    images = photos()  # one request (<= max batch) in every variant: the server computes the same batch
    labels = LabelMap.load(served.labels)
    reference = None
    for protocol in ("http", "grpc"):
        for shared_memory in (False, True):
            options = {"label_map": served.labels, "shared_memory": shared_memory}
            with SSDClient(served.url(protocol), protocol, **options) as client:
                found = client.detect(images)
            found_async = detect_async(served.url(protocol), protocol, images, **options)
            if reference is None:
                reference = found
            assert found == reference, (protocol, shared_memory, "sync")
            assert found_async == reference, (protocol, shared_memory, "async")
    assert len(reference) == len(images) and all(reference)
    names = labels.names_by_id()
    for detections, (width, height) in zip(reference, photo_sizes()):
        assert all(d.category_name == names[d.category_id] for d in detections)
        boxes = np.array([d.box for d in detections])
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        scores = [d.score for d in detections]
        assert scores == sorted(scores, reverse=True) and min(scores) > 0.05
    with SSDClient(served.http_url, label_map=served.labels) as client:
        kept = client.detect(images, threshold=0.5)
    assert [[d for d in found if d.score >= 0.5] for found in reference] == kept


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_batch_above_the_max_is_split_into_requests(served, protocol):
    images = photos() * 2 + photos()[:2]  # 10 images: requests of 4, 4 and 2
    with SSDClient(served.url(protocol), protocol, label_map=served.labels) as client:
        reference = client.detect(photos())
        before = settled_counts(client)
        found = client.detect(images)
        assert counts_after(client, before, len(images)) == (3, 10)
        assert_close(found, reference * 2 + reference[:2])
        before = settled_counts(client)
        found_async = detect_async(served.url(protocol), protocol, images, label_map=served.labels, batch_size=3,
                                   concurrency=2)
        assert counts_after(client, before, len(images)) == (4, 10)  # 3 + 3 + 3 + 1
    assert_close(found_async, found)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_wrong_model_and_other_io_are_one_clear_error_each(served, protocol):
    with pytest.raises(ModelNotFoundError, match=f"model 'yolo' is not served by .*models: .*{sio.ENSEMBLE}"):
        SSDClient(served.url(protocol), protocol, model="yolo")
    with pytest.raises(ModelMismatchError, match=f"model '{sio.POSTPROCESS}' is neither the SSD300 ensemble "
                                                 r"\('ssd300'\) nor the Mask R-CNN one .*IMAGE"):
        SSDClient(served.url(protocol), protocol, model=sio.POSTPROCESS)


@pytest.mark.slow
def test_unreadable_images_are_named_and_the_server_keeps_answering(served, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with SSDClient(served.http_url) as client:
        with pytest.raises(ImageError, match=f"^{broken}: not a readable image"):
            client.detect([DATA_DIR / "rocket.jpg", broken])
        with pytest.raises(ImageError, match=f"^{tmp_path / 'gone.png'}: no such file"):
            client.detect([DATA_DIR / "rocket.jpg", tmp_path / "gone.png"])
        with pytest.raises(ImageError, match="^image 1: empty image data"):
            client.detect([skimage.data.coffee(), b""])
        # Parses as a JPEG here but cannot be decoded: the server refuses that request, naming it.
        truncated = tmp_path / "truncated.jpg"
        truncated.write_bytes((DATA_DIR / "rocket.jpg").read_bytes()[:3000])
        with pytest.raises(InferenceError, match=f"refused the input while detecting in {truncated}: "):
            client.detect(truncated)
        assert len(client.detect(DATA_DIR / "rocket.jpg")[0]) > 0


# ---------------------------------------------------------------------------- dropped connections, refusals
@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_retries_ride_out_dropped_connections(served, protocol):
    """Three dropped connections (more than tritonclient's HTTP stacks try again by themselves) while
    connecting and again mid-session: the clients with their default settings still answer, and
    without retries the same drops are a ServerUnavailableError."""
    image = DATA_DIR / "rocket.jpg"
    with SSDClient(served.url(protocol), protocol) as client:
        expected = client.detect(image)

    async def detect_through_drops(url: str):
        async with AsyncSSDClient(url, protocol) as client:
            proxy.drop(3)
            return await client.detect(image)

    proxy = DroppingProxy(served.url(protocol), drops=3)
    try:
        with SSDClient(proxy.url, protocol) as client:
            assert proxy.dropped == 3
            proxy.drop(3)  # the connection in use goes too
            assert client.detect(image) == expected
        assert proxy.dropped == 6
        proxy.drop(3)
        assert asyncio.run(detect_through_drops(proxy.url)) == expected
        assert proxy.dropped == 12

        # Without retries. (Last: gRPC channels to one address share its connection, and its wait
        # before reconnecting after a failure.)
        with SSDClient(proxy.url, protocol, retries=0) as client:
            proxy.drop(3)
            with pytest.raises(ServerUnavailableError, match="^(lost|cannot reach) the Triton server"):
                client.detect(image)
        proxy.drop(3)
        with pytest.raises(ServerUnavailableError, match=f"Triton server at {proxy.url} "):
            SSDClient(proxy.url, protocol, retries=0)
    finally:
        proxy.close()


@contextlib.contextmanager
def bare_tritonserver(directory: Path, *options: str):
    """A real tritonserver serving no models (up in well under a second); yields {protocol: url}."""
    from ssd_train.serving.server import cpu_server

    binary, backends, env = cpu_server(directory, dict(os.environ))
    (directory / "models").mkdir()
    urls = {"http": f"127.0.0.1:{free_port()}", "grpc": f"127.0.0.1:{free_port()}"}
    command = [binary, f"--model-repository={directory / 'models'}", f"--backend-directory={backends}",
               "--allow-metrics=false", *options,
               *(f"--{protocol}-{key}={value}" for protocol, url in urls.items()
                 for key, value in zip(("address", "port"), url.split(":")))]
    with open(directory / "server.log", "wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            with contextlib.suppress(InferenceServerException, OSError):
                if httpclient.InferenceServerClient(urls["http"]).is_server_live():
                    break
            time.sleep(0.1)
        yield urls
    finally:
        server.kill()  # nothing to lose; SIGTERM would wait out its 30 s exit timeout
        server.wait()


@pytest.mark.slow
def test_refused_shared_memory_says_how_to_allow_it(tmp_path):
    """Shared memory restricted as `ssd-serve` restricts it unless --allow-shared-memory (no models needed:
    the refusal comes first). gRPC calls that refusal UNAVAILABLE, yet it is final."""
    from ssd_train.serving.server import ADMIN_KEY_HEADER

    rule = f"shared-memory:{ADMIN_KEY_HEADER}=not-sent"
    with bare_tritonserver(tmp_path, f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}") as urls:
        for protocol, tc in (("http", httpclient), ("grpc", grpcclient)):
            with pytest.raises(InferenceServerException) as refused:
                tc.InferenceServerClient(urls[protocol]).register_system_shared_memory("ssd_test", "/ssd_test", 64)
            assert not wire.retryable(refused.value)
            error = wire.server_error(refused.value, urls[protocol], protocol, wire.REGISTERING_SHARED_MEMORY)
            assert str(error).startswith(f"the Triton server at {urls[protocol]} ({protocol}) does not allow shared "
                                         "memory (start it with `ssd-serve --allow-shared-memory`): This ")
            assert "restricted" in str(error) and "\n" not in str(error)


@pytest.mark.slow
def test_the_http_client_on_the_grpc_port_says_so(tmp_path):
    with bare_tritonserver(tmp_path) as urls:
        for asynchronous in (False, True):
            with pytest.raises(ServerUnavailableError, match="it does not answer in HTTP, is that its gRPC port"):
                connect(urls["grpc"], "http", asynchronous)


# ------------------------------------------------------------------------------------------------ the CLI
def run_cli(main, *args):
    from click.testing import CliRunner

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_errors_are_one_line():
    from ssd_client.cli import cli

    url = f"127.0.0.1:{free_port()}"
    result = run_cli(cli, "detect", DATA_DIR / "rocket.jpg", "--url", url, "--retries", 1, "--retry-backoff", 0.01)
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: cannot reach the Triton server at {url} (http): is it running? "
                                     f"([Errno 111] Connect call failed ('127.0.0.1', {url.split(':')[1]})) "
                                     "(gave up after 2 attempts)")
    result = run_cli(cli, "evaluate", "--data", "/nonexistent", "--url", url)
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "/nonexistent" in result.output and result.output.startswith("Error: ")
    result = run_cli(cli, "detect", DATA_DIR / "rocket.jpg", "--labels", "/nonexistent/labels.json")
    assert result.exit_code == 1 and "cannot read label map /nonexistent/labels.json" in result.output
    result = run_cli(cli, "status", "--url", url)
    assert result.output.strip() == (f"Error: cannot reach the Triton server at {url} (http): is it running? "
                                     "([Errno 111] Connection refused)")


@pytest.mark.parametrize("command, option, value, message", [
    ("detect", "--timeout", 0, "0.0 is not in the range 0<x<=86400.0"),
    ("detect", "--timeout", -1, "-1.0 is not in the range 0<x<=86400.0"),
    ("detect", "--timeout", "nan", "'nan' is not a finite number"),
    ("detect", "--timeout", "inf", "inf is not in the range 0<x<=86400.0"),
    ("detect", "--threshold", 1.5, "1.5 is not in the range 0<=x<=1"),
    ("detect", "--threshold", "nan", "'nan' is not a finite number"),
    ("detect", "--batch-size", 0, "0 is not in the range x>=1"),
    ("detect", "--retry-backoff", "nan", "'nan' is not a finite number"),
    ("evaluate", "--timeout", 0, "0.0 is not in the range 0<x<=86400.0"),
    ("evaluate", "--concurrency", 0, "0 is not in the range 1<=x<=1024"),
    ("evaluate", "--batch-size", -2, "-2 is not in the range x>=1"),
    ("status", "--timeout", 0, "0.0 is not in the range 0<x<=86400.0"),
])
def test_cli_numbers_out_of_range_are_refused_at_the_option(command, option, value, message):
    from ssd_client.cli import cli

    arguments = {"detect": [DATA_DIR / "rocket.jpg"], "evaluate": ["--data", "/nonexistent"], "status": []}
    url = f"127.0.0.1:{free_port()}"  # nothing listens: the option is refused before any call
    result = run_cli(cli, command, *arguments[command], "--url", url, option, value)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == f"Error: Invalid value for '{option}': {message}."


def test_status_from_a_server_that_is_not_triton_is_one_line():
    """Any HTTP server answering JSON to every path: the status says it is no Triton server, in one line."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ssd_client.cli import cli

    class AnswersJson(BaseHTTPRequestHandler):
        def answer(self):
            body = json.dumps({"models": 5, "name": "not triton"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), AnswersJson) as other:
        threading.Thread(target=other.serve_forever, daemon=True).start()
        url = f"127.0.0.1:{other.server_address[1]}"
        result = run_cli(cli, "status", "--url", url)
        other.shutdown()
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: the server at {url} (http) answered what a Triton server does not (")
    assert result.output.count("\n") == 1


def test_status_rows_read_both_protocols_statistics():
    """HTTP writes the statistics' int64 as numbers, gRPC's JSON as strings; a model without statistics
    (or a server that restricts them) keeps its name and state."""
    from ssd_client.status import format_status, model_row

    times = {"success": 30_000_000, "fail": 5, "queue": 3_000_000, "compute_input": 1_000_000,
             "compute_infer": 20_000_000, "compute_output": 0}
    http = {"inference_count": 6, "execution_count": 4,
            "inference_stats": {key: {"count": 1 if key == "fail" else 3, "ns": ns} for key, ns in times.items()}}
    grpc = json.loads(json.dumps(http), parse_int=str)
    entry = {"name": "ssd300", "version": "1", "state": "READY"}
    expected = {"model": "ssd300", "version": "1", "state": "READY", "requests": 3, "failed": 1, "images": 6,
                "batches": 4, "images_per_batch": 1.5, "queue_ms": 1.0, "compute_ms": 7.0, "request_ms": 10.0}
    assert model_row(entry, http) == model_row(entry, grpc) == expected
    assert model_row({"name": "maskrcnn", "state": "UNAVAILABLE"}, None) == {
        "model": "maskrcnn", "version": "", "state": "UNAVAILABLE"}
    table = format_status({"server": "triton", "version": "2.51.0", "url": "h:8000", "protocol": "http",
                           "live": True, "ready": False, "models": [expected, model_row(entry, None)]})
    assert table.splitlines()[0] == "triton 2.51.0 at h:8000 (http): live, not ready"
    assert table.splitlines()[2].split() == ["ssd300", "READY", "3", "1", "6", "4", "1.5", "1.0", "7.0", "10.0"]
    assert table.splitlines()[3].split() == ["ssd300", "READY"] + ["-"] * 8


@pytest.mark.slow
def test_cli_detect_prints_and_draws_what_the_library_finds(served, tmp_path):
    from ssd_client.cli import cli

    paths = [DATA_DIR / "rocket.jpg", DATA_DIR / "astronaut.png"]
    with SSDClient(served.grpc_url, "grpc", label_map=served.labels) as client:
        expected = client.detect(paths, threshold=0.3)
    result = run_cli(cli, "detect", *paths, "--url", served.grpc_url, "--protocol", "grpc", "--labels",
                     served.labels, "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines == [{"image": str(path), **d.to_dict()} for path, found in zip(paths, expected) for d in found]

    out = tmp_path / "annotated"
    result = run_cli(cli, "detect", *paths, "--url", served.http_url, "--labels", served.labels, "--output-dir", out)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith(str(DATA_DIR))]
    assert len(rows) == sum(max(1, len(found)) for found in expected)
    first = expected[0][0]
    assert any(first.category_name in row and f"{first.score:.3f}" in row for row in rows)
    for path in paths:
        with Image.open(out / path.name) as drawn, Image.open(path) as original:
            assert drawn.size == original.size
            assert not np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(original.convert("RGB")))


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [None, 1])
def test_cli_detect_reports_the_good_images_and_names_each_bad_one(served, tmp_path, batch_size):
    """A truncated JPEG (the server refuses it) and a missing file among good photos: the photos'
    detections are printed and drawn, each bad image is one line on stderr, and the exit status is 1."""
    from ssd_client.cli import cli

    good = [DATA_DIR / "rocket.jpg", DATA_DIR / "astronaut.png"]
    truncated, missing = tmp_path / "truncated.jpg", tmp_path / "missing.jpg"
    truncated.write_bytes(good[0].read_bytes()[:3000])
    with SSDClient(served.grpc_url, "grpc", label_map=served.labels, batch_size=1) as client:
        expected = client.detect(good, threshold=0.3)
    assert all(expected)
    out = tmp_path / "annotated"
    options = ["--labels", served.labels, "--url", served.grpc_url, "--protocol", "grpc", "--json",
               "--output-dir", out, *(["--batch-size", batch_size] if batch_size else [])]
    result = run_cli(cli, "detect", good[0], truncated, missing, good[1], *options)
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # each photo went alone, as expected's
    assert lines == [{"image": str(path), **d.to_dict()} for path, found in zip(good, expected) for d in found]
    errors = [line for line in result.stderr.splitlines() if not line.startswith("wrote ")]
    assert errors == [f"Error: {truncated}: Triton server at {served.grpc_url} (grpc) refused the input while detecting in "
                      f"{truncated}: in ensemble '{sio.ENSEMBLE}', IMAGE input 0: cannot decode image: truncated "
                      "JPEG (no end-of-image marker)",
                      f"Error: {missing}: no such file"]
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in good)


@pytest.mark.slow
def test_cli_evaluate_matches_ssd_train_evaluate(served, tmp_path):
    from ssd_client.cli import cli
    from ssd_common.coco_eval import STAT_NAMES
    from ssd_train.cli import cli as train_cli

    result = run_cli(train_cli, "evaluate", "--data", served.dataset, "--checkpoint", served.checkpoint,
                     "--data-backend", "dali", "--json-summary", tmp_path / "in_process.json", "--no-channels-last")
    assert result.exit_code == 0, result.output
    result = run_cli(cli, "evaluate", "--data", served.dataset, "--url", served.grpc_url, "--protocol", "grpc",
                     "--concurrency", 2, "--batch-size", 3, "--json-summary", tmp_path / "served.json")
    assert result.exit_code == 0, result.output
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in result.output
    in_process = json.loads((tmp_path / "in_process.json").read_text())
    through_server = json.loads((tmp_path / "served.json").read_text())
    assert set(in_process) - {"checkpoint"} <= set(through_server)
    assert through_server["AR100"] > 0.01 and through_server["AP50"] > 0  # not just 0 == 0
    for name in ("mAP", *STAT_NAMES):
        assert through_server[name] == pytest.approx(in_process[name], abs=1e-3), name


@pytest.mark.slow
def test_cli_evaluate_leaves_out_failed_images_up_to_max_failures(served, tmp_path):
    from ssd_client.cli import cli
    from ssd_common.coco_eval import coco_evaluate, detection_records

    data = tmp_path / "shapes"
    shutil.copytree(served.dataset, data)
    annotation_file = data / "annotations" / "instances_val2017.json"
    images = sorted((image["id"], data / "val2017" / image["file_name"])
                    for image in json.loads(annotation_file.read_text())["images"])
    (bad_id, truncated), (garbage_id, garbage) = images[:2]
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])  # the server cannot decode it
    garbage.write_bytes(b"not an image")  # the client does not send it
    result = run_cli(cli, "evaluate", "--data", data, "--url", served.grpc_url, "--protocol", "grpc",
                     "--batch-size", 3, "--concurrency", 2, "--json-summary", tmp_path / "summary.json",
                     "--no-progress")
    assert result.exit_code == 0, result.output
    assert "2 images failed and are left out of the score:" in result.output
    assert f"\n  {truncated}: Triton server at {served.grpc_url} (grpc) refused the input while detecting in {truncated}: " \
        in result.output
    assert f"\n  {garbage}: not a readable image" in result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images"] == 6
    assert [(f["image_id"], f["image"]) for f in summary["failures"]] == [(bad_id, str(truncated)),
                                                                          (garbage_id, str(garbage))]
    # The score is that of the six answered images; counting the failed ones as empty would lower it.
    good = images[2:]
    with SSDClient(served.grpc_url, "grpc") as client:
        found = client.detect([path for _, path in good])
    records = [record for (image_id, _), detections in zip(good, found)
               for record in detection_records(image_id, [d.box for d in detections], [d.score for d in detections],
                                               [d.category_id for d in detections])]
    answered = coco_evaluate(annotation_file, records, image_ids=[image_id for image_id, _ in good])
    assert summary["AR100"] == pytest.approx(answered["stats"]["AR100"], abs=1e-3)
    assert summary["mAP"] == pytest.approx(answered["mAP"], abs=1e-3)
    assert summary["AR100"] > coco_evaluate(annotation_file, records)["stats"]["AR100"]

    result = run_cli(cli, "evaluate", "--data", data, "--url", served.grpc_url, "--protocol", "grpc",
                     "--batch-size", 1, "--concurrency", 1, "--max-failures", 1, "--no-progress")
    assert result.exit_code == 1
    assert result.output.startswith("Error: too many failed images (2, at most 1 allowed); the last: ")
    assert result.output.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_status_gives_each_step_its_requests_and_batches(served, protocol):
    """`ssd-client status`: the ensemble and each of its steps with their figures since the server started;
    two requests of 2 images each show up in every step, however dynamic batching grouped them."""
    from ssd_client.cli import cli
    from ssd_client.status import server_status

    url = served.http_url if protocol == "http" else served.grpc_url
    steps = [name for name in sio.MODELS if name != sio.MODEL_FP16]  # the export is fp32 only
    with SSDClient(url, protocol) as client:
        settled_counts(client)  # the previous test's last request is counted
    before = {row["model"]: row for row in server_status(url, protocol)["models"]}
    assert sorted(before) == sorted(steps)
    with SSDClient(url, protocol, label_map=served.labels, batch_size=2) as client:
        client.detect(photos())
    for _ in range(100):  # the server counts a request just after it answers
        status = server_status(url, protocol)
        rows = {row["model"]: row for row in status["models"]}
        if all(rows[name]["images"] - before[name]["images"] == 4 for name in steps):
            break
        time.sleep(0.1)
    assert status["live"] and status["ready"] and status["server"] == "triton" and status["version"]
    for name in steps:
        row, earlier = rows[name], before[name]
        assert row["state"] == "READY"
        assert (row["requests"] - earlier["requests"], row["images"] - earlier["images"]) == (2, 4), name
        assert row["failed"] == earlier["failed"] and 1 <= row["batches"] - earlier["batches"] <= 2
        assert row["images_per_batch"] == round(row["images"] / row["batches"], 2)
        assert 0 <= row["queue_ms"] and 0 < row["compute_ms"] <= row["request_ms"]

    result = run_cli(cli, "status", "--url", url, "--protocol", protocol)
    assert result.exit_code == 0, result.output
    header, columns, *lines = result.output.splitlines()
    assert header == f"triton {status['version']} at {url} ({protocol}): live, ready"
    assert columns.split()[:3] == ["model", "state", "requests"]
    assert [line.split()[:2] for line in lines] == [[name, "READY"] for name in sorted(steps)]
    shown = json.loads(run_cli(cli, "status", "--url", url, "--protocol", protocol, "--json").output)
    assert [row["model"] for row in shown["models"]] == sorted(steps)
    assert shown["models"][0]["images"] >= rows[shown["models"][0]["model"]]["images"]
