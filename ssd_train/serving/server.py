"""`ssd-serve`: run a real Triton Inference Server on the SSD300 model repository.

Two flavours of one repository:
- "gpu": the `tritonserver` on PATH with the dali, pytorch and python backends (the NGC container)
  serves the production repository as it is.
- "cpu": the `tritonserver` bundled with `nvidia-pytriton` (python backend only) serves the CPU
  flavour derived from it at launch (`served_repository.py`): DALI and TorchScript steps as python
  models running the same pipeline definition and the same `model.pt` on CPU.
"auto" (the default) picks "gpu" when that server, its backends and a GPU are there.

Safe by default (README "Reliability and security"):
- the repository must match the manifest its export wrote (`manifest.py`), or the server does not start;
- no client can load, unload or upload models (`--model-control-mode=none` over a derived repository
  holding just the models to serve), register shared memory, or change log and trace settings (those
  APIs are restricted to requests carrying an admin key header, a random one nobody knows), unless
  the operator sets `admin_key` (explicit model control, for requests with that key) or
  `allow_shared_memory`;
- image limits reach the ensemble's `ssd300_validate` step as config parameters;
- tritonserver runs under a watchdog process (`watchdog.py`): when the owner dies, even by SIGKILL,
  the server stops and the scratch directory goes.

Python API (stable: the tests, `ssd_client`'s tests and the perf tools start servers with it):

    from ssd_train.serving.server import ServeError, TritonServer

    with TritonServer("model_repository", http_port=0, grpc_port=0, metrics_port=0) as server:
        server.http_url      # "127.0.0.1:43121"  host:port, as tritonclient.http takes it
        server.grpc_url      # "127.0.0.1:43122"  host:port, as tritonclient.grpc takes it
        server.metrics_url   # "http://127.0.0.1:43123/metrics"
        server.flavour       # "gpu" or "cpu"
        server.models        # the models it loaded, the ensembles last
        server.ensembles     # the public models among them: "ssd300", "maskrcnn" (those exported)
    # leaving the block stops the server

    TritonServer(repository=DEFAULT_REPOSITORY, *, host="127.0.0.1", http_port=8000, grpc_port=8001,
                 metrics_port=8002, flavour="auto", startup_timeout=600.0, stop_timeout=20.0,
                 log_file=None, log_verbose=0, image_limits=None, allow_shared_memory=False,
                 admin_key=None, extra_args=())
                        image_limits: an image_check.ImageLimits (default: its defaults)
                        admin_key: requests carrying it (HTTP header `admin-key`, gRPC metadata
                            `triton-grpc-protocol-admin-key`) may load/unload models, register
                            shared memory and change log/trace settings
                        extra_args: more tritonserver options, e.g. ["--log-format=ISO8601"]
    .start() -> self    blocks until every model is ready; ServeError (with the log's last lines)
                        when the repository has no exported weights or does not match its manifest,
                        a port is taken, or the server dies or is not ready in time. Port 0 picks
                        a free port.
    .stop()             SIGTERM to the server's process group (its python stubs too), SIGKILL after
                        `stop_timeout` seconds (at once when interrupted again: a second Ctrl-C);
                        idempotent, also run at interpreter exit.
    .wait() -> int      blocks while the server runs; its exit code.
    .running -> bool,   .log_tail(lines=20) -> str (also after stop),
    .log_file -> Path   the server's log while it runs (kept after stop only when passed in)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from ssd_common import io
from ssd_train.serving import image_check
from ssd_train.serving.image_check import ImageLimits
from ssd_train.serving.manifest import ManifestError, verify_repository
from ssd_train.serving.served_repository import (CONFIG_FILE, EXPORTED_FILES, PACKAGE_REPOSITORY, VERSION,
                                                 ConfigError, derive_repository, model_kind, read_config)
from ssd_train.serving.watchdog import remove_leftovers

# The project's model repository (configs and model code in git, weights from `ssd-train export`).
DEFAULT_REPOSITORY = PACKAGE_REPOSITORY
FLAVOURS = ("auto", "gpu", "cpu")
PRODUCTION_BACKENDS = ("dali", "pytorch", "python")
# Management APIs closed to clients unless the operator opts in: model control (load, unload, upload
# of model code that then runs in the server), shared-memory registration, log and trace settings
# (which can name files the server writes).
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")
ADMIN_KEY_HEADER = "admin-key"  # HTTP header; gRPC clients send "triton-grpc-protocol-admin-key"
ADMIN_KEY_ENV = "SSD_SERVE_ADMIN_KEY"
# Log lines of no interest on a machine without a GPU.
_NOISE = ("CUDA driver version is insufficient", "NVML", "DCGM", "Unable to allocate pinned system memory",
          "cudaGetDeviceCount", "CudaDriverHelper")


class ServeError(RuntimeError):
    """The server cannot be started or has died."""


class TritonServer:
    def __init__(
        self,
        repository: str | Path = DEFAULT_REPOSITORY,
        *,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        flavour: str = "auto",
        startup_timeout: float = 600.0,
        stop_timeout: float = 20.0,
        log_file: str | Path | None = None,
        log_verbose: int = 0,
        image_limits: ImageLimits | None = None,
        allow_shared_memory: bool = False,
        admin_key: str | None = None,
        extra_args: Sequence[str] = (),
    ):
        if flavour not in FLAVOURS:
            raise ServeError(f"flavour must be one of {', '.join(FLAVOURS)}, not {flavour!r}")
        self.repository = Path(repository)
        self.host = host
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.requested_flavour = flavour
        self.flavour: str | None = None
        self.models: list[str] = []
        self.ensembles: list[str] = []  # the public models served (io.ENSEMBLES), once started
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._log_file = Path(log_file) if log_file else None
        self.log_verbose = int(log_verbose)
        self.image_limits = image_limits or ImageLimits()
        self.allow_shared_memory = allow_shared_memory
        if admin_key is not None and not admin_key.strip():
            raise ServeError("the admin key must not be empty")
        self.admin_key = admin_key
        self.extra_args = list(extra_args)
        # A prefix of our own: two servers on one machine must not share python-backend shm.
        self._shm_prefix = f"ssd-serve-{os.getpid()}-{id(self):x}-"
        self._scratch: Path | None = None
        self._process: subprocess.Popen | None = None
        self._saved_tail = ""  # the log's end, kept when its scratch directory is removed

    # -- addresses ------------------------------------------------------------------------------

    @property
    def _client_host(self) -> str:
        """Where a client on this machine reaches the server (a wildcard address is not one)."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"[{host}]" if ":" in host else host

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.ports['metrics']}/metrics"

    @property
    def log_file(self) -> Path | None:
        return self._log_file

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "TritonServer":
        if self._process is not None:
            raise ServeError("this server was already started")
        self.flavour = resolve_flavour(self.requested_flavour)
        self.ensembles = check_weights(self.repository, self.flavour)
        try:
            verify_repository(self.repository)
        except ManifestError as err:
            raise ServeError(str(err)) from None
        self._choose_ports()
        self._scratch = Path(tempfile.mkdtemp(prefix="ssd-serve-"))
        atexit.register(self.stop)
        try:
            command, env = self._command()
            if self._log_file is None:
                self._log_file = self._scratch / "tritonserver.log"
            watchdog = [sys.executable, "-m", "ssd_train.serving.watchdog", "--scratch", str(self._scratch),
                        "--shm-prefix", self._shm_prefix, "--stop-timeout", str(self.stop_timeout), "--", *command]
            with open(self._log_file, "ab") as log:
                # stdin: a pipe we never write to; the watchdog stops the server when it closes (we died).
                self._process = subprocess.Popen(watchdog, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                                 env=env, start_new_session=True)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        try:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)  # the watchdog stops the server's process group
                try:
                    process.wait(self.stop_timeout + 10)
                except (subprocess.TimeoutExpired, KeyboardInterrupt):  # stuck, or a second Ctrl-C
                    process.kill()  # the server dies with its watchdog (parent-death signal)
                    process.wait()
        finally:
            if process is not None and process.stdin is not None:
                process.stdin.close()
            remove_leftovers(None, self._shm_prefix)  # regions of a server that was killed
            if self._scratch is not None:
                if self._log_file is not None and self._log_file.is_relative_to(self._scratch):
                    self._saved_tail, self._log_file = _tail(self._log_file, 200), None
                shutil.rmtree(self._scratch, ignore_errors=True)
                self._scratch = None
            atexit.unregister(self.stop)

    def wait(self) -> int:
        if self._process is None:
            raise ServeError("the server is not running")
        return self._process.wait()

    def log_tail(self, lines: int = 20) -> str:
        """The server log's last lines (without the no-GPU noise), also after stop()."""
        if self._log_file is not None and self._log_file.exists():
            return _tail(self._log_file, lines)
        return "\n".join(self._saved_tail.splitlines()[-lines:])

    def log_errors(self, lines: int = 8) -> str:
        """The server log's last error-level lines, each cut to one screen line."""
        if self._log_file is None or not self._log_file.exists():
            return ""
        found = []
        for line in _tail(self._log_file, 10_000).splitlines():
            if re.match(r"E\d{4} ", line) or line.startswith("error:"):
                message = line.split("] ", 1)[-1].strip().strip('"').split("\\n")[0]
                if message not in found:
                    found.append(message[:240])
        return "\n".join(found[-lines:])

    # -- internals ------------------------------------------------------------------------------

    def _choose_ports(self) -> None:
        given = [port for port in self.ports.values() if port]
        if len(set(given)) != len(given):
            raise ServeError(f"the http, grpc and metrics ports must differ, got {self.ports}")
        for name, port in self.ports.items():
            if port and not _port_free(self.host, port):
                raise ServeError(f"port {port} on {self.host or '0.0.0.0'} is taken (--{name}-port): stop what "
                                 "uses it or pick another port")
        with contextlib.ExitStack() as held:  # hold each picked port until all are picked: no repeats
            for name, port in self.ports.items():
                if port == 0:
                    self.ports[name] = _bound_port(self.host, held)

    def _command(self) -> tuple[list[str], dict]:
        env = dict(os.environ)
        repository = self._scratch / "model_repository"
        try:
            if self.flavour == "gpu":
                binary, backends = production_server()
            else:
                binary, backends, env = cpu_server(self._scratch, env)
            # Only the models to serve, with the operator's limits: model control "none" loads them all.
            models = dict.fromkeys(name for ensemble in self.ensembles for name in io.ENSEMBLES[ensemble])
            self.models = derive_repository(self.repository, repository, self.flavour, models,
                                            parameters={io.VALIDATE: self.image_limits.as_parameters()})
        except ConfigError as err:
            raise ServeError(str(err)) from None
        command = [
            str(binary),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            *self._access_args(),
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
            f"--http-address={self.host}", f"--http-port={self.ports['http']}",
            f"--grpc-address={self.host}", f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.host}", f"--metrics-port={self.ports['metrics']}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
        ]
        if _supports_option(binary, "--http-max-input-size", env):  # newer Tritons: refuse bigger bodies unread
            command.append(f"--http-max-input-size={self.image_limits.max_request_bytes + 2**20}")
        command += self.extra_args
        if self.flavour == "cpu":
            # The derived configs are complete; auto-completion would start one more python stub per
            # model (importing torch) just to ask model.py for config changes.
            command.append("--disable-auto-complete-config")
        return command, env

    def _access_args(self) -> list[str]:
        """Model control and the restricted management APIs (module docstring). Without an admin key
        the server runs with model control "none", which refuses every load and unload, so the
        repository index (read-only) can stay open to clients."""
        restricted = [api for api in RESTRICTED_APIS if not (api == "shared-memory" and self.allow_shared_memory)]
        if self.admin_key is not None:
            control = ["--model-control-mode=explicit", *(f"--load-model={name}" for name in self.models)]
        else:
            control = ["--model-control-mode=none"]
            restricted.remove("model-repository")
        key = self.admin_key or secrets.token_urlsafe(32)
        rule = f"{','.join(restricted)}:{ADMIN_KEY_HEADER}={key}"
        return [*control, f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        ready_url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise ServeError(f"tritonserver exited with code {code} while starting; {self._log_summary()}")
            if _http_ok(ready_url):
                return
            time.sleep(0.5)
        raise ServeError(f"tritonserver was not ready after {self.startup_timeout:.0f} s; {self._log_summary()}")

    def _log_summary(self) -> str:
        """The server log's error lines (a failed model load says why there), else its end."""
        errors = self.log_errors()
        if errors:
            return "its log's errors:\n" + errors
        return "its log ends with:\n" + self.log_tail()


# ------------------------------------------------------------------------------------------------
# Which server, which models


def production_server() -> tuple[Path, Path] | None:
    """(tritonserver binary, backend directory) of a server with the dali, pytorch and python
    backends, or None."""
    binary = shutil.which("tritonserver")
    if binary is None:
        return None
    candidates = [os.environ.get("TRITON_BACKEND_DIRECTORY"), Path(binary).resolve().parent.parent / "backends",
                  "/opt/tritonserver/backends"]
    for directory in filter(None, candidates):
        if all((Path(directory) / backend).is_dir() for backend in PRODUCTION_BACKENDS):
            return Path(binary), Path(directory)
    return None


def gpu_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def resolve_flavour(flavour: str) -> str:
    if flavour == "cpu":
        return "cpu"
    production = production_server() is not None
    if flavour == "gpu":
        if not production:
            raise ServeError("--flavour gpu needs a tritonserver on PATH with the dali, pytorch and python backends "
                             "(the NGC tritonserver container); use --flavour cpu here")
        return "gpu"
    return "gpu" if production and gpu_visible() else "cpu"


def check_weights(repository: Path, flavour: str) -> list[str]:
    """The ensembles of `repository` that can be served: their configs are there and so are the weights
    their steps need (an ensemble export has not written is left out). ServeError when there is none."""
    present = [name for name in io.ENSEMBLES if (repository / name / CONFIG_FILE).is_file()]
    if not present:
        raise ServeError(f"{repository} is not a model repository of ours (no {io.ENSEMBLE}/{CONFIG_FILE} or "
                         f"{io.MASKRCNN_ENSEMBLE}/{CONFIG_FILE}): ssd-train export into it adds the configs")
    servable, missing = [], []
    for ensemble in present:
        missing_files = [f for f in needed_files(repository, ensemble, flavour) if not (repository / f).is_file()]
        missing += missing_files
        if not missing_files:
            servable.append(ensemble)
    if not servable:
        hint = " (the GPU ensemble runs fp16: --precision both)" if any(f.startswith(f"{io.MODEL_FP16}/")
                                                                        for f in missing) else ""
        raise ServeError(f"{repository} has no exported weights ({', '.join(missing)} missing): "
                         f"run ssd-train export first{hint}")
    return servable


def needed_files(repository: Path, ensemble: str, flavour: str) -> list[str]:
    """Repository-relative files export writes that `ensemble`'s steps need to be served."""
    try:
        config = read_config(repository / ensemble / CONFIG_FILE)
        steps = [step.model_name for step in config.ensemble_scheduling.step]
        if flavour == "cpu":  # the CPU flavour's ensemble runs fp32 (served_repository.py)
            steps = [io.MODEL_FP32 if s in (io.MODEL_FP32, io.MODEL_FP16) else s for s in steps]
        needed = []
        for step in steps:
            files = list(EXPORTED_FILES.get(step, ()))
            if model_kind(read_config(repository / step / CONFIG_FILE)) == "pytorch_libtorch":
                files.append(io.TORCHSCRIPT_FILE)
            needed += [f"{step}/{VERSION}/{file}" for file in files]
    except ConfigError as err:
        raise ServeError(str(err)) from None
    return needed


def cpu_server(scratch: Path, env: dict) -> tuple[Path, Path, dict]:
    """The tritonserver bundled with nvidia-pytriton, a backend directory with the python stub for
    this interpreter, and the environment the stub needs (RUNTIME.md)."""
    try:
        import pytriton
    except ImportError:
        raise ServeError("the CPU flavour needs the nvidia-pytriton package (its bundled tritonserver)") from None
    dist = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"nvidia-pytriton has no python backend stub for Python {version}")
    python_backend = scratch / "backends" / "python"
    python_backend.mkdir(parents=True)
    for item in (dist / "backends" / "python").iterdir():
        if item.is_file():
            os.symlink(item, python_backend / item.name)
    shutil.copy2(stub, python_backend / "triton_python_backend_stub")
    env = dict(env)
    libs = [sysconfig.get_config_var("LIBDIR"), str(dist.parent.parent / "nvidia_pytriton.libs"),
            env.get("LD_LIBRARY_PATH")]
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, libs))
    # The stub runs the first python3 on PATH: ours, which imports torch, DALI and ssd_train.
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    return dist / "bin" / "tritonserver", scratch / "backends", env


