"""`ssd-train` through click's runner: the happy paths and one clear line per user error."""

import json
import shutil

import pytest
from click.testing import CliRunner

from ssd_train.cli import cli


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


def test_make_dataset_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert run("make-dataset", "shapes", tmp_path / name, "--train", 3, "--val", 2, "--seed", 7).exit_code == 0
    for split in ("train2017", "val2017"):
        a = json.loads((tmp_path / "a" / "annotations" / f"instances_{split}.json").read_text())
        b = json.loads((tmp_path / "b" / "annotations" / f"instances_{split}.json").read_text())
        assert a == b and a["annotations"]
    assert (tmp_path / "a" / "train2017" / "000001.jpg").read_bytes() == (tmp_path / "b" / "train2017" / "000001.jpg").read_bytes()


def test_evaluate_writes_summary(shapes_dir, tiny_checkpoint, tmp_path):
    result = run("evaluate", "--data", shapes_dir, "--checkpoint", tiny_checkpoint, "--json-summary",
                 tmp_path / "s.json", "-j", 0)
    assert result.exit_code == 0, result.output
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert 0 <= summary["mAP"] <= 1 and len([k for k in summary if k.startswith(("AP", "AR"))]) == 12


def test_predict_prints_json_lines_and_draws(shapes_dir, tiny_checkpoint, tmp_path):
    images = sorted((shapes_dir / "val2017").iterdir())[:2]
    result = run("predict", "--checkpoint", tiny_checkpoint, *images, "--threshold", 0.0, "--output-dir", tmp_path)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert {line["image"] for line in lines} == {str(p) for p in images}
    first = lines[0]
    assert len(first["box"]) == 4 and first["category_name"] in {"circle", "rectangle", "triangle"}
    assert first["category_id"] in {1, 3, 7}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in images)


def test_missing_dataset(tmp_path, tiny_checkpoint):
    assert_one_line_error(run("evaluate", "--data", tmp_path / "none", "--checkpoint", tiny_checkpoint),
                          "dataset directory not found")
    (tmp_path / "a_file").write_text("")
    assert_one_line_error(run("evaluate", "--data", tmp_path / "a_file", "--checkpoint", tiny_checkpoint),
                          "dataset directory is a file, not a directory")


def test_wrong_layout(tmp_path, tiny_checkpoint):
    (tmp_path / "images").mkdir()
    assert_one_line_error(run("evaluate", "--data", tmp_path, "--checkpoint", tiny_checkpoint),
                          "not a COCO-layout dataset", "instances_val2017.json")


def test_malformed_annotations(tmp_path, tiny_checkpoint):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": [], "annotations": []}')
    assert_one_line_error(run("evaluate", "--data", tmp_path, "--checkpoint", tiny_checkpoint),
                          "not a COCO instances file")
    (tmp_path / "annotations" / "instances_val2017.json").write_text("[1, 2]")
    assert_one_line_error(run("evaluate", "--data", tmp_path, "--checkpoint", tiny_checkpoint),
                          "not a COCO instances file: not a JSON object")


def test_missing_checkpoint(shapes_dir, tmp_path):
    assert_one_line_error(run("evaluate", "--data", shapes_dir, "--checkpoint", tmp_path / "x.pt"),
                          "checkpoint not found")


