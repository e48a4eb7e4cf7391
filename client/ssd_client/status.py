"""`ssd-client status`: what a Triton server says about itself and each model it holds -- state, and since
the server started: requests, images, batches (so whether dynamic batching batches) and the mean time a
request spends queued, computing and in all. The ensembles and their steps alike; one statistics call.

Triton's statistics, per model: `success` counts requests and their whole time, `queue` and `compute_*`
the time each request spent waiting and in the model (a batch's time counts for each request in it);
`inference_count` counts images, `execution_count` the batches the model ran."""

from __future__ import annotations

from ssd_client import protocol as wire
from ssd_client.errors import InferenceError

# (key of a model's row, its column's heading)
COLUMNS = (("model", "model"), ("state", "state"), ("requests", "requests"), ("failed", "failed"),
           ("images", "images"), ("batches", "batches"), ("images_per_batch", "images/batch"),
           ("queue_ms", "queue ms"), ("compute_ms", "compute ms"), ("request_ms", "request ms"))
READING_STATISTICS = "reading statistics"


def server_status(url: str | None = None, protocol: str = "http", timeout: float = wire.DEFAULT_TIMEOUT) -> dict:
    """{"url", "protocol", "server" (name), "version", "live", "ready", "models": [model_row...]} of the
    server at `url`; an `SSDClientError` (one line) when it cannot be asked. A server that restricts the
    statistics API gives the models without their figures."""
    protocol = wire.check_protocol(protocol)
    url = wire.normalise_url(url, protocol)
    tc = wire.tritonclient_module(protocol)
    calls = wire.infer_kwargs(protocol, timeout)
    options = {**wire.json_kwargs(protocol), **calls}

    def ask(action, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if action == READING_STATISTICS and wire.restricted(err):
                return {}  # the states still say much
            raise wire.server_error(err, url, protocol, action) from None

    client = ask("connecting", wire.make_client, tc, protocol, url, timeout, wire.RetryPolicy(0))
    try:
        live = ask("checking liveness", client.is_server_live, **calls)
        ready = ask("checking readiness", client.is_server_ready, **calls)
        metadata = ask("reading server metadata", client.get_server_metadata, **options)
        index = ask("listing models", client.get_model_repository_index, **options)
        statistics = ask(READING_STATISTICS, client.get_inference_statistics, "", **options)
    finally:
        client.close()
    try:
        entries = index.get("models", []) if isinstance(index, dict) else index
        stats = {(s["name"], str(s.get("version", ""))): s for s in statistics.get("model_stats", [])}
        models = [model_row(entry, stats.get((entry.get("name"), str(entry.get("version", "")))))
                  for entry in entries]
        server, version = metadata.get("name", ""), metadata.get("version", "")
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # not a Triton server's answers
        raise InferenceError(f"the server at {url} ({protocol}) answered what a Triton server does not "
                             f"({type(err).__name__}: {err})") from None
    return {"url": url, "protocol": protocol, "server": server, "version": version, "live": bool(live),
            "ready": bool(ready), "models": sorted(models, key=lambda row: row["model"])}


def model_row(entry: dict, stats: dict | None) -> dict:
    """One model of the repository index and its statistics (None: none to give) -> its row (COLUMNS).
    gRPC writes int64 as strings, HTTP as numbers: both are read."""
    row = {"model": entry.get("name", ""), "version": str(entry.get("version", "")),
           "state": entry.get("state", "") or "UNKNOWN"}
    if not stats:
        return row
    inference = stats.get("inference_stats", {})

    def count(key):
        return int(inference.get(key, {}).get("count", 0))

    def mean_ms(*keys):
        requests = count("success")
        total = sum(int(inference.get(key, {}).get("ns", 0)) for key in keys)
        return round(total / requests / 1e6, 3) if requests else None

    images, batches = int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))
    row.update({"requests": count("success"), "failed": count("fail"), "images": images, "batches": batches,
                "images_per_batch": round(images / batches, 2) if batches else None,
                "queue_ms": mean_ms("queue"),
                "compute_ms": mean_ms("compute_input", "compute_infer", "compute_output"),
                "request_ms": mean_ms("success")})
    return row


def format_status(status: dict) -> str:
    """A header line and the models as an aligned table."""
    state = ", ".join(word if status[word] else f"not {word}" for word in ("live", "ready"))
    lines = [f"{status['server']} {status['version']} at {status['url']} ({status['protocol']}): {state}"]
    headings = [heading for _, heading in COLUMNS]
    rows = [[_cell(row.get(key)) for key, _ in COLUMNS] for row in status["models"]]
    widths = [max(len(text) for text in column) for column in zip(headings, *rows)]
    for cells in (headings, *rows):
        lines.append("  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(cells, widths))).rstrip())
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else str(value)
