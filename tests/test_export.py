"""`ssd_train.export`: a checkpoint -> TorchScript (fp32, fp16), ONNX and the label map of a model
repository, each verified against the eager model before it is written."""

from __future__ import annotations

import io as bytes_io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from ssd_train.models.ssd300.checkpoint import load_for_inference
from ssd_train.data.dali import Preprocessor
from ssd_train.export import PACKAGE_REPOSITORY, ExportError, export_lock, export_model_repository, install_configs
from ssd_train.models.ssd300.boxes import TOPK_PER_CLASS, postprocess, select
from ssd_train.models.ssd300.export import ServedSSD300, sample_batch, write_torchscript
from ssd_common import io
from ssd_train.serving.manifest import LOCK_FILE, MANIFEST_FILE, ManifestError, verify_repository

DATA_DIR = Path(skimage.data.__file__).parent  # real photos shipped with scikit-image
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")  # torch 2.9+ deprecation notes


def photos() -> list[bytes]:
    """Real JPEG and PNG photos of different sizes."""
    chelsea = bytes_io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(chelsea, format="JPEG", quality=90)
    return [(DATA_DIR / "rocket.jpg").read_bytes(), (DATA_DIR / "astronaut.png").read_bytes(), chelsea.getvalue()]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def photo_batch() -> torch.Tensor:
    pixels, _ = Preprocessor(batch_size=4)(photos())
    return torch.from_numpy(pixels)


@pytest.fixture(scope="module")
def eager(tiny_checkpoint):
    model, label_map, _ = load_for_inference(tiny_checkpoint)
    return model, label_map


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """fp32 TorchScript + ONNX exported into an empty directory."""
    repository = tmp_path_factory.mktemp("export") / "repository"
    written = export_model_repository(tiny_checkpoint, repository, precisions=["fp32"], onnx=True)
    return repository, written


def test_export_writes_weights_labels_and_the_configs(exported, eager):
    repository, written = exported
    _, label_map = eager
    expected = {repository / io.MODEL_FP32 / "1" / io.TORCHSCRIPT_FILE,
                repository / io.MODEL_FP32 / "1" / io.ONNX_FILE,
                repository / io.POSTPROCESS / "1" / io.LABELS_FILE,
                repository / io.PREPROCESS / "1" / "dali.py",
                repository / io.POSTPROCESS / "1" / "model.py",
                repository / io.VALIDATE / "1" / "model.py",
                repository / MANIFEST_FILE,
                *(repository / name / "config.pbtxt" for name in io.MODELS)}
    assert set(written) == expected
    assert all(path.is_file() for path in written)
    for name in io.MODELS:  # copies of the package's files
        assert (repository / name / "config.pbtxt").read_bytes() == (PACKAGE_REPOSITORY / name / "config.pbtxt").read_bytes()
        assert (repository / name / "1").is_dir()
    assert not (repository / io.MODEL_FP16 / "1" / io.TORCHSCRIPT_FILE).exists()
    assert json.loads((repository / io.POSTPROCESS / "1" / io.LABELS_FILE).read_text()) == label_map.to_json()
    assert not list(repository.rglob("*.tmp"))
    assert written[-1] == repository / MANIFEST_FILE  # last: it vouches for the files before it
    manifest = verify_repository(repository)
    assert sorted(manifest["files"]) == [f"{io.MODEL_FP32}/1/{io.ONNX_FILE}", f"{io.MODEL_FP32}/1/{io.TORCHSCRIPT_FILE}",
                                         f"{io.POSTPROCESS}/1/{io.LABELS_FILE}"]
    assert manifest["exports"]["ssd300"]["precisions"] == ["fp32"]


