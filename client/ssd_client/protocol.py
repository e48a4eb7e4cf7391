"""The wire, shared by the sync and asyncio clients: URLs, the model check, request building, response
parsing and error translation. No I/O here; the clients make the calls."""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass

import numpy as np
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from ssd_client.errors import (InferenceError, ModelMismatchError, ModelNotFoundError, ServerUnavailableError,
                               SSDClientError)
from ssd_train.labels import LabelMap, LabelMapError
from ssd_train.serving import io

PROTOCOLS = ("http", "grpc")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
DEFAULT_TIMEOUT = 120.0  # seconds; a full batch of 64 takes a while on a CPU-only server

# Triton dtypes of the ensemble's tensors: one source, ssd_train.serving.io.
INPUT_DTYPES = io.ENSEMBLE_INPUT_DTYPES
OUTPUT_DTYPES = io.ENSEMBLE_OUTPUT_DTYPES


@dataclass(frozen=True)
class Detection:
    """One detected object; `box` is (x1, y1, x2, y2) in pixels of the original image."""

    box: tuple[float, float, float, float]
    score: float
    category_id: int
    category_name: str

    def to_dict(self) -> dict:
        return {**asdict(self), "box": list(self.box)}


@dataclass(frozen=True)
class ModelSpec:
    """What the client learned about the served model at connect time."""

    name: str
    max_batch_size: int
    output_shapes: dict  # output name -> per-image shape (no batch dimension)

    def output_byte_sizes(self, batch_size: int) -> dict[str, int]:
        return {name: batch_size * int(np.prod(shape)) * np.dtype(triton_to_np_dtype(OUTPUT_DTYPES[name])).itemsize
                for name, shape in self.output_shapes.items()}


def check_protocol(protocol: str) -> str:
    protocol = str(protocol).lower()
    if protocol not in PROTOCOLS:
        raise SSDClientError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    return protocol


def normalise_url(url: str | None, protocol: str) -> str:
    """'host:port' as tritonclient wants it: no scheme; the protocol's default port when none is given."""
    if not url:
        return f"localhost:{DEFAULT_PORTS[protocol]}"
    for scheme in ("http://", "grpc://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    if url.startswith("https://"):
        raise SSDClientError("https URLs are not supported (the client speaks plain HTTP/gRPC)")
    url = url.rstrip("/")
    host, _, port = url.rpartition(":")
    if not host or not port.isdigit():
        url = f"{url}:{DEFAULT_PORTS[protocol]}"
    return url


def tritonclient_module(protocol: str, asyncio: bool = False):
    """tritonclient.http / .grpc, or their .aio variants."""
    return importlib.import_module(f"tritonclient.{protocol}" + (".aio" if asyncio else ""))


def make_client(tc, protocol: str, url: str, timeout: float):
    """A tritonclient InferenceServerClient (sync or aio module `tc`) with the timeout where it goes."""
    if protocol == "grpc":
        return tc.InferenceServerClient(url)  # gRPC takes the timeout per call (`infer_kwargs`)
    if tc.__name__.endswith(".aio"):
        return tc.InferenceServerClient(url, conn_timeout=timeout)
    return tc.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)


def request_batch_size(batch_size: int | None, spec: "ModelSpec") -> int:
    """Images per request: the caller's choice, capped by (and defaulting to) the model's max batch."""
    if batch_size is None:
        return spec.max_batch_size
    if int(batch_size) < 1:
        raise SSDClientError(f"batch size must be at least 1, got {batch_size}")
    return min(int(batch_size), spec.max_batch_size)


def resolve_label_map(label_map) -> LabelMap:
    """None -> COCO; a path -> a `labels.json` written by `ssd-train export`; a LabelMap as it is."""
    if label_map is None:
        return LabelMap.coco()
    if isinstance(label_map, LabelMap):
        return label_map
    try:
        return LabelMap.load(label_map)
    except LabelMapError as err:
        raise SSDClientError(str(err)) from None


def as_json(response) -> dict | list:
    """gRPC `as_json` answers wrap the config in {"config": ...} and write int64 as strings."""
    if isinstance(response, dict) and set(response) == {"config"}:
        return response["config"]
    return response


