"""The wire, shared by the sync and asyncio clients: URLs, the model check, request building, response
parsing, error translation and the retry policy. No I/O here; the clients make the calls.

Two ensembles speak it: SSD300's (boxes, scores, classes, count) and Mask R-CNN's, which adds each
detection's mask as COCO RLE and the image size; `check_model` tells them apart by their outputs."""

from __future__ import annotations

import http.client
import importlib
import random
from dataclasses import dataclass, field

import numpy as np
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from ssd_client.errors import (InferenceError, ModelMismatchError, ModelNotFoundError, ServerUnavailableError,
                               SSDClientError)
from ssd_common import io
from ssd_common.labels import LabelMap, LabelMapError
from ssd_common.masks import decode_mask

PROTOCOLS = ("http", "grpc")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
DEFAULT_TIMEOUT = 120.0  # seconds; a full batch of 64 takes a while on a CPU-only server
DEFAULT_RETRIES = 3
DEFAULT_RETRY_BACKOFF = 0.5  # seconds before the first retry; doubles for each further one
MAX_RETRY_BACKOFF = 10.0
REGISTERING_SHARED_MEMORY = "registering shared memory"  # the action whose refusal gets a hint

# Triton dtypes of the ensembles' tensors: one source, ssd_common.io. Both take the same input.
INPUT_DTYPES = io.ENSEMBLE_INPUT_DTYPES
OUTPUT_DTYPES = io.ENSEMBLE_OUTPUT_DTYPES  # SSD300's
MASK_OUTPUT_DTYPES = io.MASKRCNN_OUTPUT_DTYPES  # Mask R-CNN's: SSD300's, DETECTION_MASKS and IMAGE_SIZE


@dataclass(frozen=True)
class Detection:
    """One detected object; `box` is (x1, y1, x2, y2) in pixels of the original image. From Mask R-CNN,
    `mask` is its bool (height, width) mask at the image's size and `rle` the same mask as the server sent
    it, COCO RLE {"size": [h, w], "counts": str}; both None from SSD300. `mask` is None too where the
    client was told not to decode masks (`decode_masks=False`). Detections compare by their RLE."""

    box: tuple[float, float, float, float]
    score: float
    category_id: int
    category_name: str
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    rle: dict | None = field(default=None, repr=False, hash=False)  # a dict: hashing goes by the rest

    def to_dict(self) -> dict:
        """JSON-able: the mask as its COCO RLE (what `ssd-train predict` prints and the drawing reads)."""
        out = {"box": list(self.box), "score": self.score, "category_id": self.category_id,
               "category_name": self.category_name}
        if self.rle is not None:
            out["mask"] = self.rle
        return out


@dataclass(frozen=True)
class ModelSpec:
    """What the client learned about the served model at connect time."""

    name: str
    max_batch_size: int
    output_shapes: dict  # output name -> per-image shape (no batch dimension)
    masks: bool = False  # the Mask R-CNN ensemble (instance masks), not SSD300's

    @property
    def output_dtypes(self) -> dict[str, str]:
        """The outputs the client requests, with their Triton dtypes."""
        return MASK_OUTPUT_DTYPES if self.masks else OUTPUT_DTYPES

    def output_byte_sizes(self, batch_size: int) -> dict[str, int]:
        """Bytes of each output for `batch_size` images: fixed-size outputs only (not BYTES masks)."""
        sizes = {}
        for name, shape in self.output_shapes.items():
            itemsize = np.dtype(triton_to_np_dtype(self.output_dtypes[name])).itemsize
            sizes[name] = batch_size * int(np.prod(shape)) * itemsize
        return sizes


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


def make_client(tc, protocol: str, url: str, timeout: float, retry: "RetryPolicy"):
    """A tritonclient InferenceServerClient (sync or aio module `tc`) with the timeout where it goes."""
    if protocol == "grpc":
        return tc.InferenceServerClient(url, channel_args=grpc_channel_args(tc, retry))  # timeout: per call
    if tc.__name__.endswith(".aio"):
        return tc.InferenceServerClient(url, conn_timeout=timeout)
    return tc.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)