def test_the_manifest_refuses_mixed_stale_or_edited_exports(exported, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(exported[0], repository)
    verify_repository(repository)
    stale = repository / io.MODEL_FP16 / "1" / io.TORCHSCRIPT_FILE  # an old fp16 export left beside
    stale.write_bytes(b"an older model")
    with pytest.raises(ManifestError, match=f"{io.MODEL_FP16}/1/model.pt is not part of the last export .*delete it"):
        verify_repository(repository)
    stale.unlink()
    labels = repository / io.POSTPROCESS / "1" / io.LABELS_FILE
    labels.write_text(labels.read_text().replace("circle", "disc"))  # edited after the export
    with pytest.raises(ManifestError, match="labels.json is not the file the last export wrote"):
        verify_repository(repository)
    labels.unlink()
    with pytest.raises(ManifestError, match="labels.json, listed in manifest.json, is missing"):
        verify_repository(repository)
    (repository / MANIFEST_FILE).unlink()
    with pytest.raises(ManifestError, match="has no manifest.json .* run ssd-train export again"):
        verify_repository(repository)


def test_torchscript_matches_eager_on_real_photos(exported, eager, photo_batch):
    """The served model ends with the postprocess's first half: its candidates, put through the second
    half, are the detections `postprocess` gives on the eager model's raw outputs."""
    repository, _ = exported
    model, label_map = eager
    traced = torch.jit.load(str(repository / io.MODEL_FP32 / "1" / io.TORCHSCRIPT_FILE))
    with torch.no_grad():
        boxes, scores = traced(photo_batch)  # 3 images; traced with 1
        expected_boxes, expected_scores = ServedSSD300(model)(photo_batch)
        expected = postprocess(*model(photo_batch))
    classes = label_map.num_classes - 1
    assert boxes.shape == (3, classes, TOPK_PER_CLASS, 4) and scores.shape == (3, classes, TOPK_PER_CLASS)
    assert boxes.dtype == scores.dtype == torch.float32
    assert relative_error(boxes, expected_boxes) < 1e-4
    assert relative_error(scores, expected_scores) < 1e-4
    served = select(scores, boxes)
    assert torch.equal(served.counts, expected.counts) and torch.equal(served.labels, expected.labels)
    assert relative_error(served.boxes, expected.boxes) < 1e-4
    # what crosses from the model to the postprocess step, per image: 1/9 of the raw outputs
    raw = model(photo_batch[:1])
    assert (boxes[0].numel() + scores[0].numel()) * 9 < sum(t.numel() for t in raw)


def test_the_traced_model_follows_the_device_it_is_loaded_on(exported):
    """The GPU server loads model.pt onto the GPU: nothing in the trace may be pinned to the CPU it was traced
    on (the default boxes are a buffer of the module, moved with it)."""
    repository, _ = exported
    traced = torch.jit.load(str(repository / io.MODEL_FP32 / "1" / io.TORCHSCRIPT_FILE))
    graph = str(traced.inlined_graph)
    assert 'value="cpu"' not in graph and "Device" not in graph
    assert "default_boxes" in dict(traced.named_buffers())


def test_onnx_is_valid_and_matches_torchscript(exported, photo_batch):
    import onnx

    ort = pytest.importorskip("onnxruntime")
    repository, _ = exported
    path = repository / io.MODEL_FP32 / "1" / io.ONNX_FILE
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [io.MODEL_INPUT]
    assert [o.name for o in session.get_outputs()] == [io.MODEL_BOXES, io.MODEL_SCORES]
    boxes, scores = session.run(None, {io.MODEL_INPUT: photo_batch.numpy()})
    traced = torch.jit.load(str(repository / io.MODEL_FP32 / "1" / io.TORCHSCRIPT_FILE))
    with torch.no_grad():
        expected = select(*reversed(traced(photo_batch)))
    got = select(torch.from_numpy(scores), torch.from_numpy(boxes))
    assert torch.equal(got.counts, expected.counts) and torch.equal(got.labels, expected.labels)
    assert relative_error(got.boxes, expected.boxes) < 1e-4
    assert relative_error(got.scores, expected.scores) < 1e-4


@pytest.mark.slow
def test_fp16_export_casts_inside_and_stays_close_to_fp32(tiny_checkpoint, tmp_path, eager, photo_batch):
    """fp16 on a CPU: slow (tens of seconds) but supported; the GPU is where it pays."""
    model, _ = eager
    written = export_model_repository(tiny_checkpoint, tmp_path, precisions=["fp16"])
    path = tmp_path / io.MODEL_FP16 / "1" / io.TORCHSCRIPT_FILE
    assert path in written and not (tmp_path / io.MODEL_FP32 / "1" / io.TORCHSCRIPT_FILE).exists()
    traced = torch.jit.load(str(path))
    assert {p.dtype for p in traced.parameters()} == {torch.float16}
    with torch.no_grad():
        boxes, scores = traced(photo_batch[:1])
        expected_boxes, expected_scores = ServedSSD300(model)(photo_batch[:1])
    assert boxes.dtype == scores.dtype == torch.float32
    assert (scores - expected_scores).abs().max() < 1e-2  # sorted per class: rank by rank


class ScalesByBatchSize(torch.nn.Module):
    """A real tracing pitfall: Python arithmetic on a tensor's size is frozen into the trace."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        locs, scores = self.model(images)
        return locs * float(images.shape[0]), scores


def test_exported_files_and_checkpoints_are_as_readable_as_the_umask_allows(exported, tiny_checkpoint):
    """Written through temp files, yet not left at mkstemp's 0600: a server running as another user
    (deploy/'s pods) must read what export wrote."""
    umask = os.umask(0)
    os.umask(umask)
    repository, _ = exported
    written = [repository / MANIFEST_FILE, repository / io.POSTPROCESS / "1" / io.LABELS_FILE,
               *(repository / io.MODEL_FP32 / "1" / name for name in (io.TORCHSCRIPT_FILE, io.ONNX_FILE))]
    for path in (*written, tiny_checkpoint):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_a_trace_that_disagrees_with_eager_is_an_error_and_writes_nothing(eager, tmp_path):
    model, _ = eager
    module = ScalesByBatchSize(model).eval()
    sample = sample_batch()  # 2 images; the trace sees 1
    path = tmp_path / io.MODEL_FP32 / "1" / io.TORCHSCRIPT_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"previous export")
    with torch.no_grad(), pytest.raises(ExportError, match="disagrees with eager") as error:
        write_torchscript(module, "fp32", sample, ServedSSD300(module)(sample), path)
    assert "\n" not in str(error.value)
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in path.parent.iterdir()] == [io.TORCHSCRIPT_FILE]