def test_label_map_mismatch(shapes_dir, tiny_checkpoint, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(shapes_dir, other)
    ann = other / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["categories"][0]["name"] = "ellipse"
    ann.write_text(json.dumps(data))
    assert_one_line_error(run("evaluate", "--data", other, "--checkpoint", tiny_checkpoint), "label map mismatch")


def test_unreadable_image(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff this is not really a jpeg")
    assert_one_line_error(run("predict", "--checkpoint", tiny_checkpoint, bad), "bad.jpg")
    assert_one_line_error(run("predict", "--checkpoint", tiny_checkpoint, tmp_path / "missing.jpg"), "missing.jpg")


def test_a_bad_image_loses_predict_none_of_the_others(shapes_dir, tiny_checkpoint, tmp_path):
    good = sorted((shapes_dir / "val2017").iterdir())[:2]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[0].read_bytes()[:2000])
    result = CliRunner().invoke(cli, ["predict", "--checkpoint", str(tiny_checkpoint), str(good[0]), str(truncated),
                                      str(tmp_path / "missing.jpg"), str(good[1]), "--threshold", "0"])
    assert result.exit_code == 1
    assert {json.loads(line)["image"] for line in result.stdout.splitlines()} == {str(p) for p in good}
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 2 and "truncated.jpg" in errors[0] and "missing.jpg" in errors[1], result.stderr


def test_wrong_architecture(shapes_dir, tiny_checkpoint):
    assert_one_line_error(run("evaluate", "--data", shapes_dir, "--checkpoint", tiny_checkpoint,
                              "--backbone", "resnet34"), "do not fit the model")


def test_unwritable_save_dir(shapes_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("fit", "--data", shapes_dir, "--save", blocker / "run", "--epochs", 1, "--bs", 4,
                 "--backbone", "resnet18", "--no-pretrained-backbone", "--data-backend", "pytorch", "-j", 0)
    assert_one_line_error(result, "cannot write checkpoints to")


@pytest.mark.parametrize("args, fragment", [
    (("fit", "--data", "d", "--epochs", 0), "'--epochs': 0 is not in the range x>=1"),
    (("fit", "--data", "d", "--lr", -1), "'--learning-rate' / '--lr': -1.0 is not in the range x>0"),
    (("fit", "--data", "d", "--lr", "nan"), "'nan' is not a finite number"),  # nan passes any range check
    (("fit", "--data", "d", "--model", "maskrcnn", "--steps", "5,2"), "iterations in rising order, got '5,2'"),
    (("fit", "--data", "d", "--device", "tpu"), "expected cpu, cuda or cuda:N, got 'tpu'"),
    (("fit", "--data", "d", "--json-summary", "/nonexistent/s.json"), "its folder /nonexistent does not exist"),
    (("benchmark", "--mode", "inference", "--batch-sizes", "0,1"), "batch sizes of at least 1, got '0,1'"),
    (("benchmark", "--mode", "training", "--processes", "x"), "expected comma-separated numbers of processes"),
    (("predict", "--checkpoint", "c.pt", "a.jpg", "--threshold", 5), "5.0 is not in the range 0<=x<=1"),
    (("make-dataset", "shapes", "out", "--train", -5), "'--train': -5 is not in the range x>=0"),
])
def test_bad_option_values_are_one_line_before_any_work(args, fragment):
    result = run(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert fragment in result.output, result.output


def test_a_cuda_device_without_cuda_is_one_line(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run("evaluate", "--data", "d", "--checkpoint", "c.pt", "--device", "cuda:1")
    assert result.exit_code == 2 and "cuda:1: no CUDA device is available here" in result.output


def test_plain_cuda_is_this_process_gpu():
    from ssd_train.train import pick_device

    assert pick_device("cuda", local_rank=3) == "cuda:3" and pick_device("cuda:1", local_rank=3) == "cuda:1"
    assert pick_device("cpu", local_rank=3) == "cpu"


def test_make_dataset_never_writes_over_a_folder_in_use(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")
    assert_one_line_error(run("make-dataset", "shapes", tmp_path, "--train", 2, "--val", 1), "is not empty")
    assert (tmp_path / "annotations" / "instances_train2017.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotations"]


def test_a_new_run_never_overwrites_another_runs_checkpoints(shapes_dir, tmp_path):
    """Without --checkpoint/--resume, a --save holding checkpoints is refused before any work: the
    new run's epoch_0.pt would replace the old one's."""
    for detector, name, hint in (("ssd300", "epoch_3.pt", "--checkpoint"), ("maskrcnn", "model_0000500.pt",
                                                                          "--resume")):
        save = tmp_path / detector
        save.mkdir()
        (save / name).write_bytes(b"the earlier run")
        result = run("fit", "--model", detector, "--data", shapes_dir, "--save", save, "--bs", 2)
        assert_one_line_error(result, "already holds a run's checkpoints", name, hint)
        assert (save / name).read_bytes() == b"the earlier run" and len(list(save.iterdir())) == 1


def test_fit_names_the_detector_a_checkpoint_holds(shapes_dir, tiny_checkpoint, tiny_maskrcnn_checkpoint, tmp_path):
    assert_one_line_error(run("fit", "--model", "maskrcnn", "--data", shapes_dir, "--save", tmp_path / "a",
                              "--checkpoint", tiny_checkpoint), "holds a ssd300 checkpoint: resume it with --model ssd300")
    assert_one_line_error(run("fit", "--data", shapes_dir, "--save", tmp_path / "b", "--checkpoint",
                              tiny_maskrcnn_checkpoint), "holds a maskrcnn checkpoint: resume it with --model maskrcnn")


@pytest.mark.parametrize("backend", ["pytorch", "dali"])
def test_a_truncated_training_image_is_one_line_naming_it(shapes_dir, tmp_path, backend):
    """The check before training reads headers; a JPEG cut short fails when decoded, mid-run: still one
    line naming the file, from a DataLoader worker (PyTorch) or DALI's pipeline alike."""
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    for split in ("train2017", "val2017"):
        victim = sorted((data / split).iterdir())[0]
        victim.write_bytes(victim.read_bytes()[:3000])
    result = run("fit", "--data", data, "--save", tmp_path / "run", "--epochs", 1, "--bs", 4, "--backbone",
                 "resnet18", "--no-pretrained-backbone", "--data-backend", backend, "-j", 1)
    assert_one_line_error(result, "000001.jpg" if backend == "pytorch" else "1000000.jpg")


@pytest.mark.slow
def test_fit_one_epoch(shapes_dir, tmp_path):
    result = run("fit", "--data", shapes_dir, "--save", tmp_path, "--epochs", 1, "--bs", 8, "--backbone",
                 "resnet18", "--no-pretrained-backbone", "--data-backend", "dali", "-j", 1,
                 "--json-summary", tmp_path / "summary.json")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["mAP"] is not None
    assert (tmp_path / "epoch_0.pt").is_file()
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "epoch", "eval", "end"]


def test_export_stops_at_an_older_config_and_replaces_it_when_asked(tiny_checkpoint, tmp_path):
    from ssd_common import io
    from ssd_train.export import PACKAGE_REPOSITORY

    config = tmp_path / "repository" / io.MODEL_FP32 / "config.pbtxt"
    config.parent.mkdir(parents=True)
    older = (PACKAGE_REPOSITORY / io.MODEL_FP32 / "config.pbtxt").read_text().replace("[ -1, 200, 4 ]", "[ 4, 8732 ]")
    config.write_text(older)
    export = ("export", "--checkpoint", tiny_checkpoint, "--model-repository", config.parents[1], "--precision", "fp32")
    assert_one_line_error(run(*export), f"{config} declares output OUTPUT__0 as FP32 [4, 8732]", "--replace-configs")
    result = run(*export, "--replace-configs")
    assert result.exit_code == 0, result.output
    assert f"wrote {config}" in result.output
    assert config.with_name("config.pbtxt.previous").read_text() == older


def test_export_of_a_maskrcnn_checkpoint_writes_its_ensemble(tiny_maskrcnn_checkpoint, tmp_path):
    from ssd_common import io

    repository = tmp_path / "repository"
    result = run("export", "--checkpoint", tiny_maskrcnn_checkpoint, "--model-repository", repository)
    assert result.exit_code == 0, result.output
    assert f"wrote {repository / io.MASKRCNN_MODEL / '1' / io.TORCHSCRIPT_FILE}" in result.output
    assert json.loads((repository / io.MASKRCNN_PREPROCESS / "1" / io.RESIZE_FILE).read_text()) == {
        "min_size": 128, "max_size": 160}  # the checkpoint's sizes, for the DALI resize
    assert not (repository / io.ENSEMBLE).exists()  # only the exported detector's configs
    assert_one_line_error(run("export", "--checkpoint", tiny_maskrcnn_checkpoint, "--model-repository", repository,
                              "--precision", "fp16"), "Mask R-CNN exports fp32 only")
    assert_one_line_error(run("export", "--checkpoint", tiny_maskrcnn_checkpoint, "--model-repository", repository,
                              "--backbone", "resnet50"), "--backbone is an option of SSD300 checkpoints")


def test_a_maskrcnn_export_keeps_what_the_serving_threshold_and_cap_allow(tiny_maskrcnn_checkpoint, tiny_checkpoint,
                                                                          tmp_path):
    """--score-threshold 0.5 --detections-per-image 3: the served model gives the first three detections of
    the default export (0.05, 100) that score 0.5 or more: the same boxes, scores, labels and masks."""
    import torch

    from ssd_common import io
    from ssd_train.export import quiet_torch, sample_images
    from ssd_train.models.maskrcnn.export import preprocess
    from ssd_train.models.maskrcnn.inference import decode_image
    from ssd_train.models.maskrcnn.model import MaskRCNNSpec
    from ssd_train.serving.manifest import verify_repository

    outputs = {}
    for name, options in (("default", []), ("served", ["--score-threshold", "0.5", "--detections-per-image", "3"])):
        repository = tmp_path / name
        result = run("export", "--checkpoint", tiny_maskrcnn_checkpoint, "--model-repository", repository, *options)
        assert result.exit_code == 0, result.output
        with quiet_torch():
            model = torch.jit.load(str(repository / io.MASKRCNN_MODEL / "1" / io.TORCHSCRIPT_FILE))
        images = [decode_image(data) for data in sample_images()]
        with torch.no_grad():
            outputs[name] = model(*preprocess(images, MaskRCNNSpec("resnet18", min_size=128, max_size=160)))
    assert verify_repository(tmp_path / "served")["exports"]["maskrcnn"]["score_threshold"] == 0.5
    assert verify_repository(tmp_path / "default")["exports"]["maskrcnn"]["detections_per_image"] == 100

    boxes, scores, labels, masks, counts = outputs["default"]
    kept = 0
    for i in range(len(counts)):
        keep = (scores[i, :int(counts[i, 0])] >= 0.5).nonzero()[:3, 0]
        kept += len(keep)
        served = [t[i] for t in outputs["served"]]
        assert int(served[4][0]) == len(keep) and not served[1][len(keep):].any()  # zero padding after them
        for got, expected in zip(served[:4], (boxes[i], scores[i], labels[i], masks[i])):
            torch.testing.assert_close(got[:len(keep)], expected[keep])
    assert kept > 0 and int(counts.sum()) > kept  # the threshold and the cap did drop detections

    for options, message in ((["--score-threshold", "1.5"], "the score threshold must be in [0, 1)"),
                             (["--detections-per-image", "101"], "detections per image must be 1 to 100")):
        assert_one_line_error(run("export", "--checkpoint", tiny_maskrcnn_checkpoint, "--model-repository",
                                  tmp_path / "bad", *options), message)
    assert_one_line_error(run("export", "--checkpoint", tiny_checkpoint, "--model-repository", tmp_path / "ssd",
                              "--score-threshold", "0.5"), "are options of Mask R-CNN exports")
