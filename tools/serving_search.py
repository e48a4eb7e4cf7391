"""Serving configuration by measurement: for a latency budget, choose each ensemble step's instance count,
dynamic-batching delay and preferred batch sizes with perf_analyzer, and write the winning config.pbtxt
values with the table they were chosen from.

    python tools/serving_search.py --model-repository model_repository --ensemble ssd300 \
        --latency-budget-ms 500 --concurrency 8 --output-dir search_results

It starts its own server on the repository (`ssd-serve`'s TritonServer, explicit model control under a
random admin key, on free ports) and measures the ensemble with perf_analyzer for each candidate. The
search goes one step at a time (the TorchScript model first: it costs the most), each step's candidates
measured with the other steps at their best so far; only the step being tuned is reloaded, with its
candidate config. A candidate qualifies when its p99 latency is within the budget; the winner is the one
with the highest throughput among them (a step none qualifies for keeps its config). It writes:
- OUTPUT_DIR/serving_search.md: every measured candidate (throughput, p50, p99, within budget) and the
  winners; OUTPUT_DIR/serving_search.json: the same as data; OUTPUT_DIR/raw/: perf_analyzer's CSVs;
- OUTPUT_DIR/configs/<model>/config.pbtxt: the repository's own config of each tuned step with the
  winning values set (everything else, instance kinds included, as it was), to copy over
  model_repository/<model>/config.pbtxt.

The same command tunes a GPU host (the NGC container's server); on a CPU-only machine it runs the CPU
flavour, whose figures are for this machine only.
"""

from __future__ import annotations

import itertools
import json
import secrets
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import click
from google.protobuf import text_format

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules when run as a script

import perf_inputs  # noqa: E402
import perf_report  # noqa: E402
from perf_analyzer_env import PerfAnalyzerSetupError, locate  # noqa: E402
from perf_sweep import int_list  # noqa: E402

from ssd_common import io  # noqa: E402
from ssd_train.serving.served_repository import CONFIG_FILE, read_config  # noqa: E402
from ssd_train.serving.server import ADMIN_KEY_HEADER, ServeError, TritonServer  # noqa: E402

UNSTABLE_EXIT_CODE = 2  # perf_analyzer: "Failed to obtain stable measurement"


@dataclass(frozen=True)
class Setting:
    """What the search varies for one step: instances, batching delay, preferred batch sizes (() = none)."""

    count: int
    delay_us: int
    preferred: tuple[int, ...] = ()

    def describe(self) -> str:
        preferred = ",".join(map(str, self.preferred)) or "-"
        return f"{self.count} instance(s), delay {self.delay_us} us, preferred {preferred}"


@dataclass
class Trial:
    step: str  # the model tuned
    setting: Setting
    throughput: float  # images/s through the ensemble
    p50_ms: float
    p99_ms: float
    within_budget: bool


class SearchError(click.ClickException):
    """A one-line reason the search cannot go on."""


def current_setting(config: dict) -> Setting:
    """The setting a loaded model config (Triton's JSON) holds."""
    groups = config.get("instance_group") or [{}]
    batching = config.get("dynamic_batching") or {}
    return Setting(int(groups[0].get("count", 1)), int(batching.get("max_queue_delay_microseconds", 0)),
                   tuple(int(b) for b in batching.get("preferred_batch_size", [])))


def with_setting(config: dict, setting: Setting) -> dict:
    """A copy of `config` (Triton's JSON) with `setting` applied to its first instance group and batcher."""
    config = json.loads(json.dumps(config))
    groups = config.get("instance_group") or [{}]
    groups[0]["count"] = setting.count
    config["instance_group"] = groups
    batching = config.setdefault("dynamic_batching", {})
    batching["max_queue_delay_microseconds"] = setting.delay_us
    batching["preferred_batch_size"] = list(setting.preferred)
    return config