def package_config(name: str) -> str:
    return (PACKAGE_REPOSITORY / name / "config.pbtxt").read_text()


def older_config() -> str:
    """`ssd300_fp32` as ssd-train wrote it before the model ended with the candidates: all 8732 boxes out."""
    config = package_config(io.MODEL_FP32).replace("dims: [ -1, 200, 4 ]", "dims: [ 4, 8732 ]")
    assert config != package_config(io.MODEL_FP32)
    return config


def test_tuned_configs_are_kept_and_missing_ones_copied(tmp_path):
    repository = tmp_path / "repository"
    tuned = package_config(io.MODEL_FP32).replace("count: 1", "count: 3").replace("1000", "20000")
    (repository / io.MODEL_FP32).mkdir(parents=True)
    (repository / io.MODEL_FP32 / "config.pbtxt").write_text(tuned)
    written = install_configs(repository)
    assert (repository / io.MODEL_FP32 / "config.pbtxt").read_text() == tuned
    assert repository / io.MODEL_FP32 / "config.pbtxt" not in written
    assert repository / io.PREPROCESS / "1" / "dali.py" in written
    assert all((repository / name / "1").is_dir() for name in io.MODELS)
    assert not list(repository.rglob("*.previous"))
    assert install_configs(repository) == []  # nothing left to copy


def test_a_config_of_an_older_ssd_train_stops_the_export_before_it_writes(tiny_checkpoint, tmp_path):
    repository = tmp_path / "repository"
    (repository / io.MODEL_FP32).mkdir(parents=True)
    (repository / io.MODEL_FP32 / "config.pbtxt").write_text(older_config())
    with pytest.raises(ExportError) as error:
        export_model_repository(tiny_checkpoint, repository, precisions=["fp32"])
    assert "\n" not in str(error.value)
    assert "declares output OUTPUT__0 as FP32 [4, 8732] where this ssd-train's has FP32 [-1, 200, 4]" in str(
        error.value)
    assert "--replace-configs" in str(error.value)
    assert sorted(p.relative_to(repository).as_posix() for p in repository.rglob("*")) == [
        LOCK_FILE, io.MODEL_FP32, f"{io.MODEL_FP32}/config.pbtxt"]  # nothing written
    (repository / io.MODEL_FP32 / "config.pbtxt").write_text("input [ {")  # unreadable: refused the same way
    with pytest.raises(ExportError, match="config.pbtxt does not parse as a model config.*--replace-configs"):
        install_configs(repository)


def test_replacing_configs_takes_only_those_of_another_interface_and_keeps_them(tmp_path):
    """--replace-configs replaces the older config and leaves a tuned one; older model code is replaced
    either way (it imports this ssd-train's package). Each replaced file stays beside as .previous."""
    repository = tmp_path / "repository"
    install_configs(repository)
    tuned = package_config(io.MODEL_FP16).replace("count: 1", "count: 2")
    (repository / io.MODEL_FP16 / "config.pbtxt").write_text(tuned)
    (repository / io.MODEL_FP32 / "config.pbtxt").write_text(older_config())
    older_code = "from ssd_train.boxes import postprocess  # a module of an older ssd-train\n"
    (repository / io.POSTPROCESS / "1" / "model.py").write_text(older_code)
    written = install_configs(repository, replace_configs=True)
    assert sorted(p.relative_to(repository).as_posix() for p in written) == [f"{io.MODEL_FP32}/config.pbtxt",
                                                                             f"{io.POSTPROCESS}/1/model.py"]
    assert (repository / io.MODEL_FP32 / "config.pbtxt").read_text() == package_config(io.MODEL_FP32)
    assert (repository / io.MODEL_FP32 / "config.pbtxt.previous").read_text() == older_config()
    assert (repository / io.MODEL_FP16 / "config.pbtxt").read_text() == tuned
    assert (repository / io.POSTPROCESS / "1" / "model.py").read_bytes() == (
        PACKAGE_REPOSITORY / io.POSTPROCESS / "1" / "model.py").read_bytes()
    assert (repository / io.POSTPROCESS / "1" / "model.py.previous").read_text() == older_code
    assert len(list(repository.rglob("*.previous"))) == 2
    (repository / io.PREPROCESS / "1" / "dali.py").write_text("# edited\n")
    assert install_configs(repository) == [repository / io.PREPROCESS / "1" / "dali.py"]  # code: without the flag