def tensor_specs(entries) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Model metadata inputs/outputs -> {name: (datatype, shape with the batch dimension)}."""
    return {e["name"]: (e["datatype"], tuple(int(d) for d in e.get("shape", ()))) for e in entries or ()}


def check_model(name: str, metadata: dict, config: dict) -> ModelSpec:
    """The served model must take our IMAGE input and give our detection outputs."""
    max_batch_size = int(config.get("max_batch_size", 0))
    if max_batch_size < 1:
        raise ModelMismatchError(f"model {name!r} does not batch (max_batch_size 0); "
                                 f"the SSD300 ensemble {io.ENSEMBLE!r} does")
    inputs, outputs = tensor_specs(metadata.get("inputs")), tensor_specs(metadata.get("outputs"))
    problems = _tensor_problems("input", inputs, INPUT_DTYPES) + _tensor_problems("output", outputs, OUTPUT_DTYPES)
    if set(inputs) != set(INPUT_DTYPES):
        problems.append(f"inputs are {sorted(inputs)}, expected {sorted(INPUT_DTYPES)}")
    if not problems:
        per_image = {n: shape[1:] for n, (_, shape) in outputs.items() if n in OUTPUT_DTYPES}
        problems = _shape_problems(per_image)
    if problems:
        raise ModelMismatchError(f"model {name!r} is not the SSD300 ensemble: " + "; ".join(problems))
    return ModelSpec(name, max_batch_size, per_image)


def _tensor_problems(kind: str, found: dict, expected: dict) -> list[str]:
    problems = []
    for tensor, dtype in expected.items():
        if tensor not in found:
            problems.append(f"no {kind} {tensor}")
        elif found[tensor][0] != dtype:
            problems.append(f"{kind} {tensor} is {found[tensor][0]}, expected {dtype}")
    return problems


def _shape_problems(per_image: dict) -> list[str]:
    """Shapes the parser relies on: boxes [N, 4], scores and classes [N], count [1], all fixed."""
    boxes = per_image[io.DETECTION_BOXES]
    n = boxes[0] if len(boxes) == 2 else None
    want = {io.DETECTION_BOXES: (n, 4), io.DETECTION_SCORES: (n,), io.DETECTION_CLASSES: (n,),
            io.NUM_DETECTIONS: (1,)}
    return [f"output {tensor} has per-image shape {list(per_image[tensor])}, expected {list(shape)}"
            for tensor, shape in want.items()
            if n is None or n < 1 or tuple(per_image[tensor]) != shape]


def model_not_found(name: str, url: str, index) -> ModelNotFoundError:
    """A clear message from the repository index: unknown model (with what is served) or not ready."""
    entries = index.get("models", []) if isinstance(index, dict) else (index or [])
    states = {e.get("name"): (e.get("state", ""), e.get("reason", "")) for e in entries}
    if name in states:
        state, reason = states[name]
        return ModelNotFoundError(f"model {name!r} on {url} is not ready (state {state or 'unknown'}"
                                  + (f": {reason}" if reason else "") + ")")
    served = ", ".join(sorted(n for n in states if n)) or "none"
    return ModelNotFoundError(f"model {name!r} is not served by {url} (models: {served})")


def server_error(err: BaseException, url: str, protocol: str, action: str) -> SSDClientError:
    """Translate tritonclient / socket / aiohttp errors into the client's exceptions."""
    where = f"Triton server at {url} ({protocol})"
    if isinstance(err, SSDClientError):
        return err
    if isinstance(err, InferenceServerException):
        status, message = str(err.status() or ""), err.message() or str(err)
        if "DEADLINE_EXCEEDED" in status:
            return ServerUnavailableError(f"{where} timed out while {action}")
        if "UNAVAILABLE" in status:
            return ServerUnavailableError(f"cannot reach the {where}: is it running? ({_one_line(message)})")
        return InferenceError(f"{where} failed while {action}: {_one_line(message)}")
    if isinstance(err, TimeoutError):
        return ServerUnavailableError(f"{where} timed out while {action}")
    if isinstance(err, OSError):  # connection refused/reset; aiohttp's connection errors are OSErrors too
        return ServerUnavailableError(f"cannot reach the {where}: is it running? ({_one_line(str(err))})")
    if type(err).__module__.startswith("aiohttp"):  # e.g. ServerDisconnectedError
        return ServerUnavailableError(f"lost the {where} while {action}: {type(err).__name__}")
    return InferenceError(f"{where} failed while {action}: {type(err).__name__}: {_one_line(str(err))}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe_images(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def build_request(tc, batch: np.ndarray, shm=None) -> tuple[list, list]:
    """tritonclient inputs/outputs for one padded [B, L] batch; in `shm` (a SharedMemorySlot) when given."""
    image = tc.InferInput(io.IMAGE, list(batch.shape), INPUT_DTYPES[io.IMAGE])
    binary = {"binary_data": True} if tc.__name__.startswith("tritonclient.http") else {}
    outputs = [tc.InferRequestedOutput(name, **binary) for name in OUTPUT_DTYPES]
    if shm is None:
        image.set_data_from_numpy(batch, **binary)
    else:
        image.set_shared_memory(*shm.write_input(batch))
        for output in outputs:
            output.set_shared_memory(*shm.output_location(output.name(), len(batch)))
    return [image], outputs


def parse_response(result, count: int, spec: ModelSpec, label_map: LabelMap, threshold: float = 0.0,
                   shm=None) -> list[list[Detection]]:
    """Per image of the request, its detections with score >= threshold, in the server's order."""
    arrays = {name: (shm.read_output(name, count) if shm is not None else result.as_numpy(name))
              for name in OUTPUT_DTYPES}
    names = label_map.names_by_id()
    detections = []
    for i in range(count):
        n = int(arrays[io.NUM_DETECTIONS][i].reshape(-1)[0])
        boxes = arrays[io.DETECTION_BOXES][i, :n].tolist()
        scores = arrays[io.DETECTION_SCORES][i, :n].tolist()
        classes = arrays[io.DETECTION_CLASSES][i, :n].tolist()
        detections.append([
            Detection(tuple(box), score, cid, names.get(cid, f"category {cid}"))
            for box, score, cid in zip(boxes, scores, classes) if score >= threshold
        ])
    return detections


def infer_kwargs(protocol: str, timeout: float) -> dict:
    """Per-call timeout: gRPC takes it on each call, HTTP at client construction."""
    return {"client_timeout": timeout} if protocol == "grpc" else {}


def json_kwargs(protocol: str) -> dict:
    return {"as_json": True} if protocol == "grpc" else {}
