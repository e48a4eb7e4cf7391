#!/usr/bin/env python3
"""Soak a served ensemble (SSD300's or, with `--model maskrcnn`, Mask R-CNN's) with hostile traffic and
report what it did to the server.

C clients (threads, each its own tritonclient connection) send R requests each: real photos, with
corrupt images (truncated or garbage) and oversized ones (a 20000 x 20000 JPEG of 4.7 MB, 1.2 GB
decoded) mixed in. Every answer is classified:

    answered             good image, detections came back
    rejected             bad image, refused as bad input (HTTP 400 / gRPC INVALID_ARGUMENT)
    collateral failures  good image that failed: what a bad neighbour must never cause
    bad answered         bad image that got detections: a check that let it through

and the report adds latency (p50/p99 of good requests), throughput, and the server's resident memory
(the server process and its python stubs) after warm-up, at the end and at its peak. Exit code 1
when any request went otherwise than it should (a collateral failure, a bad answer, or a bad image that
failed otherwise than as bad input: a server fault, a lost connection), with a last line saying so; 2
when the server cannot be reached, does not serve the model or fails good requests during warm-up.

    python tools/soak.py --url 127.0.0.1:8000 --clients 8 --requests 50
    python tools/soak.py --url 127.0.0.1:8001 --protocol grpc --corrupt-every 10 --oversized-every 25
    python tools/soak.py --url 127.0.0.1:8000 --model maskrcnn --clients 4 --requests 20

Memory is read from /proc: of `--server-pid` (and its descendants), else of the local process
listening on the URL's port; it is left out for remote servers.
"""

from __future__ import annotations

import argparse
import io as bytes_io
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssd_common import io  # the client distribution's names: the tool needs only ssd300-client

BAD_INPUT = ("400", "StatusCode.INVALID_ARGUMENT")


# ----------------------------------------------------------------------------------------------
# Server memory from /proc


def listening_sockets(port: int) -> list[tuple[str, str]]:
    """(address, socket inode) of each local TCP socket listening on `port`, from /proc/net/tcp*."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                text = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
                found.append((text.removeprefix("::ffff:"), fields[9]))  # IPv4-mapped IPv6 as IPv4
    return found


def listening_pid(port: int) -> int | None:
    """The pid of the local process listening on TCP `port`, if this user can see it."""
    inodes = {inode for _, inode in listening_sockets(port)}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(fd_dir.parent.name)
        except OSError:
            continue
    return None


def _parents() -> dict[int, int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(text.rsplit(")", 1)[1].split()[1])
    return parents


def process_tree(pid: int) -> set[int]:
    """`pid` and all its descendants."""
    parents = _parents()
    tree, frontier = {pid}, {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    return tree


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (0 once they are gone)."""
    total = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


