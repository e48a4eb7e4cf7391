"""Client-side balancing over several servers serving the same model, for setups without a load
balancer: each request goes to the next server in turn, and one that cannot be reached (after its own
retries) is skipped for that request, so the others answer it.

    with BalancedSSDClient(["gpu1:8001", "gpu2:8001"], protocol="grpc") as client:
        detections = client.detect(paths)

`open_client(urls, ...)` / `open_async_client(urls, ...)` give a plain client for one URL and a
balanced one for several; `ssd-client --url a:8001,b:8001` uses them.
"""

from __future__ import annotations

import asyncio
import itertools
import threading

from ssd_client.aio import AsyncSSDClient, gather_or_cancel
from ssd_client.client import SSDClient
from ssd_client.errors import ServerUnavailableError, SSDClientError
from ssd_client.images import as_image_list, chunks


def split_urls(url) -> list[str | None]:
    """None, "host:port", "a:1,b:2" or a sequence of them -> a list of URLs (None: the default one)."""
    if url is None:
        return [None]
    parts = [url] if isinstance(url, str) else list(url)
    urls = [u.strip() for part in parts for u in str(part).split(",") if u.strip()]
    if not urls:
        raise SSDClientError("no server URL given")
    return urls


class _Rotation:
    """Server indices to try for the next request: round robin, then the others in order."""

    def __init__(self, count: int):
        self.count = count
        self._next = itertools.count()
        self._lock = threading.Lock()

    def order(self) -> list[int]:
        with self._lock:
            first = next(self._next) % self.count
        return [(first + k) % self.count for k in range(self.count)]


def _common_batch_size(clients) -> int:
    """Requests must fit every server: the smallest of their batch sizes."""
    return min(client.batch_size for client in clients)


class BalancedSSDClient:
    """`SSDClient` over several servers (arguments as SSDClient's, `urls` a list or "a:1,b:2"). Every
    server must be reachable and serve the model when connecting."""

    def __init__(self, urls, **options):
        self.urls = split_urls(urls)
        self.clients: list[SSDClient] = []
        try:
            for url in self.urls:
                self.clients.append(SSDClient(url, **options))
        except BaseException:
            self.close()
            raise
        self.url = ",".join(client.url for client in self.clients)
        self.spec = self.clients[0].spec  # the servers serve the same model
        self.batch_size = _common_batch_size(self.clients)
        self._rotation = _Rotation(len(self.clients))

    def detect(self, images, threshold: float = 0.0):
        results = []
        for _, chunk in chunks(as_image_list(images), self.batch_size):
            results.extend(self._detect_chunk(chunk, threshold))
        return results

    def _detect_chunk(self, chunk, threshold: float):
        for attempt, index in enumerate(self._rotation.order()):
            try:
                return self.clients[index].detect(chunk, threshold)
            except ServerUnavailableError:
                if attempt == len(self.clients) - 1:
                    raise

    def statistics(self) -> dict[str, dict]:
        """Each server's inference statistics for the model, by URL."""
        return {client.url: client.statistics() for client in self.clients}

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def __enter__(self) -> "BalancedSSDClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BalancedAsyncSSDClient:
    """`AsyncSSDClient` over several servers: up to `concurrency` requests in flight per server."""

    def __init__(self, urls, **options):
        self.urls = split_urls(urls)
        self.clients = [AsyncSSDClient(url, **options) for url in self.urls]
        self.url = ",".join(client.url for client in self.clients)
        self.spec = None
        self.batch_size: int | None = None
        self._rotation = _Rotation(len(self.clients))

    async def open(self) -> "BalancedAsyncSSDClient":
        try:
            await asyncio.gather(*(client.open() for client in self.clients))
        except BaseException:
            await self.close()
            raise
        self.spec = self.clients[0].spec  # the servers serve the same model
        self.batch_size = _common_batch_size(self.clients)
        return self

    async def detect(self, images, threshold: float = 0.0):
        if self.batch_size is None:
            await self.open()
        parts = await gather_or_cancel(self._detect_chunk(chunk, threshold)
                                       for _, chunk in chunks(as_image_list(images), self.batch_size))
        return [detections for part in parts for detections in part]

    async def _detect_chunk(self, chunk, threshold: float):
        for attempt, index in enumerate(self._rotation.order()):
            try:
                return await self.clients[index].detect(chunk, threshold)
            except ServerUnavailableError:
                if attempt == len(self.clients) - 1:
                    raise

    async def statistics(self) -> dict[str, dict]:
        return {client.url: await client.statistics() for client in self.clients}

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients), return_exceptions=True)

    async def __aenter__(self) -> "BalancedAsyncSSDClient":
        return await self.open()

    async def __aexit__(self, *exc) -> None:
        await self.close()


def open_client(url=None, **options):
    """SSDClient for one URL, BalancedSSDClient for several ("a:1,b:2" or a list)."""
    urls = split_urls(url)
    return SSDClient(urls[0], **options) if len(urls) == 1 else BalancedSSDClient(urls, **options)


def open_async_client(url=None, **options):
    """AsyncSSDClient for one URL, BalancedAsyncSSDClient for several."""
    urls = split_urls(url)
    return AsyncSSDClient(urls[0], **options) if len(urls) == 1 else BalancedAsyncSSDClient(urls, **options)