def candidates(counts: list[int], delays: list[int], preferred: list[int], max_batch: int) -> list[Setting]:
    """Every combination; a preferred size of 0 means none, sizes above the model's max batch are left out."""
    options = [()] if 0 in preferred or not preferred else []
    options += [(size,) for size in preferred if 0 < size <= max_batch]
    return [Setting(c, d, p) for c, d, p in itertools.product(counts, delays, options) if c > 0]


TORCHSCRIPT_MODELS = (io.MODEL_FP32, io.MODEL_FP16, io.MASKRCNN_MODEL)


def tunable_steps(ensemble_config: dict, configs: dict[str, dict]) -> list[str]:
    """The ensemble's steps that batch dynamically, the TorchScript model first."""
    steps = [step["model_name"] for step in ensemble_config["ensemble_scheduling"]["step"]]
    batching = [name for name in dict.fromkeys(steps) if "dynamic_batching" in configs[name]]
    return sorted(batching, key=lambda name: name not in TORCHSCRIPT_MODELS)


class Search:
    def __init__(self, server: TritonServer, admin_key: str, ensemble: str, perf_analyzer, input_data: Path,
                 raw_dir: Path, options: dict):
        import tritonclient.http as httpclient

        self.server, self.ensemble = server, ensemble
        self.client = httpclient.InferenceServerClient(server.http_url, network_timeout=600.0)
        self.headers = {ADMIN_KEY_HEADER: admin_key}
        self.pa, self.input_data, self.raw_dir, self.options = perf_analyzer, input_data, raw_dir, options
        self.runs = 0

    def config(self, model: str) -> dict:
        return self.client.get_model_config(model)

    def apply(self, model: str, config: dict, setting: Setting) -> None:
        """Reload `model` with `setting` (the ensemble keeps serving through it)."""
        self.client.load_model(model, headers=self.headers, config=json.dumps(with_setting(config, setting)))

    def measure(self, budget_ms: float, step: str, setting: Setting) -> Trial:
        self.runs += 1
        name = f"run{self.runs:03d}.csv"
        args = ["-m", self.ensemble, "-u", self.server.http_url, "-i", "http", "-b", str(self.options["batch_size"]),
                "--concurrency-range", str(self.options["concurrency"]), "--input-data", str(self.input_data),
                "--measurement-mode", "count_windows",
                "--measurement-request-count", str(self.options["measurement_request_count"]),
                "--stability-percentage", str(self.options["stability_percentage"]),
                "--max-trials", str(self.options["max_trials"]), "-f", name]
        proc = self.pa.run(args, self.raw_dir)
        log = self.raw_dir / (Path(name).stem + ".log")
        log.write_text(f"# {step}: {setting.describe()}\n$ perf_analyzer {shlex.join(proc.args[1:])}\n"
                       f"{proc.stdout}{proc.stderr}")
        if proc.returncode == UNSTABLE_EXIT_CODE:
            raise SearchError(f"unstable measurement of {step} with {setting.describe()}: raise "
                              f"--measurement-request-count or --stability-percentage; perf_analyzer's log: {log}")
        if proc.returncode != 0:
            raise SearchError(f"perf_analyzer failed (exit {proc.returncode}) on {step} with {setting.describe()}; "
                              f"its log: {log}")
        found = perf_report.read_measurement(self.raw_dir, name, "search", self.ensemble, self.options["batch_size"],
                                             self.options["concurrency"])
        p99_ms = found.p99_us / 1000
        return Trial(step, setting, found.throughput, found.p50_us / 1000, p99_ms, p99_ms <= budget_ms)


def best(trials: list[Trial]) -> Trial | None:
    within = [t for t in trials if t.within_budget]
    return max(within, key=lambda t: t.throughput) if within else None