class PeakMemory:
    """Samples `tree_rss(pid)` in a thread until stopped; `.peak` is the largest sample."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.peak = tree_rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))


# ----------------------------------------------------------------------------------------------
# Traffic


def photos() -> list[bytes]:
    """Real photos (scikit-image's), JPEG and PNG of several sizes."""
    import skimage.data
    from PIL import Image

    def encode(array, image_format):
        buffer = bytes_io.BytesIO()
        Image.fromarray(array).save(buffer, format=image_format)
        return buffer.getvalue()

    data_dir = Path(skimage.data.__file__).parent
    return [(data_dir / "rocket.jpg").read_bytes(), (data_dir / "astronaut.png").read_bytes(),
            encode(skimage.data.chelsea(), "JPEG"), encode(skimage.data.coffee(), "PNG")]


def corrupt_images(good: bytes) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [good[: len(good) // 2],  # truncated
            b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),  # garbage
            b"this is not an image"]


def oversized_image() -> bytes:
    """4.7 MB of JPEG, 20000 x 20000 flat grey pixels: a decompression bomb."""
    from PIL import Image

    buffer = bytes_io.BytesIO()
    Image.new("L", (20000, 20000), 128).save(buffer, format="JPEG")
    return buffer.getvalue()


@dataclass
class Tally:
    answered: int = 0
    rejected: int = 0
    collateral: int = 0
    bad_answered: int = 0
    bad_failed_otherwise: int = 0  # a bad image refused, but not as bad input (a server fault)
    latencies: list = field(default_factory=list)  # seconds, good requests
    errors: dict = field(default_factory=dict)  # first line -> count, of unexpected failures
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note_error(self, message: str) -> None:
        line = " ".join(message.split())[:160]
        self.errors[line] = self.errors.get(line, 0) + 1


def _client(protocol: str, url: str):
    if protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    return tc, tc.InferenceServerClient(url, **({"network_timeout": 600.0, "connection_timeout": 60.0}
                                                 if protocol == "http" else {}))


def _send(tc, client, model: str, image: bytes):
    # both ensembles take the same input (their first step is the same image check)
    tensor = tc.InferInput(io.IMAGE, [1, len(image)], io.ENSEMBLE_INPUT_DTYPES[io.IMAGE])
    tensor.set_data_from_numpy(np.frombuffer(image, np.uint8)[None])
    return client.infer(model, [tensor])


def run_client(protocol: str, url: str, model: str, schedule: list[tuple[str, bytes]], tally: Tally) -> None:
    from tritonclient.utils import InferenceServerException

    tc, client = _client(protocol, url)
    try:
        for kind, image in schedule:
            start = time.perf_counter()
            try:
                _send(tc, client, model, image)
                failure = None
            except InferenceServerException as err:
                failure = err
            except Exception as err:  # connection-level trouble counts against the server too
                failure = err
            elapsed = time.perf_counter() - start
            with tally.lock:
                if kind == "good":
                    if failure is None:
                        tally.answered += 1
                        tally.latencies.append(elapsed)
                    else:
                        tally.collateral += 1
                        tally.note_error(str(failure))
                elif failure is None:
                    tally.bad_answered += 1
                elif str(getattr(failure, "status", lambda: "")()) in BAD_INPUT:
                    tally.rejected += 1
                else:
                    tally.bad_failed_otherwise += 1
                    tally.note_error(str(failure))
    finally:
        client.close()


def schedules(clients: int, requests: int, corrupt_every: int, oversized_every: int) -> list[list]:
    """Per client, its requests: request n (counted over all clients) is oversized when n is a
    multiple of `oversized_every`, else corrupt when a multiple of `corrupt_every`, else a photo."""
    good = photos()
    corrupt = corrupt_images(good[0])
    oversized = oversized_image() if oversized_every else b""
    plans = [[] for _ in range(clients)]
    for n in range(1, clients * requests + 1):
        if oversized_every and n % oversized_every == 0:
            item = ("oversized", oversized)
        elif corrupt_every and n % corrupt_every == 0:
            item = ("corrupt", corrupt[n % len(corrupt)])
        else:
            item = ("good", good[n % len(good)])
        plans[(n - 1) % clients].append(item)
    return plans


def run_phase(protocol: str, url: str, model: str, plans: list[list], tally: Tally) -> float:
    threads = [threading.Thread(target=run_client, args=(protocol, url, model, plan, tally)) for plan in plans]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Report


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def every(n: int) -> str:
    """"every 3rd request", "every request", "no request" (n = 0)."""
    if n == 0:
        return "no request"
    if n == 1:
        return "every request"
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"every {n}{suffix} request"


def summarise(args, tally: Tally, seconds: float, memory: dict) -> dict:
    good = tally.answered + tally.collateral
    bad = tally.rejected + tally.bad_answered + tally.bad_failed_otherwise
    latencies = np.array(tally.latencies) * 1000 if tally.latencies else np.zeros(1)
    return {
        "url": args.url, "protocol": args.protocol, "model": args.model, "clients": args.clients,
        "requests_per_client": args.requests,
        "corrupt_every": args.corrupt_every, "oversized_every": args.oversized_every,
        "good_requests": good, "answered": tally.answered, "bad_requests": bad, "rejected": tally.rejected,
        "collateral_failures": tally.collateral, "bad_answered": tally.bad_answered,
        "bad_failed_as_server_fault": tally.bad_failed_otherwise, "unexpected_errors": tally.errors,
        "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
        "seconds": seconds, "requests_per_s": (good + bad) / seconds if seconds else None, **memory,
    }


def format_report(summary: dict) -> str:
    def delta(a, b):
        return "" if a is None or b is None else f" ({(b - a) / 2**30:+.2f} GiB)"

    rss_warm, rss_end, rss_peak = summary["rss_after_warmup"], summary["rss_at_end"], summary["rss_peak"]
    lines = [
        f"soak: {summary['clients']} clients x {summary['requests_per_client']} requests to {summary['model']} at "
        f"{summary['url']} ({summary['protocol']}); {every(summary['corrupt_every'])} corrupt, "
        f"{every(summary['oversized_every'])} oversized",
        f"  answered              {summary['answered']} / {summary['good_requests']} good requests",
        f"  rejected              {summary['rejected']} / {summary['bad_requests']} bad requests (as bad input)",
        f"  collateral failures   {summary['collateral_failures']}",
        f"  bad answered          {summary['bad_answered']}",
        f"  latency (good)        p50 {summary['p50_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms",
        f"  throughput            {summary['requests_per_s']:.2f} requests/s over {summary['seconds']:.1f} s",
        f"  server RSS            {_gib(rss_warm)} after warm-up, {_gib(rss_end)} at the end"
        f"{delta(rss_warm, rss_end)}, "
        f"peak {_gib(rss_peak)}{delta(rss_warm, rss_peak)}",
    ]
    for message, count in summary["unexpected_errors"].items():
        lines.append(f"  unexpected ({count}x)    {message}")
    return "\n".join(lines)


def verdict(summary: dict) -> str | None:
    """One line naming what went wrong, None when every request went as it should."""
    wrong = [f"{summary[key]} {what}" for key, what in (
        ("collateral_failures", "good request(s) failed"),
        ("bad_answered", "bad request(s) answered"),
        ("bad_failed_as_server_fault", "bad request(s) failed otherwise than as bad input"))
        if summary[key]]
    return f"soak: FAILED: {'; '.join(wrong)} (the unexpected errors are listed above)" if wrong else None


def count(minimum: int):
    """An argparse type: an integer of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse


def server_pid(text: str) -> int:
    pid = count(1)(text)
    if not Path(f"/proc/{pid}").is_dir():
        raise argparse.ArgumentTypeError(f"no process {pid} on this machine (its memory is read from /proc)")
    return pid


def check_server(protocol: str, url: str, model: str) -> str | None:
    """Why the soak cannot start against `url` (one line), None when the server serves `model`."""
    try:
        _, client = _client(protocol, url)
    except Exception as err:  # a URL the client library refuses
        return f"cannot connect to {url} ({protocol}): {' '.join(str(err).split())[:200]}"
    try:
        if not client.is_server_live():
            return f"the server at {url} ({protocol}) is not live"
        if not client.is_model_ready(model):
            return f"the server at {url} ({protocol}) does not serve {model} (not loaded or not ready)"
    except Exception as err:  # refused, unknown host, another protocol on the port
        return f"no Triton server answers at {url} ({protocol}): {' '.join(str(err).split())[:200]}"
    finally:
        client.close()
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port of the server (default %(default)s)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--model", choices=tuple(io.ENSEMBLES), default=io.ENSEMBLE,
                        help="the ensemble to soak (default %(default)s)")
    parser.add_argument("--clients", type=count(1), default=8, help="concurrent clients (default %(default)s)")
    parser.add_argument("--requests", type=count(1), default=50, help="requests per client (default %(default)s)")
    parser.add_argument("--corrupt-every", type=count(0), default=10,
                        help="every Nth request (counted over all clients) corrupt; 0: never (default %(default)s)")
    parser.add_argument("--oversized-every", type=count(0), default=25,
                        help="every Nth request oversized, before corrupt; 0: never (default %(default)s)")
    parser.add_argument("--warmup", type=count(0), default=2,
                        help="good requests per client before measuring memory; 0: none (default %(default)s)")
    parser.add_argument("--server-pid", type=server_pid,
                        help="pid of the server, on this machine (default: the local listener on the port)")
    parser.add_argument("--json-summary", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    host, _, port = args.url.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        parser.error(f"--url {args.url!r} is not host:port")
    if args.json_summary and not args.json_summary.resolve().parent.is_dir():
        parser.error(f"--json-summary {args.json_summary}: no directory {args.json_summary.parent}")

    problem = check_server(args.protocol, args.url, args.model)
    if problem:
        print(f"soak: {problem}", file=sys.stderr)
        return 2
    pid = args.server_pid
    if pid is None and host in ("127.0.0.1", "localhost", "::1", "[::1]", socket.gethostname()):
        pid = listening_pid(int(port))
    plans = schedules(args.clients, args.requests, args.corrupt_every, args.oversized_every)
    warm = Tally()
    run_phase(args.protocol, args.url, args.model, [[("good", photos()[0])] * args.warmup] * args.clients, warm)
    if warm.collateral:
        print(f"soak: {args.model} at {args.url} fails good requests before any bad one was sent: "
              f"{next(iter(warm.errors), '')}", file=sys.stderr)
        return 2
    tally = Tally()
    if pid is not None:
        memory = {"rss_after_warmup": tree_rss(pid)}
        with PeakMemory(pid) as peak:
            seconds = run_phase(args.protocol, args.url, args.model, plans, tally)
        memory.update(rss_at_end=tree_rss(pid), rss_peak=peak.peak, server_pid=pid)
    else:
        seconds = run_phase(args.protocol, args.url, args.model, plans, tally)
        memory = {"rss_after_warmup": None, "rss_at_end": None, "rss_peak": None, "server_pid": None}
    summary = summarise(args, tally, seconds, memory)
    print(format_report(summary))
    if args.json_summary:
        args.json_summary.write_text(json.dumps(summary, indent=1) + "\n")
    failed = verdict(summary)
    if failed:
        print(failed, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
