"""deploy/: the Kubernetes manifests render with kustomize, every object validates against the
Kubernetes schemas (kubernetes-validate, offline), checkov's policies pass, and the objects agree with
each other and with ssd-serve (ports, probes, selectors, the HPA's metric, no opened admin APIs); the
PrometheusRule the HPA scales on, evaluated on a real server's /metrics, measures the queueing there.

kubectl, kubernetes-validate and checkov come from the machine and `make k8s-tools` (a venv of its
own: checkov's pins would move packages of the main venv)."""

from __future__ import annotations

import inspect
import io as bytes_io
import json
import re
import shutil
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from ssd_common import io
from ssd_train.serving.server import TritonServer

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TOOLS = ROOT / ".venv-k8s" / "bin"
OVERLAYS = ["overlays/gpu-cluster", "overlays/object-storage"]
PORTS = {name: inspect.signature(TritonServer).parameters[f"{name}_port"].default for name in ("http", "grpc", "metrics")}

kubectl = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(kubectl is None, reason="needs kubectl (its kustomize renders the manifests)")


def tool(name: str) -> str:
    path = TOOLS / name
    if not path.exists():
        pytest.skip(f"{name} is not installed: run `make k8s-tools`")
    return str(path)


def render(kustomization: str, tmp_path: Path) -> tuple[Path, list[dict]]:
    run = subprocess.run([kubectl, "kustomize", str(DEPLOY / kustomization)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    path = tmp_path / (kustomization.replace("/", "_") + ".yaml")
    path.write_text(run.stdout)
    return path, [doc for doc in yaml.safe_load_all(run.stdout) if doc]


# The shape of the recording rule's expression: one rate summed per pod over another, both `model=~` selected.
RULE = re.compile(r'sum by \(namespace, pod\) \(rate\((\w+)\{model=~"([^"]+)"\}\[1m\]\)\)\s*'
                  r'/ clamp_min\(sum by \(namespace, pod\) \(rate\((\w+)\{model=~"([^"]+)"\}\[1m\]\)\), 1e-9\)')
STEP_MODELS = [model for model in io.ALL_MODELS if model not in io.ENSEMBLES]


def queue_rule(objects: list[dict], record: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """The (metric, model regex) the PrometheusRule's `record` divides, numerator first."""
    (expression,) = [rule["expr"] for obj in objects if obj["kind"] == "PrometheusRule"
                     for group in obj["spec"]["groups"] for rule in group["rules"] if rule["record"] == record]
    found = RULE.fullmatch(expression.strip())
    assert found, expression
    return (found[1], found[2]), (found[3], found[4])


def selected(pattern: str, models) -> list[str]:
    """The models a PromQL `model=~pattern` matcher selects (its regex is anchored at both ends)."""
    return [model for model in models if re.fullmatch(pattern, model)]


def by_kind(objects: list[dict]) -> dict[str, dict]:
    kinds = {}
    for obj in objects:
        assert obj["kind"] not in kinds, f"two {obj['kind']} objects"
        kinds[obj["kind"]] = obj
    return kinds


@pytest.mark.parametrize("kustomization", ["base", *OVERLAYS])
def test_every_object_validates_against_the_kubernetes_schemas(kustomization, tmp_path):
    path, objects = render(kustomization, tmp_path)
    run = subprocess.run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", "1.31.0", str(path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    # Prometheus Operator objects have no schema there: each must at least have been looked at.
    validated = run.stdout.count(" passed for resource ")
    custom = [obj for obj in objects if obj["apiVersion"].startswith("monitoring.coreos.com/")]
    assert validated + len(custom) == len(objects)


@pytest.mark.parametrize("kustomization", OVERLAYS)
def test_checkov_policies_pass(kustomization, tmp_path):
    path, _ = render(kustomization, tmp_path)
    run = subprocess.run([tool("checkov"), "-f", str(path), "--framework", "kubernetes", "--skip-download",
                          "--output", "json", "--quiet"], capture_output=True, text=True, timeout=600)
    report = json.loads(run.stdout)
    failed = [(check["check_id"], check["resource"]) for check in report["results"]["failed_checks"]]
    assert not failed, failed
    assert report["summary"]["passed"] > 50  # it did look at the objects


@pytest.mark.parametrize("kustomization", OVERLAYS)
def test_the_objects_agree_with_each_other_and_with_ssd_serve(kustomization, tmp_path):
    _, objects = render(kustomization, tmp_path)
    kinds = by_kind([obj for obj in objects if obj["kind"] != "ConfigMap"])
    deployment, service, hpa = kinds["Deployment"], kinds["Service"], kinds["HorizontalPodAutoscaler"]
    pod = deployment["spec"]["template"]
    (server,) = [c for c in pod["spec"]["containers"] if c["name"] == "triton"]

    # ssd-serve with its defaults: management APIs closed, image limits on, every interface of the pod.
    args = server["args"]
    assert args[0] == "ssd-serve" and args[args.index("--host") + 1] == "0.0.0.0"
    assert not any(a.startswith(("--admin-key", "--allow-shared-memory", "--triton-arg")) for a in args)
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == PORTS
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        assert server[probe]["httpGet"] == {"path": path, "port": "http"}
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["securityContext"]["readOnlyRootFilesystem"] and pod["spec"]["securityContext"]["runAsNonRoot"]
    mounts = {m["mountPath"] for m in server["volumeMounts"]}
    assert {"/models", "/dev/shm", "/tmp"} <= mounts
    assert {"name": "TMPDIR", "value": next(m for m in mounts if m not in {"/models", "/dev/shm", "/tmp"})} in server["env"]

    # The Service reaches these pods on those ports; Prometheus scrapes the metrics port.
    pod_labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == PORTS
    monitor = kinds["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]

    # The HPA scales this Deployment on the series the PrometheusRule records from Triton's counters.
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    records = [rule["record"] for group in kinds["PrometheusRule"]["spec"]["groups"] for rule in group["rules"]]
    assert metric["pods"]["metric"]["name"] in records
    # ... the queue time of every step model per request of every ensemble a repository may hold
    # (test_the_queue_time_rule_measures_the_queueing_of_a_real_server evaluates it on a real server)
    (queued, steps), (requests, ensembles) = queue_rule(objects, metric["pods"]["metric"]["name"])
    assert (queued, requests) == ("nv_inference_queue_duration_us", "nv_inference_request_success")
    assert selected(steps, io.ALL_MODELS) == STEP_MODELS
    assert selected(ensembles, io.ALL_MODELS) == list(io.ENSEMBLES)
    assert 1 < hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    # Every object in the overlay's namespace.
    assert {obj["metadata"].get("namespace") for obj in objects if obj["kind"] != "Namespace"} == {"ssd300"}


def test_object_storage_fetches_the_repository_before_the_server_starts(tmp_path):
    _, objects = render("overlays/object-storage", tmp_path)
    deployment = next(obj for obj in objects if obj["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (fetch,) = spec["initContainers"]
    assert "aws s3 sync" in " ".join(fetch["command"])
    assert {"name": "model-repository", "mountPath": "/models"} in fetch["volumeMounts"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["model-repository"] and "persistentVolumeClaim" not in volumes["model-repository"]
    assert not [obj for obj in objects if obj["kind"] == "PersistentVolumeClaim"]


def jpeg(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = bytes_io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.slow
def test_the_queue_time_rule_measures_the_queueing_of_a_real_server(tiny_checkpoint, tiny_maskrcnn_checkpoint,
                                                                     tmp_path):
    """Requests of both ensembles, 8 in flight on a CPU server with one instance per model: they queue. The
    recording rule's expression, evaluated on the server's /metrics, is that queueing per ensemble request,
    as `ssd-client status` reports it for the steps; the ensembles' own queue time is next to nothing."""
    import skimage.data
    import tritonclient.http as httpclient

    from ssd_client.status import server_status
    from ssd_train.export import export_model_repository

    _, objects = render("overlays/gpu-cluster", tmp_path)
    (queued, steps), (requests, ensembles) = queue_rule(objects, "ssd300_queue_time_us")
    repository = tmp_path / "repository"
    export_model_repository(tiny_checkpoint, repository, precisions=["fp32"])
    export_model_repository(tiny_maskrcnn_checkpoint, repository, precisions=["fp32"])
    photo = np.frombuffer(jpeg(skimage.data.chelsea()), np.uint8)[None]

    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, flavour="cpu") as server:
        def infer(ensemble: str) -> None:
            with httpclient.InferenceServerClient(server.http_url) as client:
                image = httpclient.InferInput(io.IMAGE, list(photo.shape), "UINT8")
                image.set_data_from_numpy(photo)
                client.infer(ensemble, [image])

        sent = [ensemble for _ in range(12) for ensemble in io.ENSEMBLES]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(infer, sent))
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            metrics = response.read().decode()
        status = {row["model"]: row for row in server_status(server.http_url)["models"]}

    counters: dict[tuple[str, str], float] = {}
    for name, model, value in re.findall(r'^(\w+)\{[^}]*\bmodel="([^"]+)"[^}]*\} (\S+)$', metrics, re.MULTILINE):
        counters[name, model] = counters.get((name, model), 0.0) + float(value)

    def total(metric: str, pattern: str) -> float:
        return sum(value for (name, model), value in counters.items()
                   if name == metric and re.fullmatch(pattern, model))

    # Counters from the server's start (no other traffic): rate over rate is the ratio of the increases.
    assert total(requests, ensembles) == len(sent)
    signal_ms = total(queued, steps) / total(requests, ensembles) / 1000
    ensembles_alone_ms = total(queued, ensembles) / total(requests, ensembles) / 1000  # the rule before
    steps_ms = sum(status[m]["queue_ms"] * status[m]["requests"] for m in STEP_MODELS if m in status) / sum(
        status[e]["requests"] for e in io.ENSEMBLES)
    print(f"queue ms per ensemble request: rule {signal_ms:.1f}, ssd-client status' steps {steps_ms:.1f}, "
          f"the ensembles' own {ensembles_alone_ms:.4f}")
    assert signal_ms > 1.0  # 8 requests in flight for one instance of each step
    assert signal_ms == pytest.approx(steps_ms, rel=0.01)
    assert ensembles_alone_ms < signal_ms / 100