# ------------------------------------------------------------------------------------------------
# Small helpers


def _supports_option(binary: Path, option: str, env: dict) -> bool:
    """Whether `tritonserver --help` lists `option` (options come and go between releases)."""
    try:
        run = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.SubprocessError):
        return False
    return option in run.stdout + run.stderr


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _bound_port(host: str, stack: contextlib.ExitStack) -> int:
    """A free port, kept bound until `stack` closes."""
    sock = stack.enter_context(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET))
    sock.bind((host, 0))
    return sock.getsockname()[1]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, errors="replace") as f:
            kept = deque((line.rstrip("\n") for line in f if not any(n in line for n in _NOISE)), maxlen=lines)
    except OSError:
        return ""
    return "\n".join(kept)


# ------------------------------------------------------------------------------------------------
# ssd-serve


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv=None) -> None:
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--model-repository", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_REPOSITORY,
                  show_default=True, help="Model repository that `ssd-train export` wrote into.")
    @click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True,
                  help="0 picks a free port.")
    @click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True,
                  help="0 picks a free port.")
    @click.option("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True,
                  help="0 picks a free port.")
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address of all three endpoints (0.0.0.0 to serve other machines).")
    @click.option("--flavour", type=click.Choice(FLAVOURS), default="auto", show_default=True,
                  help="gpu: the production repository on the NGC server; cpu: the derived CPU flavour on "
                       "nvidia-pytriton's server; auto: gpu when that server and a GPU are there.")
    @click.option("--startup-timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
                  help="Seconds to wait for all models to load.")
    @click.option("--max-image-pixels", type=click.IntRange(min=1), default=image_check.MAX_IMAGE_PIXELS,
                  show_default=True, help="Largest image accepted, in pixels (read from the JPEG/PNG header, "
                  "before decoding).")
    @click.option("--max-image-bytes", type=click.IntRange(min=1), default=image_check.MAX_IMAGE_BYTES,
                  show_default=True, help="Largest encoded image accepted, in bytes.")
    @click.option("--max-request-bytes", type=click.IntRange(min=1), default=image_check.MAX_REQUEST_BYTES,
                  show_default=True, help="Largest IMAGE tensor per request (batch x padded length), in bytes.")
    @click.option("--allow-shared-memory", is_flag=True,
                  help="Let clients register system shared memory (ssd-client --shared-memory; same host only).")
    @click.option("--admin-key", envvar=ADMIN_KEY_ENV, default=None, metavar="KEY",
                  help=f"Let requests carrying this key (HTTP header '{ADMIN_KEY_HEADER}', gRPC metadata "
                       f"'triton-grpc-protocol-{ADMIN_KEY_HEADER}') load, unload and upload models, register "
                       f"shared memory and change log/trace settings [env {ADMIN_KEY_ENV}]. Off by default: "
                       "no client can.")
    @click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
                  help="Append the server's log here [default: a scratch file, shown when the server fails].")
    @click.option("--log-verbose", type=click.IntRange(min=0), default=0, show_default=True,
                  help="tritonserver's verbose logging level (1: every request).")
    @click.option("--triton-arg", "triton_args", multiple=True, metavar="OPTION",
                  help="An extra tritonserver option, e.g. --triton-arg=--log-format=ISO8601 (repeatable).")
    def serve(model_repository, http_port, grpc_port, metrics_port, host, flavour, startup_timeout, max_image_pixels,
              max_image_bytes, max_request_bytes, allow_shared_memory, admin_key, log_file, log_verbose, triton_args):
        """Serve the exported ensembles (SSD300, Mask R-CNN) with a real Triton Inference Server until Ctrl-C /
        SIGTERM."""
        limits = image_check.ImageLimits(max_image_pixels, max_image_bytes, max_request_bytes)
        try:
            server = TritonServer(model_repository, host=host, http_port=http_port, grpc_port=grpc_port,
                                  metrics_port=metrics_port, flavour=flavour, startup_timeout=startup_timeout,
                                  log_file=log_file, log_verbose=log_verbose, image_limits=limits,
                                  allow_shared_memory=allow_shared_memory, admin_key=admin_key,
                                  extra_args=triton_args)
        except ServeError as err:
            raise click.ClickException(str(err)) from None
        signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops like Ctrl-C does
        # Ctrl-C / SIGINT stops it even when started with SIGINT ignored (inherited from a parent that ignores
        # it, as shells do for background jobs): Python then installs no KeyboardInterrupt handler of its own.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            click.echo(f"starting tritonserver on {model_repository} ...", err=True)
            server.start()
            management = "with the admin key" if admin_key else "closed"
            click.echo(f"serving {', '.join(server.models)} ({server.flavour} flavour)\n"
                       f"  HTTP     {server.http_url}\n  gRPC     {server.grpc_url}\n"
                       f"  metrics  {server.metrics_url}\n  models   {', '.join(server.ensembles)}\n"
                       f"  limits   {limits.describe()}\n"
                       f"  admin    model control, logging, trace: {management}; shared memory: "
                       f"{'open' if allow_shared_memory else management}\n"
                       + (f"  log      {server.log_file}\n" if log_file else "")
                       + f"  status   ssd-client status --url {server.http_url}\n"
                       + "Ctrl-C to stop.")
            code = server.wait()
            raise ServeError(f"tritonserver exited with code {code}; its log ends with:\n{server.log_tail()}")
        except KeyboardInterrupt:
            click.echo("stopping ... (Ctrl-C again to stop at once)", err=True)
        except ServeError as err:
            raise click.ClickException(str(err)) from None
        finally:
            server.stop()

    serve.main(args=argv, prog_name="ssd-serve")
