"""Check, before any load is sent, that the Triton server is up and serves the models to sweep (and,
for the Mask R-CNN comparison, ask it once how many detections it returns)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ssd_common import io


class ServerCheckError(RuntimeError):
    """The server is down, a model is not ready, or a batch size is over its limit (one line)."""


@dataclass
class ServerInfo:
    version: str
    configs: dict[str, dict] = field(default_factory=dict)

    def describe(self, model: str) -> str:
        """How a model is served: its instance kind, or an ensemble's steps."""
        config = self.configs.get(model, {})
        if self.steps(model):
            return "ensemble: " + " -> ".join(self.steps(model))
        kinds = sorted({g.get("kind", "KIND_AUTO") for g in config.get("instance_group", [])})
        return ", ".join(kinds) or "KIND_AUTO"

    def max_batch_size(self, model: str) -> int:
        return max(int(self.configs.get(model, {}).get("max_batch_size", 0)), 1)

    def on_cpu(self, model: str) -> bool:
        kinds = {g.get("kind") for g in self.configs.get(model, {}).get("instance_group", [])}
        return kinds == {"KIND_CPU"}

    def steps(self, model: str) -> list[str]:
        """An ensemble's composing models in step order (empty for other models)."""
        steps = self.configs.get(model, {}).get("ensemble_scheduling", {}).get("step", [])
        return [s.get("model_name", "?") for s in steps]


def _first_line(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:200]


def _module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def _client(url: str, protocol: str):
    return _module(protocol).InferenceServerClient(url)


def check_server(url: str, protocol: str, models: list[str], max_batch: int | None) -> ServerInfo:
    """`max_batch`: the largest batch size asked for, an error if a model takes less (None: no check)."""
    try:
        client = _client(url, protocol)
        live = client.is_server_live()
    except Exception as err:  # connection refused, DNS, wrong protocol on the port: all say "not up"
        raise ServerCheckError(
            f"no Triton server answers at {url} ({protocol}): {_first_line(err)}; start one (ssd-serve) "
            "or pass --url/--protocol"
        ) from None
    if not live:
        raise ServerCheckError(f"Triton server at {url} is not live")
    info = ServerInfo(version=_server_version(client, protocol))
    for model in models:
        try:
            ready = client.is_model_ready(model)
        except Exception as err:
            raise ServerCheckError(f"cannot query model {model} at {url}: {_first_line(err)}") from None
        if not ready:
            raise ServerCheckError(
                f"model {model} is not ready at {url} (models there: {_model_states(client, protocol)})"
            )
        config = client.get_model_config(model, as_json=True) if protocol == "grpc" else client.get_model_config(model)
        config = config.get("config", config)  # gRPC wraps it
        limit = int(config.get("max_batch_size", 0))
        if max_batch is not None and max_batch > max(limit, 1):
            raise ServerCheckError(
                f"batch size {max_batch} exceeds {model}'s max_batch_size {limit}: lower --batch-sizes"
            )
        info.configs[model] = config
    return info


def _server_version(client, protocol: str) -> str:
    meta = client.get_server_metadata(as_json=True) if protocol == "grpc" else client.get_server_metadata()
    return str(meta.get("version", "unknown"))


def _model_states(client, protocol: str) -> str:
    try:
        index = client.get_model_repository_index(as_json=True) if protocol == "grpc" \
            else client.get_model_repository_index()
    except Exception as err:
        return f"unknown: {_first_line(err)}"
    models = index.get("models", []) if isinstance(index, dict) else index
    return ", ".join(f"{m.get('name')} {m.get('state', 'UNKNOWN')}" for m in models) or "none"


def mean_detections(url: str, protocol: str, ensemble: str, images: list[bytes]) -> float:
    """The mean NUM_DETECTIONS the ensemble returns for `images`, one request each: what its steps
    after the model (and the model's mask head) had to handle."""
    module = _module(protocol)
    counts = []
    try:
        with _client(url, protocol) as client:
            for data in images:
                image = module.InferInput(io.IMAGE, [1, len(data)], "UINT8")
                image.set_data_from_numpy(np.frombuffer(data, np.uint8)[None])
                result = client.infer(ensemble, [image], outputs=[module.InferRequestedOutput(io.NUM_DETECTIONS)])
                counts.append(int(result.as_numpy(io.NUM_DETECTIONS)[0, 0]))
    except Exception as err:
        raise ServerCheckError(f"cannot count {ensemble}'s detections at {url}: {_first_line(err)}") from None
    return sum(counts) / len(counts)
