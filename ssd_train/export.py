"""`ssd-train export`: a checkpoint -> the weights of a Triton model repository, for the detector the
checkpoint holds (`ssd_train.models.ssd300.export`, `ssd_train.models.maskrcnn.export`). The steps they
share live here:
- the repository gets the configs and model code (python/DALI) of the package's `model_repository/`
  where it has none, so any empty directory can be exported into and served; code from an older
  ssd-train is replaced, and a config declaring another interface stops the export (`install_configs`);
- every file is written atomically (temp file beside it + rename), after its verification;
- `manifest.json`, last: the SHA-256 of each file the export wrote, so `ssd-serve` can refuse a mixed
  or stale set (`ssd_train.serving.manifest`). One repository holds both detectors: exporting one keeps
  the other's entries.
"""

from __future__ import annotations

import io as bytes_io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch

from ssd_common import io
from ssd_train.files import temp_file_beside
from ssd_train.serving.manifest import ARTIFACTS, RepositoryBusy, artifact_files, exclusive, write_manifest
from ssd_train.serving.served_repository import CONFIG_FILE, PACKAGE_REPOSITORY, PREVIOUS_SUFFIX

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """The checkpoint cannot be exported, or an exported model disagrees with the eager one."""


def export_model_repository(
    checkpoint: str | Path,
    repository: str | Path,
    precisions: Sequence[str] = ("fp32", "fp16"),
    onnx: bool = False,
    backbone: str | None = None,
    score_threshold: float | None = None,
    detections_per_image: int | None = None,
    replace_configs: bool = False,
) -> list[Path]:
    """Export `checkpoint` (SSD300 or Mask R-CNN, as it records) into the model repository `repository`;
    returns the files written. `score_threshold` and `detections_per_image` set what the served Mask R-CNN
    keeps (its checkpoint's by default); `replace_configs`: see `install_configs`."""
    from ssd_train.checkpoint import CheckpointError, detector_of

    try:
        detector = detector_of(checkpoint)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    if detector == "maskrcnn":
        from ssd_train.models.maskrcnn.export import export_repository

        if backbone is not None:
            raise ExportError("--backbone is an option of SSD300 checkpoints: a Mask R-CNN checkpoint records its own")
        options = dict(score_threshold=score_threshold, detections_per_image=detections_per_image)
    else:
        from ssd_train.models.ssd300.export import export_repository

        if score_threshold is not None or detections_per_image is not None:
            raise ExportError("--score-threshold and --detections-per-image are options of Mask R-CNN exports: the "
                              "served SSD300 keeps NVIDIA's 0.05 and 200 (filter the scores on the client)")
        options = dict(backbone=backbone)
    with export_lock(Path(repository)):
        return export_repository(checkpoint, repository, precisions, onnx=onnx, replace_configs=replace_configs,
                                 **options)


@contextmanager
def export_lock(repository: Path):
    """`manifest.exclusive`, its errors taking the lock as ExportErrors."""
    with ExitStack() as held:
        try:
            held.enter_context(exclusive(repository))
        except RepositoryBusy as err:
            raise ExportError(str(err)) from None
        except OSError as err:
            raise ExportError(f"cannot write to {repository}: {err.strerror}") from None
        yield


def write_export_manifest(repository: Path, detector: str, models: Sequence[str], written: list[Path],
                          **details) -> Path:
    """The manifest of `repository` after `detector`'s export wrote `written` into its `models`: this
    export's artifacts replace whatever the manifest listed for those models; another detector's
    entries are kept as they were."""
    from ssd_train.serving.manifest import ManifestError, read_manifest

    try:
        previous = read_manifest(repository)
    except ManifestError:
        previous = {"files": {}}
    kept = {rel: entry for rel, entry in previous["files"].items() if rel.split("/")[0] not in models}
    exports = {name: value for name, value in previous.get("exports", {}).items() if name != detector}
    artifacts = [path for path in written if path.name in ARTIFACTS]
    set_aside_stale_artifacts(repository, models, artifacts)
    return write_manifest(repository, artifacts, kept=kept, exports={**exports, detector: details})


def set_aside_stale_artifacts(repository: Path, models: Sequence[str], artifacts: list[Path]) -> list[Path]:
    """An earlier export's artifacts in `models` that this one did not write (its fp16 model after an
    fp32-only export, its ONNX file after one without --onnx) belong to other weights: served beside the
    new ones they would mix two checkpoints. Each is renamed NAME.previous (kept, not served)."""
    repository = Path(repository)
    fresh = {Path(path).resolve() for path in artifacts}
    moved = []
    for rel in artifact_files(repository):
        path = repository / rel
        if rel.split("/")[0] in models and path.resolve() not in fresh:
            os.replace(path, path.with_name(path.name + PREVIOUS_SUFFIX))
            log.warning("%s is an earlier export's, not this one's: kept as %s%s", path, path.name, PREVIOUS_SUFFIX)
            moved.append(path)
    return moved


# ----------------------------------------------------------------------------------------------
# Repository layout


