"""The export manifest: which weight files the exports of a repository wrote, with their SHA-256.

Export writes `manifest.json` at the repository's root last, after every file it lists is in place;
`ssd-serve` checks the repository against it before starting a server. A mixed or stale set -- an
export that died half-way, a model.pt copied in by hand, an old fp16 model left beside a new fp32
one -- is refused with one line saying to export again, instead of serving models that disagree.
Configs are not listed, as operators may tune them; model code and the configs' tensors are checked
against this ssd-train's by `served_repository.package_mismatch`. A repository serving both detectors
has one manifest: each detector's export replaces its own entries and keeps the other's. Pure Python.
"""

from __future__ import annotations

import hashlib
import json
import time
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


def verify_repository(repository: Path) -> dict:
    """The manifest, if every artifact in `repository` is one it lists, unchanged, and none it
    lists is missing; ManifestError (one line) otherwise."""
    repository = Path(repository)
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