def report(trials: list[Trial], winners: dict[str, Setting], baseline: Trial, meta: dict) -> str:
    header = ["Step tuned", "Instances", "Delay (us)", "Preferred batch", "Throughput (img/s)", "p50 (ms)", "p99 (ms)",
              "Within budget"]
    rows = [[f"`{t.step}`", str(t.setting.count), str(t.setting.delay_us), ",".join(map(str, t.setting.preferred)) or "-",
             f"{t.throughput:.2f}", f"{t.p50_ms:.0f}", f"{t.p99_ms:.0f}", "yes" if t.within_budget else "no"]
            for t in [baseline, *trials]]
    rows[0][:4] = ["(the repository's configs)", "", "", ""]
    chosen = "\n".join(f"- `{model}`: {setting.describe()}" for model, setting in winners.items()) or "- none"
    return (f"# Serving configuration search: `{meta['ensemble']}`\n\n"
            f"{meta['server']}; perf_analyzer over HTTP, batch {meta['batch_size']} per request, concurrency "
            f"{meta['concurrency']}, {meta['images']}. Latency budget: p99 <= {meta['budget_ms']:g} ms. Each step's "
            "candidates were measured with the steps before it at their winners and the rest as configured.\n\n"
            + perf_report.markdown_table(header, rows)
            + f"\n\nChosen (written to `configs/`):\n{chosen}\n")


def write_config(repository: Path, model: str, setting: Setting, out: Path, note: str) -> Path:
    """The repository's config of `model` with `setting` set, into OUTPUT_DIR/configs/<model>/config.pbtxt."""
    config = read_config(repository / model / CONFIG_FILE)
    if not config.instance_group:
        config.instance_group.add()
    config.instance_group[0].count = setting.count
    config.dynamic_batching.max_queue_delay_microseconds = setting.delay_us
    del config.dynamic_batching.preferred_batch_size[:]
    config.dynamic_batching.preferred_batch_size.extend(setting.preferred)
    path = out / "configs" / model / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Chosen by tools/serving_search.py: {note}\n" + text_format.MessageToString(config))
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model-repository", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default="model_repository", show_default=True, help="An exported repository (ssd-train export).")
@click.option("--ensemble", type=click.Choice(list(io.ENSEMBLES)), default=io.ENSEMBLE, show_default=True)
@click.option("--latency-budget-ms", type=click.FloatRange(min=0, min_open=True), required=True,
              help="p99 latency a configuration must keep, in milliseconds.")
@click.option("--steps", default=None, help="Comma-separated step models to tune [default: every step that batches "
                                            "dynamically but the image check (microseconds of CPU work), the "
                                            "TorchScript model first].")
@click.option("--instances", callback=int_list(1), default="1,2", show_default=True, help="Instance counts to try.")
@click.option("--delays-us", callback=int_list(0), default="0,2000", show_default=True,
              help="Dynamic batching max_queue_delay_microseconds values to try.")
@click.option("--preferred-batch-sizes", callback=int_list(0), default="0", show_default=True,
              help="Preferred batch sizes to try, one at a time (0: none).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Images per request.")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests in flight (the load the configuration is chosen for).")