def grpc_channel_args(tc, retry: "RetryPolicy") -> list[tuple]:
    """tritonclient's channel options, and a reconnect pace that follows the retries. A gRPC channel that
    failed to connect waits (1 s, then 1.6 times longer each time, +-20%) before it connects again, and
    fails every call at once meanwhile: retries sooner than that would not reach the server."""
    keepalive = tc.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", tc.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", tc.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        # Shorter than the shortest wait before a retry (half the backoff, RetryPolicy.delay) even with
        # gRPC's jitter; gRPC waits at least 100 ms whatever it is told.
        ("grpc.initial_reconnect_backoff_ms", max(100, int(retry.backoff * 400))),
        ("grpc.max_reconnect_backoff_ms", max(100, int(MAX_RETRY_BACKOFF * 400))),
    ]


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
    """The served model must take our IMAGE input and give one ensemble's detection outputs: Mask R-CNN's
    when it has a DETECTION_MASKS output, else SSD300's."""
    inputs, outputs = tensor_specs(metadata.get("inputs")), tensor_specs(metadata.get("outputs"))
    masks = io.DETECTION_MASKS in outputs
    expected = MASK_OUTPUT_DTYPES if masks else OUTPUT_DTYPES
    if masks:
        wrong, batching = "not the Mask R-CNN ensemble", f"the Mask R-CNN ensemble {io.MASKRCNN_ENSEMBLE!r} does"
    else:  # it may have been meant as either ensemble (a Mask R-CNN step, say): name both
        wrong = f"neither the SSD300 ensemble ({io.ENSEMBLE!r}) nor the Mask R-CNN one ({io.MASKRCNN_ENSEMBLE!r})"
        batching = f"the SSD300 and Mask R-CNN ensembles ({io.ENSEMBLE!r}, {io.MASKRCNN_ENSEMBLE!r}) do"
    max_batch_size = int(config.get("max_batch_size", 0))
    if max_batch_size < 1:
        raise ModelMismatchError(f"model {name!r} does not batch (max_batch_size 0); {batching}")
    problems = _tensor_problems("input", inputs, INPUT_DTYPES) + _tensor_problems("output", outputs, expected)
    if set(inputs) != set(INPUT_DTYPES):
        problems.append(f"inputs are {sorted(inputs)}, expected {sorted(INPUT_DTYPES)}")
    if not problems:
        per_image = {n: shape[1:] for n, (_, shape) in outputs.items() if n in expected}
        problems = _shape_problems(per_image, masks)
    if problems:
        raise ModelMismatchError(f"model {name!r} is {wrong}: " + "; ".join(problems))
    return ModelSpec(name, max_batch_size, per_image, masks)


def _tensor_problems(kind: str, found: dict, expected: dict) -> list[str]:
    problems = []
    for tensor, dtype in expected.items():
        if tensor not in found:
            problems.append(f"no {kind} {tensor}")
        elif found[tensor][0] != dtype:
            problems.append(f"{kind} {tensor} is {found[tensor][0]}, expected {dtype}")
    return problems


def _shape_problems(per_image: dict, masks: bool = False) -> list[str]:
    """Shapes the parser relies on: boxes [N, 4], scores and classes [N], count [1], all fixed; with
    masks also masks [N] and the image size [2]."""
    boxes = per_image[io.DETECTION_BOXES]
    n = boxes[0] if len(boxes) == 2 else None
    want = {io.DETECTION_BOXES: (n, 4), io.DETECTION_SCORES: (n,), io.DETECTION_CLASSES: (n,),
            io.NUM_DETECTIONS: (1,)}
    if masks:
        want.update({io.DETECTION_MASKS: (n,), io.IMAGE_SIZE: (2,)})
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


BAD_INPUT_STATUSES = ("400", "StatusCode.INVALID_ARGUMENT")  # HTTP's and gRPC's InferenceServerException.status()


def server_error(err: BaseException, url: str, protocol: str, action: str, attempts: int = 1) -> SSDClientError:
    """Translate tritonclient / socket / aiohttp errors into the client's exceptions; `attempts` > 1 says
    the call was retried before giving up."""
    error = _translate(err, f"Triton server at {url} ({protocol})", action)
    return type(error)(f"{error} (gave up after {attempts} attempts)") if attempts > 1 else error


