"""System shared memory for a server on the same host: the padded image batch and the detections
travel through /dev/shm instead of the socket. One `SharedMemorySlot` serves one in-flight request;
the clients (sync or asyncio) register its regions with the server, this module owns them locally.

The regions are POSIX shared-memory objects made with the standard library: Triton opens them by key
(`shm_open`) just as it opens those of `tritonclient.utils.shared_memory`, whose 2.51 module cannot be
imported here (it needs `pkg_resources`, gone from setuptools >= 81).
"""

from __future__ import annotations

import os
import uuid
import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np
from tritonclient.utils import triton_to_np_dtype

from ssd_client.errors import SSDClientError
from ssd_client.protocol import ModelSpec, check_shared_memory

MIN_INPUT_BYTES = 1 << 20


@dataclass
class Region:
    name: str  # the name the server knows it by
    key: str  # the shared-memory object, as the server opens it
    byte_size: int
    memory: shared_memory.SharedMemory

    @property
    def registration(self) -> tuple[str, str, int]:
        """Arguments of `register_system_shared_memory`."""
        return self.name, self.key, self.byte_size


def unique_prefix() -> str:
    return f"ssd_client_{os.getpid()}_{uuid.uuid4().hex[:8]}"


class SharedMemorySlot:
    """Input and output regions for one request. The output region is sized for the server's max batch
    once; the input region grows (to the next power of two) when a batch of images does not fit.
    Fixed-size outputs only: a model with masks is refused (SSDClientError) before any region is made."""

    def __init__(self, spec: ModelSpec, prefix: str):
        check_shared_memory(spec)
        self.spec = spec
        self.prefix = prefix
        self.input: Region | None = None
        # Each output gets a fixed stretch sized for a full batch; a smaller batch uses its beginning.
        sizes = spec.output_byte_sizes(spec.max_batch_size)
        self._offsets, offset = {}, 0
        for name in spec.output_dtypes:
            self._offsets[name] = offset
            offset += sizes[name]
        self._live: list = []  # every live region's memory, released by close() or, failing that, at exit
        weakref.finalize(self, _release_all, self._live)
        self.output = self._create(f"{prefix}_output", offset)

    def input_too_small(self, byte_size: int) -> bool:
        return self.input is None or self.input.byte_size < byte_size

    def grow_input(self, byte_size: int) -> Region:
        """Replace the input region by one of at least `byte_size` bytes. Unregister the old region
        from the server before and register the new one after."""
        size = max(MIN_INPUT_BYTES, 1 << (int(byte_size) - 1).bit_length())
        if self.input is not None:
            self._destroy(self.input)
        self.input = self._create(f"{self.prefix}_input", size)
        return self.input

    def regions(self) -> list[Region]:
        return [r for r in (self.input, self.output) if r is not None]

    def write_input(self, batch: np.ndarray) -> tuple[str, int]:
        """Copy the batch in; returns (region name, byte size) for `InferInput.set_shared_memory`."""
        if self.input_too_small(batch.nbytes):
            raise SSDClientError("internal: shared-memory input region not grown before writing")
        self.input.memory.buf[: batch.nbytes] = np.ascontiguousarray(batch).data.cast("B")
        return self.input.name, batch.nbytes

    def output_location(self, name: str, batch_size: int) -> tuple[str, int, int]:
        """(region name, byte size, offset) for `InferRequestedOutput.set_shared_memory`."""
        return self.output.name, self.spec.output_byte_sizes(batch_size)[name], self._offsets[name]

    def read_output(self, name: str, batch_size: int) -> np.ndarray:
        """A copy of one output (the region is reused by the next request)."""
        shape = (batch_size, *self.spec.output_shapes[name])
        dtype = np.dtype(triton_to_np_dtype(self.spec.output_dtypes[name]))
        view = np.frombuffer(self.output.memory.buf, dtype, int(np.prod(shape)), self._offsets[name])
        return view.reshape(shape).copy()

    def close(self) -> None:
        for region in self.regions():
            self._destroy(region)
        self.input = self.output = None

    def _create(self, name: str, byte_size: int) -> Region:
        try:
            memory = shared_memory.SharedMemory(name=name, create=True, size=byte_size)
        except OSError as err:
            raise SSDClientError(f"cannot create shared memory {name} ({byte_size} bytes): {err}") from None
        self._live.append(memory)
        return Region(name, "/" + name, byte_size, memory)

    def _destroy(self, region: Region) -> None:
        if region.memory in self._live:
            self._live.remove(region.memory)
            _release(region.memory)


def _release(memory: shared_memory.SharedMemory) -> None:
    memory.close()
    memory.unlink()


def _release_all(live: list) -> None:
    while live:
        _release(live.pop())
