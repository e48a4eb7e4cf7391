"""End to end: `ssd-train fit` learns, and `ssd-train evaluate` agrees with the mAP `fit` reported.

The check is the classic "overfit a few images": 8 generated images, no augmentation, evaluated on the
same images, 50 steps (about 90 s on 2 cores). An untrained model scores about 0.001 mAP on such images;
a model whose targets, loss, decoding or label map were wrong stays near 0 however long it trains (one
with BatchNorm statistics lagging its weights did: 0.007 here, hence --precise-bn), while this run
reaches about 0.2 mAP and 0.5 AP50. Thresholds of 0.1 mAP and 0.3 AP50 leave room for the randomness of
a short run yet are far beyond what a broken pipeline reaches.
"""

import json
import shutil

import pytest
from click.testing import CliRunner

from ssd_train.cli import cli
from ssd_train.data.shapes import make_shapes_dataset

MIN_MAP = 0.1
MIN_AP50 = 0.3


@pytest.mark.slow
def test_fit_learns_and_evaluate_agrees(tmp_path):
    data = make_shapes_dataset(tmp_path / "shapes", train=8, val=0, seed=3)
    shutil.rmtree(data / "val2017")
    shutil.copytree(data / "train2017", data / "val2017")
    shutil.copy(data / "annotations" / "instances_train2017.json", data / "annotations" / "instances_val2017.json")

    runner = CliRunner()
    result = runner.invoke(cli, [
        "fit", "--data", str(data), "--save", str(tmp_path / "run"), "--backbone", "resnet18",
        "--no-pretrained-backbone", "--epochs", "25", "--bs", "4", "--lr", "0.08", "--warmup", "4",
        "--multistep", "20", "--evaluation", "24", "--no-augment", "--precise-bn", "2", "--data-backend", "pytorch", "-j", "0",
        "--json-summary", str(tmp_path / "fit.json")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["mAP"] > MIN_MAP and fit["stats"]["AP50"] > MIN_AP50, fit["stats"]

    result = runner.invoke(cli, ["evaluate", "--data", str(data), "--checkpoint", fit["checkpoint"],
                                 "--data-backend", "pytorch", "-j", "0", "--json-summary", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["mAP"] == pytest.approx(fit["mAP"], abs=1e-6)
