"""Client-side balancing against two real local servers: requests alternate between them, answers equal
one server's, and when one server goes away the other answers everything."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import skimage.data
from click.testing import CliRunner

from ssd_client import SSDClient
from ssd_client.balance import BalancedAsyncSSDClient, BalancedSSDClient, open_client, split_urls
from ssd_client.cli import cli
from ssd_train.export import export_model_repository
from ssd_train.serving.server import TritonServer

DATA_DIR = Path(skimage.data.__file__).parent
PHOTOS = [DATA_DIR / "rocket.jpg", DATA_DIR / "astronaut.png", DATA_DIR / "coffee.png", DATA_DIR / "chelsea.png"]


def test_urls_split_on_commas():
    assert split_urls(None) == [None]
    assert split_urls("a:1") == ["a:1"]
    assert split_urls(" a:1, b:2 ,") == ["a:1", "b:2"]
    assert split_urls(["a:1", "b:2,c:3"]) == ["a:1", "b:2", "c:3"]


@pytest.fixture(scope="module")
def two_servers(tiny_checkpoint, tmp_path_factory):
    repository = tmp_path_factory.mktemp("balance") / "repository"
    export_model_repository(tiny_checkpoint, repository, precisions=["fp32"])
    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0) as first, \
            TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0) as second:
        yield first, second, repository / "ssd300_postprocess" / "1" / "labels.json"


def answered(stats: dict) -> int:
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def settled(client) -> dict:
    """{url: requests answered} once the counts hold still: a server counts a request just after it answers."""
    now = {url: answered(stats) for url, stats in client.statistics().items()}
    while True:
        time.sleep(0.3)
        now, previous = {url: answered(stats) for url, stats in client.statistics().items()}, now
        if now == previous:
            return now


def same(found, expected):
    assert [[(d.category_id, round(d.score, 4)) for d in image] for image in found] == \
        [[(d.category_id, round(d.score, 4)) for d in image] for image in expected]


@pytest.mark.slow
def test_requests_alternate_between_servers_and_answers_agree(two_servers):
    first, second, labels = two_servers
    with SSDClient(first.http_url, label_map=labels) as single:
        expected = single.detect(PHOTOS)
    urls = f"{first.http_url},{second.http_url}"
    with open_client(urls, label_map=labels, batch_size=1) as client:
        assert isinstance(client, BalancedSSDClient)
        before = settled(client)  # the request above counted
        same(client.detect(PHOTOS), expected)
        after = settled(client)
    assert [after[url] - before[url] for url in (first.http_url, second.http_url)] == [2, 2]

    async def run():
        async with BalancedAsyncSSDClient([first.grpc_url, second.grpc_url], protocol="grpc", label_map=labels,
                                          batch_size=1, concurrency=2) as client:
            return await client.detect(PHOTOS)

    same(asyncio.run(run()), expected)


@pytest.mark.slow
def test_the_cli_spreads_over_several_urls(two_servers, shapes_dir, tmp_path):
    first, second, labels = two_servers
    runner = CliRunner()
    urls = f"{first.grpc_url},{second.grpc_url}"
    result = runner.invoke(cli, ["detect", *map(str, PHOTOS[:2]), "--url", urls, "--protocol", "grpc",
                                 "--labels", str(labels), "--json", "--threshold", "0"])
    assert result.exit_code == 0, result.output
    assert {json.loads(line)["image"] for line in result.output.splitlines()} == {str(p) for p in PHOTOS[:2]}
    summaries = []
    for url in (first.grpc_url, urls):
        out = tmp_path / f"{len(summaries)}.json"
        result = runner.invoke(cli, ["evaluate", "--data", str(shapes_dir), "--url", url, "--protocol", "grpc",
                                     "--batch-size", "2", "--json-summary", str(out), "--no-progress"])
        assert result.exit_code == 0, result.output
        summaries.append(json.loads(out.read_text()))
    stats = ("mAP", "AP50", "AR100")
    assert [summaries[1][k] for k in stats] == pytest.approx([summaries[0][k] for k in stats], abs=1e-3)
    assert summaries[1]["url"] == urls


@pytest.mark.slow
def test_a_server_that_goes_away_is_skipped(two_servers):
    """Last in the module: it stops the second server."""
    first, second, labels = two_servers
    with SSDClient(first.http_url, label_map=labels) as single:
        expected = single.detect(PHOTOS)
    with BalancedSSDClient([first.http_url, second.http_url], label_map=labels, batch_size=1, retries=0) as client:
        second.stop()
        same(client.detect(PHOTOS), expected)  # every request the second server would have had went to the first
