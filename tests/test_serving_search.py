"""`tools/serving_search.py`: serving configuration chosen by measurement. Its choice rules, then one tiny
real search: a real CPU tritonserver, real perf_analyzer runs, the table and the config it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssd_common import io
from ssd_train.export import export_model_repository
from ssd_train.serving.served_repository import read_config

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
from serving_search import Setting, Trial, best, candidates, current_setting, with_setting  # noqa: E402


def trial(throughput: float, p99_ms: float, budget_ms: float = 100.0) -> Trial:
    return Trial("m", Setting(1, 0), throughput, p99_ms / 2, p99_ms, p99_ms <= budget_ms)


def test_the_winner_is_the_fastest_within_the_budget():
    fast_but_late, within, faster_within = trial(9.0, 150.0), trial(5.0, 90.0), trial(6.0, 99.0)
    assert best([fast_but_late, within, faster_within]) is faster_within
    assert best([fast_but_late]) is None


def test_candidates_cover_the_grid_within_the_max_batch():
    found = candidates([1, 2], [0, 500], [0, 4, 16], max_batch=8)
    assert len(found) == 2 * 2 * 2  # preferred: none or 4 (16 is above the max batch)
    assert Setting(2, 500, (4,)) in found and Setting(1, 0, ()) in found


def test_a_setting_round_trips_through_a_triton_config():
    config = {"name": "m", "max_batch_size": 8, "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
              "dynamic_batching": {"max_queue_delay_microseconds": 100}}
    changed = with_setting(config, Setting(3, 2000, (4,)))
    assert current_setting(changed) == Setting(3, 2000, (4,))
    assert changed["instance_group"][0]["kind"] == "KIND_CPU" and config["instance_group"][0]["count"] == 1


@pytest.mark.slow
def test_a_tiny_search_measures_each_candidate_and_writes_the_winner(tiny_checkpoint, tmp_path, monkeypatch):
    repository = tmp_path / "repository"
    export_model_repository(tiny_checkpoint, repository, precisions=["fp32"])
    # Relative paths, as in the README: perf_analyzer runs in OUTPUT_DIR/raw, its input data is OUTPUT_DIR's.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "search"
    proc = subprocess.run(
        [sys.executable, str(TOOLS / "serving_search.py"), "--model-repository", "repository",
         "--latency-budget-ms", "600000", "--steps", io.POSTPROCESS, "--instances", "1,2", "--delays-us", "0",
         "--concurrency", "2", "--measurement-request-count", "3", "--stability-percentage", "1000", "--max-trials", "3",
         "--output-dir", "search"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "serving_search.json").read_text())
    assert [t["setting"]["count"] for t in result["trials"]] == [1, 2]
    assert all(t["throughput"] > 0 and t["p99_ms"] >= t["p50_ms"] > 0 for t in result["trials"])
    winner = max(result["trials"], key=lambda t: t["throughput"])["setting"]
    assert result["winners"] == {io.POSTPROCESS: winner}
    table = (out / "serving_search.md").read_text()
    for t in result["trials"]:
        assert f"{t['throughput']:.2f}" in table
    written = read_config(out / "configs" / io.POSTPROCESS / "config.pbtxt")
    production = read_config(repository / io.POSTPROCESS / "config.pbtxt")
    assert written.instance_group[0].count == winner["count"]
    assert written.instance_group[0].kind == production.instance_group[0].kind  # the production kind, not CPU
    assert written.input == production.input and written.output == production.output