@click.option("--images-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="JPEG/PNG files to send [default: scikit-image's sample photos].")
@click.option("--measurement-request-count", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--stability-percentage", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--max-trials", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--flavour", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True)
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default="serving_search",
              show_default=True)
def main(model_repository, ensemble, latency_budget_ms, steps, instances, delays_us, preferred_batch_sizes, batch_size,
         concurrency, images_dir, measurement_request_count, stability_percentage, max_trials, flavour, output_dir):
    """Choose instance counts and dynamic batching for each step of an ensemble within a latency budget."""
    raw_dir = output_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    try:
        pa = locate()
        images = (perf_inputs.directory_images(images_dir, 8) if images_dir else perf_inputs.default_photos())
        input_data = perf_inputs.write_input_data(output_dir / "input_jpeg.json", perf_inputs.encoded_image_data(images))
    except (PerfAnalyzerSetupError, perf_inputs.InputDataError) as err:
        raise SearchError(str(err)) from None
    options = {"batch_size": batch_size, "concurrency": concurrency, "max_trials": max_trials,
               "measurement_request_count": measurement_request_count, "stability_percentage": stability_percentage}
    admin_key = secrets.token_urlsafe(24)
    server = TritonServer(model_repository, http_port=0, grpc_port=0, metrics_port=0, flavour=flavour,
                          admin_key=admin_key)
    try:
        server.start()
    except ServeError as err:
        raise SearchError(str(err)) from None
    from tritonclient.utils import InferenceServerException

    try:
        if ensemble not in server.ensembles:
            raise SearchError(f"{model_repository} has no exported {ensemble} (served: {', '.join(server.ensembles)})")
        search = Search(server, admin_key, ensemble, pa, input_data, raw_dir, options)
        configs = {ensemble: search.config(ensemble)}
        configs.update({step["model_name"]: search.config(step["model_name"])
                        for step in configs[ensemble]["ensemble_scheduling"]["step"]})
        tunable = tunable_steps(configs[ensemble], configs)
        chosen_steps = [s.strip() for s in steps.split(",")] if steps else [s for s in tunable if s != io.VALIDATE]
        unknown = [s for s in chosen_steps if s not in tunable]
        if unknown:
            raise SearchError(f"{', '.join(unknown)}: not a dynamically batching step of {ensemble} "
                              f"(those are {', '.join(tunable)})")
        click.echo(f"{server.flavour} server on {model_repository}; tuning {', '.join(chosen_steps)} of {ensemble}",
                   err=True)
        baseline = search.measure(latency_budget_ms, "(as configured)", current_setting(configs[chosen_steps[0]]))
        trials: list[Trial] = []
        winners: dict[str, Setting] = {}
        for step in chosen_steps:
            tried = []
            for setting in candidates(instances, delays_us, preferred_batch_sizes, configs[step]["max_batch_size"]):
                search.apply(step, configs[step], setting)
                tried.append(search.measure(latency_budget_ms, step, setting))
                click.echo(f"  {step}: {setting.describe()}: {tried[-1].throughput:.2f} img/s, p99 "
                           f"{tried[-1].p99_ms:.0f} ms", err=True)
            trials += tried
            winner = best(tried)
            if winner is None:  # nothing qualified: the step keeps the repository's config
                search.client.load_model(step, headers=search.headers, config=json.dumps(configs[step]))
                click.echo(f"  {step}: no candidate within the budget, its config stays as it is", err=True)
                continue
            winners[step] = winner.setting
            search.apply(step, configs[step], winner.setting)
        meta = {"ensemble": ensemble, "budget_ms": latency_budget_ms, "batch_size": batch_size,
                "concurrency": concurrency, "server": f"Triton ({server.flavour} flavour)",
                "images": f"{len(images)} image(s): {', '.join(name for name, _ in images)}"}
    except InferenceServerException as err:  # a config the server refused, a model that failed to load
        raise SearchError(f"the server refused: {' '.join(str(err).split())[:300]}") from None
    finally:
        server.stop()
    (output_dir / "serving_search.md").write_text(report(trials, winners, baseline, meta))
    (output_dir / "serving_search.json").write_text(json.dumps(
        {**meta, "baseline": asdict(baseline), "trials": [asdict(t) for t in trials],
         "winners": {model: asdict(setting) for model, setting in winners.items()}}, indent=1))
    for model, setting in winners.items():
        write_config(model_repository, model, setting, output_dir,
                     f"p99 <= {latency_budget_ms:g} ms at concurrency {concurrency}, batch {batch_size}")
    click.echo(f"wrote {output_dir / 'serving_search.md'} and {output_dir / 'configs'}/")
    if not any(t.within_budget for t in trials):
        raise SearchError(f"no candidate kept p99 within {latency_budget_ms:g} ms (the table is in "
                          f"{output_dir / 'serving_search.md'}): raise the budget or lower --concurrency")


if __name__ == "__main__":
    main()