def _translate(err: BaseException, where: str, action: str) -> SSDClientError:
    if isinstance(err, SSDClientError):
        return err
    if isinstance(err, InferenceServerException):
        status, message = str(err.status() or ""), _one_line(err.message() or str(err))
        if restricted(err):
            what = ("shared memory (start it with `ssd-serve --allow-shared-memory`)"
                    if action == REGISTERING_SHARED_MEMORY else action)
            return SSDClientError(f"the {where} does not allow {what}: {message}")
        if "DEADLINE_EXCEEDED" in status:
            return ServerUnavailableError(f"{where} timed out while {action}")
        if "UNAVAILABLE" in status:  # gRPC's code for "cannot connect" too
            return ServerUnavailableError(f"cannot reach the {where}: is it running? ({message})")
        if status == "503":
            return ServerUnavailableError(f"the {where} is unavailable while {action}: {message}")
        if status in BAD_INPUT_STATUSES:  # the server works: it refused what it was sent
            return InferenceError(f"{where} refused the input while {action}: {message}")
        return InferenceError(f"{where} failed while {action}: {message}")
    if isinstance(err, TimeoutError):
        return ServerUnavailableError(f"{where} timed out while {action}")
    if isinstance(err, OSError):  # connection refused/reset; aiohttp's connection errors are OSErrors too
        cause = getattr(err, "os_error", err)  # aiohttp's wraps the socket's error in "Cannot connect to host ..."
        return ServerUnavailableError(f"cannot reach the {where}: is it running? ({_one_line(str(cause))})")
    if _dropped(err):
        return ServerUnavailableError(f"lost the {where} while {action}: it closed the connection "
                                      f"({type(err).__name__}: {_one_line(str(err))})")
    if isinstance(err, http.client.HTTPException) or type(err).__module__.startswith("aiohttp"):
        return ServerUnavailableError(f"cannot reach the {where}: it does not answer in HTTP, is that its gRPC "
                                      f"port? ({type(err).__name__}: {_one_line(str(err))})")
    return InferenceError(f"{where} failed while {action}: {type(err).__name__}: {_one_line(str(err))}")


def retryable(err: BaseException) -> bool:
    """Whether trying again can help: the server could not be reached, dropped the connection or said it is
    unavailable for now (gRPC UNAVAILABLE, HTTP 503). Not a rejected request (a bad image fails at once),
    a timeout (the next try would wait as long) or an API the server restricts."""
    if isinstance(err, InferenceServerException):
        return str(err.status()) in ("StatusCode.UNAVAILABLE", "503") and not restricted(err)
    if isinstance(err, TimeoutError):
        return False
    return isinstance(err, OSError) or _dropped(err)


def restricted(err: BaseException) -> bool:
    """Triton's answer to a call its --http-restricted-api / --grpc-restricted-protocol covers: "This API
    (protocol) is restricted, expecting header ...", HTTP 403 but gRPC UNAVAILABLE."""
    return isinstance(err, InferenceServerException) and "is restricted" in (err.message() or "")


def _dropped(err: BaseException) -> bool:
    """The peer closed the connection before its whole answer came. geventhttpclient (sync HTTP) raises
    HTTPConnectionClosed or an HTTPParseError about the early end; aiohttp raises ServerDisconnectedError,
    or ClientPayloadError for a cut body. Resets are OSErrors in both."""
    if type(err).__module__.startswith("aiohttp"):
        return type(err).__name__ in ("ServerDisconnectedError", "ClientPayloadError")
    return isinstance(err, http.client.HTTPException) and any(
        sign in str(err) for sign in ("closed", "EOF", "Incomplete"))


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff for the errors `retryable` accepts; `retries=0` turns
    them off. Requests are safe to send again: inference has no side effects, and a shared-memory request
    re-reads the same input region."""

    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_RETRY_BACKOFF

    def __post_init__(self):
        if not isinstance(self.retries, int) or self.retries < 0:
            raise SSDClientError(f"retries must be a whole number >= 0, got {self.retries}")
        if not self.backoff >= 0:
            raise SSDClientError(f"retry backoff must be >= 0 seconds, got {self.backoff}")

    def delay(self, retry: int) -> float:
        """Seconds before retry number `retry` (0 for the first): the backoff doubled each time up to
        MAX_RETRY_BACKOFF, then a random part of its upper half, so that clients that failed together do
        not all come back together."""
        ceiling = min(MAX_RETRY_BACKOFF, self.backoff * 2 ** retry)
        return random.uniform(ceiling / 2, ceiling)

    def delay_after(self, err: BaseException, retry: int) -> float | None:
        """After failed try number `retry` (0 for the first try): seconds to wait before the next one, or
        None when the error is final."""
        return self.delay(retry) if retry < self.retries and retryable(err) else None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe_images(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_shared_memory(spec: ModelSpec) -> None:
    """Shared-memory output regions are laid out ahead for fixed-size outputs; Mask R-CNN's masks (BYTES,
    as long as each mask's RLE) have no size known before the answer."""
    if spec.masks:
        raise SSDClientError(f"shared memory is not available with model {spec.name!r}: its masks "
                             f"({io.DETECTION_MASKS}, BYTES) have no fixed size; connect without it")


