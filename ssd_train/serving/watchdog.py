"""Runs tritonserver on behalf of a `TritonServer` and never lets it outlive its owner.

    python -m ssd_train.serving.watchdog --scratch DIR --stop-timeout S -- tritonserver ARGS...

The owner (ssd-serve, or any Python process using the `TritonServer` API) starts this process with a
pipe on its stdin and never writes to it. The kernel closes the pipe when the owner exits, however it
exits (SIGKILL included), and the watchdog then stops the server's process group (tritonserver and
its python stubs) and removes the scratch directory (the derived repository, the log, the stub) and
the server's python-backend shared memory. Nothing is left running or lying around.

- SIGTERM (the owner's `stop()`): stop the server gracefully (SIGTERM to its group, SIGKILL after
  the stop timeout); the scratch directory is kept, the owner reads the log's end and removes it.
- The server exits by itself: exit with its code (the owner reports it).
- The watchdog itself killed: the server gets SIGKILL from the kernel (parent-death signal), and its
  python stubs exit when their server is gone.
Stdlib only: it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the server's process, before exec: SIGKILL it when the watchdog dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def stop_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the process group, SIGKILL after `timeout` seconds, and a final SIGKILL for
    anything of the group still there (python stubs)."""
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()
    _signal_group(process.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def remove_leftovers(scratch: Path | None, shm_prefix: str | None) -> None:
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    if shm_prefix:
        for region in Path("/dev/shm").glob(f"{shm_prefix}*"):
            region.unlink(missing_ok=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, help="Removed when the owner dies.")
    parser.add_argument("--shm-prefix", help="/dev/shm regions of the server, removed when the owner dies.")
    parser.add_argument("--stop-timeout", type=float, default=20.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no server command")

    # A plain flag: a signal handler must not take locks the interrupted main thread may hold.
    stop_requested = []
    owner_gone = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the owner, which decides

    def watch_owner():
        # The raw descriptor, not sys.stdin: a daemon thread blocked in a buffered read aborts the
        # interpreter's exit.
        while os.read(0, 4096):
            pass
        owner_gone.set()

    # Own process group (stop_group reaches the python stubs too); stdout/stderr are the owner's log.
    server = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True,
                              preexec_fn=_die_with_parent)
    threading.Thread(target=watch_owner, daemon=True).start()
    while server.poll() is None and not stop_requested and not owner_gone.is_set():
        time.sleep(0.1)
    if server.poll() is None:
        stop_group(server, args.stop_timeout)
    else:
        _signal_group(server.pid, signal.SIGKILL)  # stubs of a server that died
    if owner_gone.is_set():
        remove_leftovers(args.scratch, args.shm_prefix)
    code = server.returncode
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
