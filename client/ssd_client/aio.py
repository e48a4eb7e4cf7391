"""`AsyncSSDClient`: the asyncio twin of `SSDClient`, with up to `concurrency` requests in flight.

Same checks, requests and results as the sync client (both build and parse through `ssd_client.protocol`):

    async with AsyncSSDClient("localhost:8001", protocol="grpc", concurrency=8) as client:
        detections = await client.detect(paths)
"""

from __future__ import annotations

import asyncio
import itertools

from ssd_client import protocol as wire
from ssd_client.errors import ServerUnavailableError, SSDClientError
from ssd_client.images import as_image_list, chunks, encode_images, pad_batch
from ssd_client.shm import SharedMemorySlot, unique_prefix
from ssd_common import io

DEFAULT_CONCURRENCY = 8


class AsyncSSDClient:
    """See `ssd_client.SSDClient` for the arguments; `concurrency` bounds the requests in flight.
    Connects on `open()`, `async with` or the first `detect()`."""

    def __init__(self, url: str | None = None, protocol: str = "http", model: str = io.ENSEMBLE,
                 timeout: float = wire.DEFAULT_TIMEOUT, label_map=None, batch_size: int | None = None,
                 concurrency: int = DEFAULT_CONCURRENCY, shared_memory: bool = False,
                 retries: int = wire.DEFAULT_RETRIES, retry_backoff: float = wire.DEFAULT_RETRY_BACKOFF,
                 decode_masks: bool = True):
        self.protocol = wire.check_protocol(protocol)
        self.url = wire.normalise_url(url, self.protocol)
        self.model = model
        self.timeout = float(timeout)
        self.retry = wire.RetryPolicy(retries, retry_backoff)
        self.label_map = wire.resolve_label_map(label_map)
        if int(concurrency) < 1:
            raise SSDClientError(f"concurrency must be at least 1, got {concurrency}")
        self.concurrency = int(concurrency)
        self.shared_memory = shared_memory
        self.decode_masks = decode_masks
        self._requested_batch_size = batch_size
        self._tc = wire.tritonclient_module(self.protocol, asyncio=True)
        self._call_kwargs = wire.infer_kwargs(self.protocol, self.timeout)
        self._client = None
        self._open_lock = asyncio.Lock()
        # One slot per allowed request in flight: taking one from the queue is the semaphore, and with
        # shared memory each slot also owns that request's regions (None without shared memory).
        self._slots: asyncio.Queue | None = None
        self._shm_slots: list[SharedMemorySlot] = []
        self.spec: wire.ModelSpec | None = None
        self.batch_size: int | None = None

    async def open(self) -> "AsyncSSDClient":
        async with self._open_lock:
            if self._client is None:
                self._client = await self._call("connecting", _construct, self._tc, self.protocol, self.url,
                                                self.timeout, self.retry)
                try:
                    await self._setup()
                except BaseException:
                    await self.close()
                    raise
        return self

    async def detect(self, images, threshold: float = 0.0) -> list[list[wire.Detection]]:
        """Detections for each image, in input order; requests of at most `batch_size` images run
        concurrently (at most `concurrency` at a time)."""
        await self.open()
        items = as_image_list(images)
        parts = await gather_or_cancel(self._detect_chunk(start, chunk, threshold)
                                       for start, chunk in chunks(items, self.batch_size))
        return [detections for part in parts for detections in part]

    async def statistics(self) -> dict:
        await self.open()
        return await self._call("reading statistics", self._client.get_inference_statistics, self.model,
                                **wire.json_kwargs(self.protocol), **self._call_kwargs)

    async def close(self) -> None:
        for slot in self._shm_slots:
            for region in slot.regions():
                try:
                    await self._client.unregister_system_shared_memory(region.name, **self._call_kwargs)
                except Exception:  # the server may be gone; the local regions go anyway
                    pass
            slot.close()
        self._shm_slots = []
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> "AsyncSSDClient":
        return await self.open()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _setup(self) -> None:
        self.spec = await self._connect()
        self.batch_size = wire.request_batch_size(self._requested_batch_size, self.spec)
        self._slots = asyncio.Queue()
        prefix = unique_prefix()
        for i in range(self.concurrency):
            slot = None
            if self.shared_memory:
                slot = SharedMemorySlot(self.spec, f"{prefix}_{i}")
                self._shm_slots.append(slot)
                await self._call(wire.REGISTERING_SHARED_MEMORY, self._register, slot.output)
            self._slots.put_nowait(slot)

    async def _connect(self) -> wire.ModelSpec:
        if not await self._call("checking liveness", self._client.is_server_live, **self._call_kwargs):
            raise ServerUnavailableError(f"Triton server at {self.url} ({self.protocol}) is not live")
        if not await self._call("checking the model", self._client.is_model_ready, self.model, **self._call_kwargs):
            index = await self._call("listing models", self._client.get_model_repository_index,
                                     **wire.json_kwargs(self.protocol), **self._call_kwargs)
            raise wire.model_not_found(self.model, self.url, index)
        json_kwargs = {**wire.json_kwargs(self.protocol), **self._call_kwargs}
        metadata = await self._call("reading model metadata", self._client.get_model_metadata, self.model,
                                    **json_kwargs)
        config = await self._call("reading model config", self._client.get_model_config, self.model, **json_kwargs)
        return wire.check_model(self.model, metadata, wire.as_json(config))

    async def _detect_chunk(self, start: int, chunk, threshold: float) -> list[list[wire.Detection]]:
        slot = await self._slots.get()
        try:
            # Reading files and encoding arrays is blocking work: keep it off the event loop.
            encoded = await asyncio.to_thread(encode_images, chunk, start)
            return await self._infer(encoded, threshold, slot)
        finally:
            self._slots.put_nowait(slot)

    async def _infer(self, encoded, threshold: float, slot: SharedMemorySlot | None) -> list[list[wire.Detection]]:
        batch = pad_batch(encoded)
        if slot is not None and slot.input_too_small(batch.nbytes):
            if slot.input is not None:
                await self._call("unregistering shared memory", self._client.unregister_system_shared_memory,
                                 slot.input.name, **self._call_kwargs)
            slot.grow_input(batch.nbytes)
            await self._call(wire.REGISTERING_SHARED_MEMORY, self._register, slot.input)
        inputs, outputs = wire.build_request(self._tc, batch, self.spec, slot)
        names = [e.name for e in encoded]
        result = await self._call(f"detecting in {wire.describe_images(names)}", self._client.infer, self.model,
                                  inputs, outputs=outputs, **self._call_kwargs)
        return wire.parse_response(result, len(encoded), self.spec, self.label_map, threshold, slot,
                                   self.decode_masks, names)

    async def _register(self, region) -> None:
        # Unregistering first (a no-op for an unknown name) makes a retry safe when the server registered
        # the region but the answer was lost.
        await self._client.unregister_system_shared_memory(region.name, **self._call_kwargs)
        await self._client.register_system_shared_memory(*region.registration, **self._call_kwargs)

    async def _call(self, action: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), awaited and tried again as `self.retry` says (like `SSDClient._call`)."""
        for retry in itertools.count():
            try:
                result = fn(*args, **kwargs)
                return await result if asyncio.iscoroutine(result) else result
            except Exception as err:
                delay = self.retry.delay_after(err, retry)
                if delay is None:
                    raise wire.server_error(err, self.url, self.protocol, action, retry + 1) from None
            await asyncio.sleep(delay)


async def gather_or_cancel(coroutines) -> list:
    """Like `asyncio.gather`, but the first failure cancels the rest instead of leaving them running."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _construct(tc, protocol: str, url: str, timeout: float, retry: wire.RetryPolicy):
    """Build the aio client inside the running loop (aiohttp and grpc.aio bind to it)."""
    return wire.make_client(tc, protocol, url, timeout, retry)