def test_one_export_at_a_time_and_a_killed_one_leaves_no_lock(exported, tiny_checkpoint, tmp_path):
    """Two exports into one repository would mix their files under one manifest: the second is refused
    in one line naming the first, ssd-serve refuses the repository meanwhile, and a killed export's lock
    goes with it."""
    repository = tmp_path / "repository"
    shutil.copytree(exported[0], repository)
    with export_lock(repository):
        with pytest.raises(ExportError, match=rf"another ssd-train export \(pid {os.getpid()}\) is writing into"):
            export_model_repository(tiny_checkpoint, repository, precisions=["fp32"])
        with pytest.raises(ManifestError, match=rf"an ssd-train export \(pid {os.getpid()}\) is writing into"):
            verify_repository(repository)  # what ssd-serve checks first
    verify_repository(repository)
    code = ("import sys, time; from pathlib import Path; from ssd_train.export import export_lock\n"
            "with export_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(repository)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ExportError, match=f"pid {holder.pid}"):
            export_model_repository(tiny_checkpoint, repository, precisions=["fp32"])
    finally:
        holder.kill()
        holder.wait()
    export_model_repository(tiny_checkpoint, repository, precisions=["fp32"], onnx=True)  # what `exported` holds
    assert verify_repository(repository)["exports"]["ssd300"]["precisions"] == ["fp32"]


def test_an_earlier_exports_artifacts_are_set_aside_not_served_with_the_new_ones(exported, tiny_checkpoint, tmp_path):
    """Exporting without --onnx over an export with it: the old model.onnx belongs to the earlier weights.
    It is kept as model.onnx.previous, out of the manifest, and the repository verifies (ssd-serve serves it)."""
    repository = tmp_path / "repository"
    shutil.copytree(exported[0], repository)
    onnx_file = repository / io.MODEL_FP32 / "1" / io.ONNX_FILE
    earlier = onnx_file.read_bytes()
    export_model_repository(tiny_checkpoint, repository, precisions=["fp32"])
    assert not onnx_file.exists()
    assert onnx_file.with_name(io.ONNX_FILE + ".previous").read_bytes() == earlier
    listed = verify_repository(repository)["files"]
    assert f"{io.MODEL_FP32}/1/{io.TORCHSCRIPT_FILE}" in listed and f"{io.MODEL_FP32}/1/{io.ONNX_FILE}" not in listed


def test_a_repository_without_configs_needs_the_package_ones(tmp_path):
    with pytest.raises(ExportError, match="no config.pbtxt"):
        install_configs(tmp_path / "repository", source=tmp_path / "nowhere")


@pytest.mark.parametrize("case", ["precision", "missing", "not a checkpoint", "backbone"])
def test_bad_requests_are_one_line_export_errors(case, tiny_checkpoint, tmp_path):
    checkpoint, options = tiny_checkpoint, {}
    if case == "precision":
        options["precisions"] = ["int8"]
    elif case == "missing":
        checkpoint = tmp_path / "nothing.pt"
    elif case == "not a checkpoint":
        checkpoint = tmp_path / "photo.pt"
        shutil.copy(DATA_DIR / "rocket.jpg", checkpoint)
    else:
        options["backbone"] = "resnet50"  # the checkpoint holds resnet18 weights
    with pytest.raises(ExportError) as error:
        export_model_repository(checkpoint, tmp_path / "repository", **options)
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "repository").rglob("*.pt"))


def test_export_rounds_preprocessing_through_the_served_pipeline():
    """The verification input is the DALI preprocessing's output, not random numbers."""
    batch = sample_batch()
    assert batch.shape == (2, 3, io.INPUT_SIZE, io.INPUT_SIZE) and batch.dtype == torch.float32
    # ImageNet-normalised photos: per-channel means within a few std of zero, not all equal
    means = batch.mean(dim=(2, 3))
    assert torch.all(means.abs() < 3) and batch.std() > 0.1
    assert not np.allclose(batch[0].numpy(), batch[1].numpy())