def build_request(tc, batch: np.ndarray, spec: ModelSpec, shm=None) -> tuple[list, list]:
    """tritonclient inputs/outputs for one padded [B, L] batch, asking for the outputs of `spec`'s
    ensemble; in `shm` (a SharedMemorySlot) when given."""
    image = tc.InferInput(io.IMAGE, list(batch.shape), INPUT_DTYPES[io.IMAGE])
    binary = {"binary_data": True} if tc.__name__.startswith("tritonclient.http") else {}
    outputs = [tc.InferRequestedOutput(name, **binary) for name in spec.output_dtypes]
    if shm is None:
        image.set_data_from_numpy(batch, **binary)
    else:
        image.set_shared_memory(*shm.write_input(batch))
        for output in outputs:
            output.set_shared_memory(*shm.output_location(output.name(), len(batch)))
    return [image], outputs


def parse_response(result, count: int, spec: ModelSpec, label_map: LabelMap, threshold: float = 0.0,
                   shm=None, decode_masks: bool = True, image_names=None) -> list[list[Detection]]:
    """Per image of the request, its detections with score >= threshold, in the server's order. From
    Mask R-CNN each kept detection carries its RLE and, with `decode_masks`, the decoded mask (checked:
    a malformed RLE is an InferenceError naming the image, `image_names[i]` where given)."""
    arrays = {name: (shm.read_output(name, count) if shm is not None else result.as_numpy(name))
              for name in spec.output_dtypes}
    names = label_map.names_by_id()
    detections = []
    for i in range(count):
        n = int(arrays[io.NUM_DETECTIONS][i].reshape(-1)[0])
        boxes = arrays[io.DETECTION_BOXES][i, :n].tolist()
        scores = arrays[io.DETECTION_SCORES][i, :n].tolist()
        classes = arrays[io.DETECTION_CLASSES][i, :n].tolist()
        found = []
        for k, (box, score, cid) in enumerate(zip(boxes, scores, classes)):
            if score < threshold:
                continue
            mask = rle = None
            if spec.masks:
                image = image_names[i] if image_names else f"image {i} of the request"
                size = [int(v) for v in arrays[io.IMAGE_SIZE][i]]
                rle, mask = _mask(arrays[io.DETECTION_MASKS][i, k], size, decode_masks, f"{image}, detection {k}")
            found.append(Detection(tuple(box), score, cid, names.get(cid, f"category {cid}"), mask, rle))
        detections.append(found)
    return detections


def _mask(counts, size: list[int], decode: bool, where: str) -> tuple[dict, np.ndarray | None]:
    """(COCO RLE with str counts, its bool mask or None) from one DETECTION_MASKS element (bytes)."""
    try:
        rle = {"size": size, "counts": bytes(counts).decode("ascii")}
        return rle, decode_mask(rle) if decode else None
    except UnicodeDecodeError:
        problem = "malformed RLE: counts are not ASCII"
    except (TypeError, ValueError) as err:
        problem = _one_line(str(err))
    raise InferenceError(f"the server sent a bad mask for {where}: {problem}")


def infer_kwargs(protocol: str, timeout: float) -> dict:
    """Per-call timeout: gRPC takes it on each call, HTTP at client construction."""
    return {"client_timeout": timeout} if protocol == "grpc" else {}


def json_kwargs(protocol: str) -> dict:
    return {"as_json": True} if protocol == "grpc" else {}
