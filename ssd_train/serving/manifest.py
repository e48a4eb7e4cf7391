"""The export manifest: which weight files the exports of a repository wrote, with their SHA-256.

Export writes `manifest.json` at the repository's root last, after every file it lists is in place;
`ssd-serve` checks the repository against it before starting a server. A mixed or stale set -- an
export that died half-way, a model.pt copied in by hand, an old fp16 model left beside a new fp32
one -- is refused with one line saying to export again, instead of serving models that disagree.
Configs are not listed, as operators may tune them; model code and the configs' tensors are checked
against this ssd-train's by `served_repository.package_mismatch`. A repository serving both detectors
has one manifest: each detector's export replaces its own entries and keeps the other's. One export
writes into a repository at a time (`exclusive`), and none is served while one does. Pure Python.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ssd_common import io
from ssd_train.files import atomic_write

MANIFEST_FILE = "manifest.json"
FORMAT = "ssd300-triton-export/1"
# What export writes into the models' version folders.
ARTIFACTS = (io.TORCHSCRIPT_FILE, io.ONNX_FILE, io.LABELS_FILE, io.RESIZE_FILE)


class ManifestError(ValueError):
    """A repository whose weight files are not the set its manifest describes."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_files(repository: Path) -> list[str]:
    """Repository-relative paths of the export artifacts present in the models' version folders."""
    found = []
    for name in io.ALL_MODELS:
        for artifact in ARTIFACTS:
            found += [path.relative_to(repository).as_posix() for path in (repository / name).glob(f"*/{artifact}")]
    return sorted(found)


def write_manifest(repository: Path, files: list[Path], kept: dict | None = None, **details) -> Path:
    """Record `files` (inside `repository`) with their hashes, and the entries `kept` (of an earlier
    manifest) as they were, atomically; `details` (JSON values) are kept for people reading the file."""
    repository = Path(repository)
    entries = dict(kept or {})
    for path in sorted(files):
        rel = Path(path).resolve().relative_to(repository.resolve()).as_posix()
        entries[rel] = {"sha256": file_sha256(Path(path)), "bytes": Path(path).stat().st_size}
    manifest = {"format": FORMAT, "written_by": "ssd-train export",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **details,
                "files": dict(sorted(entries.items()))}
    target = repository / MANIFEST_FILE
    with atomic_write(target, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
    return target


def read_manifest(repository: Path) -> dict:
    path = Path(repository) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(e, dict) and "sha256" in e for e in files.values()):
            raise ValueError("bad files entry")
    except FileNotFoundError:
        raise ManifestError(f"{repository} has no {MANIFEST_FILE} (exported by an older ssd-train, or assembled "
                            "by hand): run ssd-train export again") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ManifestError(f"{path} is unreadable ({type(err).__name__}): run ssd-train export again") from None
    return manifest


LOCK_FILE = ".export.lock"


class RepositoryBusy(ValueError):
    """Another export holds the repository."""


@contextmanager
def exclusive(repository: Path) -> Iterator[None]:
    """Hold `repository` for one export at a time. Two at once would mix their files under one manifest,
    which hashes what is on disk when it is written. The lock is the kernel's (flock on LOCK_FILE): it goes
    with the process holding it, so a killed export leaves none behind. RepositoryBusy (one line, naming
    the holder) when another holds it; OSError when the repository cannot be written."""
    repository.mkdir(parents=True, exist_ok=True)
    with open(repository / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RepositoryBusy(f"another ssd-train export (pid {_holder(lock)}) is writing into {repository}: "
                                 "wait for it to end") from None
        except OSError:  # a filesystem without locks (some network ones): unguarded, as exports were before
            yield
            return
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def export_in_progress(repository: Path) -> str | None:
    """The pid of the export writing into `repository` now, or None."""
    try:
        lock = open(Path(repository) / LOCK_FILE)
    except OSError:
        return None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(lock)
        except OSError:  # a filesystem without locks: nothing to learn
            return None
        fcntl.flock(lock, fcntl.LOCK_UN)
    return None


def _holder(lock) -> str:
    lock.seek(0)
    return lock.read().strip() or "unknown"


def verify_repository(repository: Path) -> dict:
    """The manifest, if every artifact in `repository` is one it lists, unchanged, and none it
    lists is missing, and no export is writing into it; ManifestError (one line) otherwise."""
    repository = Path(repository)
    writer = export_in_progress(repository)
    if writer:
        raise ManifestError(f"an ssd-train export (pid {writer}) is writing into {repository}: serve it once that "
                            "export has ended")
    manifest = read_manifest(repository)
    listed = manifest["files"]
    for rel in artifact_files(repository):
        if rel not in listed:
            raise ManifestError(f"{repository / rel} is not part of the last export ({MANIFEST_FILE}): a leftover of "
                                "an earlier export? Run ssd-train export again (--precision both writes fp32 "
                                "and fp16) or delete it")
    for rel, entry in listed.items():
        path = repository / rel
        if not path.is_file():
            raise ManifestError(f"{path}, listed in {MANIFEST_FILE}, is missing: run ssd-train export again")
        if path.stat().st_size != entry.get("bytes", path.stat().st_size) or file_sha256(path) != entry["sha256"]:
            raise ManifestError(f"{path} is not the file the last export wrote ({MANIFEST_FILE} has another "
                                "SHA-256): run ssd-train export again")
    return manifest
