"""`SSDClient`: detections from the SSD300 or Mask R-CNN ensemble on a Triton server, over HTTP or gRPC,
synchronously."""

from __future__ import annotations

import itertools
import time

from ssd_client import protocol as wire
from ssd_client.errors import ServerUnavailableError
from ssd_client.images import as_image_list, chunks, encode_images, pad_batch
from ssd_client.shm import SharedMemorySlot, unique_prefix
from ssd_common import io


class SSDClient:
    """A connection to a served ensemble: SSD300's (`model="ssd300"`, the default) or Mask R-CNN's
    (`model="maskrcnn"`, whose detections also carry instance masks).

    Connecting checks that the server is live and that `model` is ready with one ensemble's inputs and
    outputs; any problem raises an `SSDClientError` subclass with a one-line message.

    url: "host:port" (default localhost and the protocol's default port, 8000 HTTP / 8001 gRPC).
    timeout: seconds for connecting and for each request.
    label_map: category names for the ids the server returns: None (COCO), a `labels.json` path (what
        `ssd-train export` writes into the postprocess model's folder) or a `LabelMap`.
    batch_size: images per request, at most (and by default) the model's max batch size.
    shared_memory: pass images and detections through system shared memory (server on this host; it must
        allow it: `ssd-serve --allow-shared-memory`). SSD300 only: Mask R-CNN's masks have no fixed size.
    decode_masks: give each Mask R-CNN detection its decoded bool `mask` as well as its `rle`; False keeps
        the RLE only (less memory and time when the masks go on to COCO evaluation or a file).
    retries: how many times a call is tried again when the server cannot be reached, drops the connection
        or says it is unavailable (never for a rejected request such as a bad image); 0 turns retries off.
    retry_backoff: seconds before the first retry, doubled for each further one (with jitter, capped).
    """

    def __init__(self, url: str | None = None, protocol: str = "http", model: str = io.ENSEMBLE,
                 timeout: float = wire.DEFAULT_TIMEOUT, label_map=None, batch_size: int | None = None,
                 shared_memory: bool = False, retries: int = wire.DEFAULT_RETRIES,
                 retry_backoff: float = wire.DEFAULT_RETRY_BACKOFF, decode_masks: bool = True):
        self.protocol = wire.check_protocol(protocol)
        self.url = wire.normalise_url(url, self.protocol)
        self.model = model
        self.timeout = float(timeout)
        self.retry = wire.RetryPolicy(retries, retry_backoff)
        self.label_map = wire.resolve_label_map(label_map)
        self.decode_masks = decode_masks
        self._tc = wire.tritonclient_module(self.protocol)
        self._call_kwargs = wire.infer_kwargs(self.protocol, self.timeout)
        self._shm: SharedMemorySlot | None = None
        self._client = self._call("connecting", wire.make_client, self._tc, self.protocol, self.url, self.timeout,
                                  self.retry)
        try:
            self.spec = self._connect()
            self.batch_size = wire.request_batch_size(batch_size, self.spec)
            if shared_memory:
                self._shm = SharedMemorySlot(self.spec, unique_prefix())
                self._call(wire.REGISTERING_SHARED_MEMORY, self._register, self._shm.output)
        except BaseException:
            self.close()
            raise

    def detect(self, images, threshold: float = 0.0) -> list[list[wire.Detection]]:
        """Detections per image, in input order (a list per image, also when one image is given).
        Images: file paths, encoded bytes, HxWx3 uint8 RGB arrays (a BxHxWx3 array is B images) or PIL
        images; one or a sequence. Requests hold at most `batch_size` images. An image that cannot be read or
        that the server rejects fails the whole call (`ssd-client detect` then asks again image by image)."""
        items = as_image_list(images)
        results = []
        for start, chunk in chunks(items, self.batch_size):
            results.extend(self._infer(encode_images(chunk, start), threshold))
        return results

    def statistics(self) -> dict:
        """The server's inference statistics for the model (request and batch counts)."""
        return self._call("reading statistics", self._client.get_inference_statistics, self.model,
                          **wire.json_kwargs(self.protocol), **self._call_kwargs)

    def close(self) -> None:
        if self._shm is not None:
            for region in self._shm.regions():
                try:
                    self._client.unregister_system_shared_memory(region.name, **self._call_kwargs)
                except Exception:  # the server may be gone; the local regions go anyway
                    pass
            self._shm.close()
            self._shm = None
        self._client.close()

    def __enter__(self) -> "SSDClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connect(self) -> wire.ModelSpec:
        if not self._call("checking liveness", self._client.is_server_live, **self._call_kwargs):
            raise ServerUnavailableError(f"Triton server at {self.url} ({self.protocol}) is not live")
        if not self._call("checking the model", self._client.is_model_ready, self.model, **self._call_kwargs):
            index = self._call("listing models", self._client.get_model_repository_index,
                               **wire.json_kwargs(self.protocol), **self._call_kwargs)
            raise wire.model_not_found(self.model, self.url, index)
        json_kwargs = {**wire.json_kwargs(self.protocol), **self._call_kwargs}
        metadata = self._call("reading model metadata", self._client.get_model_metadata, self.model, **json_kwargs)
        config = self._call("reading model config", self._client.get_model_config, self.model, **json_kwargs)
        return wire.check_model(self.model, metadata, wire.as_json(config))

    def _infer(self, encoded, threshold: float) -> list[list[wire.Detection]]:
        batch = pad_batch(encoded)
        if self._shm is not None and self._shm.input_too_small(batch.nbytes):
            if self._shm.input is not None:
                self._call("unregistering shared memory", self._client.unregister_system_shared_memory,
                           self._shm.input.name, **self._call_kwargs)
            self._shm.grow_input(batch.nbytes)
            self._call(wire.REGISTERING_SHARED_MEMORY, self._register, self._shm.input)
        inputs, outputs = wire.build_request(self._tc, batch, self.spec, self._shm)
        names = [e.name for e in encoded]
        result = self._call(f"detecting in {wire.describe_images(names)}", self._client.infer, self.model, inputs,
                            outputs=outputs, **self._call_kwargs)
        return wire.parse_response(result, len(encoded), self.spec, self.label_map, threshold, self._shm,
                                   self.decode_masks, names)

    def _register(self, region) -> None:
        # Unregistering first (a no-op for an unknown name) makes a retry safe when the server registered
        # the region but the answer was lost.
        self._client.unregister_system_shared_memory(region.name, **self._call_kwargs)
        self._client.register_system_shared_memory(*region.registration, **self._call_kwargs)

    def _call(self, action: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), tried again as `self.retry` says; failures become the client's errors."""
        for retry in itertools.count():
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                delay = self.retry.delay_after(err, retry)
                if delay is None:
                    raise wire.server_error(err, self.url, self.protocol, action, retry + 1) from None
            time.sleep(delay)