def check_configs(repository: Path, models: Sequence[str], replace_configs: bool = False,
                  source: Path = PACKAGE_REPOSITORY) -> None:
    """Stop an export, before it writes anything, into a repository holding a config of `models` that
    declares another interface than this ssd-train's (`served_repository.interface_difference`: an older
    ssd-train's tensors, which the new weights and code would not fit), unless `replace_configs`. A config
    differing only in tuning (instances, batching, parameters) is fine: it is kept."""
    if replace_configs or _is_source(repository, source):
        return
    for name in models:
        config = repository / name / CONFIG_FILE
        difference = _config_difference(config, source / name / CONFIG_FILE)
        if difference:
            raise ExportError(f"{config} {difference} (an older ssd-train's config?): pass --replace-configs to "
                              f"replace it with this ssd-train's (yours is kept as {CONFIG_FILE}{PREVIOUS_SUFFIX}), "
                              "then reapply your tuning")


def install_configs(repository: Path, models: Sequence[str] = io.MODELS, replace_configs: bool = False,
                    source: Path = PACKAGE_REPOSITORY) -> list[Path]:
    """Bring the configs and model code of `models` in `repository` to this ssd-train's (`source`, the
    package's model repository); returns the files written.
    - What is missing is copied, and each model gets its version folder `1/`.
    - A config is kept (it may be tuned) unless it declares another interface: then `check_configs`
      refuses, or with `replace_configs` it is replaced.
    - Model code (model.py, dali.py) unlike this ssd-train's is replaced: it imports this package, and an
      older one's fails there.
    A replaced file stays beside its successor as NAME.previous."""
    from ssd_train.serving.served_repository import model_code

    check_configs(repository, models, replace_configs, source)
    same = _is_source(repository, source)
    written = []
    for name in models:
        target = repository / name
        if not same:
            if not (target / CONFIG_FILE).is_file() and not (source / name / CONFIG_FILE).is_file():
                raise ExportError(
                    f"{target} has no {CONFIG_FILE} and the package's model repository ({source}) is "
                    "not available: export into a copy of the project's model_repository"
                )
            reference = source / name / CONFIG_FILE
            replace = replace_configs and _config_difference(target / CONFIG_FILE, reference) is not None
            if _install(reference, target / CONFIG_FILE, replace):
                written.append(target / CONFIG_FILE)
            for code in model_code(name, source):
                if _install(source / name / code, target / code, replace=True):
                    written.append(target / code)
        try:
            (target / "1").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ExportError(f"cannot create {target / '1'}: {err.strerror}") from None
    return written


def _install(source: Path, target: Path, replace: bool) -> bool:
    """Copy `source` to `target` where it is missing, or where it differs and `replace` (the old file kept
    as TARGET.previous); whether it copied."""
    if not source.is_file():
        return False
    try:
        if target.is_file():
            if not replace or target.read_bytes() == source.read_bytes():
                return False
            shutil.copy2(target, target.with_name(target.name + PREVIOUS_SUFFIX))
            log.warning("replacing %s, unlike this ssd-train's (the old one is kept as %s%s)", target, target.name,
                        PREVIOUS_SUFFIX)
        with temp_path(target) as tmp:
            shutil.copy2(source, tmp)
            os.replace(tmp, target)
    except OSError as err:
        raise ExportError(f"cannot write {target}: {err.strerror}") from None
    return True


def _config_difference(config: Path, reference: Path) -> str | None:
    """How the config `config` declares another interface than `reference`; None where they agree or
    either is missing."""
    from ssd_train.serving.served_repository import ConfigError, interface_difference, read_config

    if not config.is_file() or not reference.is_file():
        return None
    try:
        return interface_difference(read_config(config), read_config(reference))
    except ConfigError:
        return "does not parse as a model config"


def _is_source(repository: Path, source: Path) -> bool:
    try:
        return repository.exists() and repository.resolve() == source.resolve()
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# Verification input


def sample_images() -> list[bytes]:
    """Two JPEG photos of different sizes and aspect ratios with smooth and sharp content: what the
    verification feeds through the real preprocessing (no data files needed)."""
    from PIL import Image, ImageDraw

    images = []
    for height, width, seed in ((480, 640, 0), (375, 260, 1)):
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 17.0 + y / 23.0)], axis=-1)
        image = Image.fromarray((255 * base).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
            x1, y1 = x0 + rng.integers(20, width // 2), y0 + rng.integers(20, height // 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
        buffer = bytes_io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


# ----------------------------------------------------------------------------------------------
# Files


def label_map_json(label_map) -> bytes:
    return (json.dumps(label_map.to_json(), indent=1) + "\n").encode()


@contextmanager
def temp_path(path: Path):
    """A temp file beside `path` (same filesystem, so the final rename is atomic); removed unless
    the caller moved it into place."""
    try:
        fd, tmp = temp_file_beside(path)
    except OSError as err:
        raise ExportError(f"cannot write to {path.parent}: {err.strerror}") from None
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    with temp_path(path) as tmp:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


@contextmanager
def quiet_torch():
    """Tracing and the legacy ONNX exporter warn about their own deprecation and about shape
    arithmetic they record (the batch size stays dynamic: verification runs another one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        yield


def first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
