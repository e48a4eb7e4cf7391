"""The two distributions as users install them: the client (`pip install ./client`) in a fresh venv
without torch, and the toolkit from wheels (not editable: the model repository must come with the
package) exporting, serving and answering `ssd-client detect`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import skimage.data

from ssd_train.serving.server import TritonServer

ROOT = Path(__file__).resolve().parents[1]
PHOTO = Path(skimage.data.__file__).parent / "rocket.jpg"


def make_venv(path: Path, borrow_site_packages: bool = False) -> Path:
    """A new venv; with `borrow_site_packages`, this interpreter's third-party packages are importable
    there (a .pth line: torch, DALI and the bundled server are not installed a second time) -- but not
    the project's own packages, which this venv only has from what is installed into it (editable
    installs work through .pth hooks of their site directory, which a borrowed path does not run)."""
    venv.create(path, with_pip=True)
    python = path / "bin" / "python"
    if borrow_site_packages:
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def run(*command, env=None, cwd=None, timeout=900) -> str:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd)
    assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def venv_env(python: Path) -> dict:
    """The environment of a shell with that venv activated."""
    return {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(python.parent.parent)}


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    from ssd_train.export import export_model_repository

    repository = tmp_path_factory.mktemp("packaging") / "repository"
    export_model_repository(tiny_checkpoint, repository, precisions=["fp32"])
    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0) as server:
        yield server, repository


@pytest.mark.slow
def test_the_client_installs_alone_without_torch_and_detects(served, tmp_path):
    server, repository = served
    python = make_venv(tmp_path / "client-venv")
    run(python, "-m", "pip", "install", "--quiet", ROOT / "client", timeout=1200)
    installed = run(python, "-m", "pip", "list", "--format", "json")
    names = {package["name"].lower() for package in json.loads(installed)}
    assert "ssd300-client" in names
    assert not names & {"torch", "torchvision", "nvidia-dali-cuda120", "nvidia-pytriton", "ssd300-triton"}
    labels = repository / "ssd300_postprocess" / "1" / "labels.json"
    env = venv_env(python)
    out = run(python.parent / "ssd-client", "detect", PHOTO, "--url", server.grpc_url, "--protocol", "grpc",
              "--labels", labels, "--threshold", "0", "--json", env=env)
    found = [json.loads(line) for line in out.splitlines()]
    here = run(sys.executable, "-m", "ssd_client.cli", "detect", PHOTO, "--url", server.grpc_url, "--protocol",
               "grpc", "--labels", labels, "--threshold", "0", "--json")
    assert found and found == [json.loads(line) for line in here.splitlines()]


@pytest.mark.slow
def test_the_toolkit_works_from_wheels(tiny_checkpoint, tmp_path):
    # Built from a copy: setuptools builds in the source tree (build/), where a stale file would end up
    # in the wheel and the checkout would keep the leftovers.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__",
                                                                 "demo_run", "runs", "perf_results"))
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", wheels,
        source / "client", source)
    python = make_venv(tmp_path / "wheel-venv", borrow_site_packages=True)
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", *sorted(wheels.glob("*.whl")))
    env = venv_env(python)
    # Run outside the checkout: `python -c` would import the checkout's packages from the working directory.
    site = run(python, "-c", "import ssd_train, ssd_common, ssd_client; "
                             "print(ssd_train.__file__, ssd_common.__file__, ssd_client.__file__)", env=env, cwd=tmp_path)
    assert all(path.startswith(str(tmp_path / "wheel-venv")) for path in site.split()), site  # not the checkout

    repository = tmp_path / "repository"  # empty: export takes the configs from the installed package
    run(python.parent / "ssd-train", "export", "--checkpoint", tiny_checkpoint, "--model-repository", repository,
        "--precision", "fp32", env=env, cwd=tmp_path)
    assert (repository / "ssd300_validate" / "1" / "model.py").is_file()
    serve = subprocess.Popen([python.parent / "ssd-serve", "--model-repository", repository, "--http-port", "0",
                              "--grpc-port", "0", "--metrics-port", "0"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        lines = []
        for line in serve.stdout:
            lines.append(line)
            if "Ctrl-C to stop." in line:
                break
        http = next((line.split()[-1] for line in lines if line.strip().startswith("HTTP")), None)
        assert http, "".join(lines)
        out = run(python.parent / "ssd-client", "detect", PHOTO, "--url", http, "--threshold", "0", "--json",
                  "--labels", repository / "ssd300_postprocess" / "1" / "labels.json", env=env, cwd=tmp_path)
        assert len(out.splitlines()) > 0
    finally:
        serve.terminate()
        serve.wait(60)
