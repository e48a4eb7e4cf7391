"""Find a runnable `perf_analyzer` and the environment its subprocess needs.

Two places it comes from: the PATH (NGC `tritonserver:<yy.mm>-py3-sdk` container, everything
installed) or the `bin/` of this Python's environment (`tritonclient==2.51.0` wheels ship it). The
wheel's binary links two libraries a plain Debian machine may lack; both are fetched without root:
- `libcudart.so.12`: the `nvidia-cuda-runtime-cu12` pip package (a CUDA runtime works without a GPU);
- `libb64.so.0d`: Debian's `libb64-0d`, fetched with `apt-get download` and unpacked with `dpkg -x`
  into a cache directory (no root needed, nothing installed system-wide).
The library directories go on LD_LIBRARY_PATH of the perf_analyzer subprocess only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BINARY = "perf_analyzer"
CUDART = "libcudart.so.12"
LIBB64 = "libb64.so.0d"
LIBB64_DEB = "libb64-0d"


class PerfAnalyzerSetupError(RuntimeError):
    """perf_analyzer is missing or cannot be made to run (one-line message)."""


@dataclass
class PerfAnalyzer:
    path: Path
    library_dirs: list[Path] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """Environment for the perf_analyzer subprocess (LD_LIBRARY_PATH extended for it only)."""
        env = dict(os.environ)
        dirs = [str(d) for d in self.library_dirs]
        if env.get("LD_LIBRARY_PATH"):
            dirs.append(env["LD_LIBRARY_PATH"])
        if dirs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs)
        return env

    def run(self, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
        """perf_analyzer `args` run in `cwd` (where its relative `-f` CSVs land), output captured. An
        `--input-data` file named relative to this process's directory is passed as an absolute path:
        perf_analyzer opens it from `cwd`, and takes a name it cannot open there for a data kind
        ("Unsupported type provided"). `proc.args[1:]` are the arguments it ran with."""
        return subprocess.run([str(self.path), *absolute_input_data(args)], cwd=cwd, env=self.env(),
                              capture_output=True, text=True)

    def version(self) -> str:
        """"2.51.0" from "Perf Analyzer Version 2.51.0 (commit ...)"."""
        out = subprocess.run([str(self.path), "--version"], env=self.env(), capture_output=True, text=True)
        words = (out.stdout + out.stderr).split()
        return words[words.index("Version") + 1] if "Version" in words[:-1] else "unknown"


INPUT_DATA = "--input-data"
INPUT_DATA_KINDS = {"random", "zero"}  # perf_analyzer's built-in data, not files


def absolute_input_data(args: list[str]) -> list[str]:
    """`args` with each `--input-data` path (`--input-data PATH` or `--input-data=PATH`) made absolute."""
    def absolute(value: str) -> str:
        return value if value in INPUT_DATA_KINDS else str(Path(value).resolve())

    out = []
    for i, arg in enumerate(args):
        if i > 0 and args[i - 1] == INPUT_DATA:
            arg = absolute(arg)
        elif arg.startswith(INPUT_DATA + "="):
            arg = f"{INPUT_DATA}={absolute(arg.split('=', 1)[1])}"
        out.append(arg)
    return out


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ssd300-triton" / "perf_analyzer"


def find_binary(explicit: str | Path | None = None) -> Path:
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise PerfAnalyzerSetupError(f"{path} is not an executable perf_analyzer")
        return path
    on_path = shutil.which(BINARY)
    if on_path:
        return Path(on_path)
    # A venv's python may run without the venv being activated: look beside the interpreter.
    beside = Path(sys.executable).parent / BINARY
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    raise PerfAnalyzerSetupError(
        "perf_analyzer not found on PATH nor beside this Python: install tritonclient==2.51.0 "
        "(its wheel ships bin/perf_analyzer) or run in the NGC tritonserver SDK container"
    )


def missing_libraries(binary: Path, library_dirs: list[Path]) -> list[str]:
    """Shared libraries `ldd` cannot resolve for `binary` with `library_dirs` added."""
    if shutil.which("ldd") is None:
        return []  # cannot tell; running it will say
    env = PerfAnalyzer(binary, library_dirs).env()
    out = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True)
    return sorted(
        line.split("=>")[0].strip() for line in out.stdout.splitlines() if "not found" in line
    )


def find_cudart() -> Path:
    """The lib dir of the `nvidia-cuda-runtime-cu12` pip package, on any sys.path entry."""
    for entry in sys.path:
        lib = Path(entry or ".") / "nvidia" / "cuda_runtime" / "lib"
        if (lib / CUDART).is_file():
            return lib
    raise PerfAnalyzerSetupError(
        f"perf_analyzer needs {CUDART}: pip install nvidia-cuda-runtime-cu12 (works without a GPU)"
    )


def find_or_fetch_libb64(cache: Path) -> Path:
    """A directory holding libb64.so.0d: the cache, or Debian's package unpacked into it."""
    found = sorted(cache.glob(f"**/{LIBB64}"))
    if found:
        return found[0].parent
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise PerfAnalyzerSetupError(f"perf_analyzer needs {LIBB64}: install the {LIBB64_DEB} package")
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run(
            ["apt-get", "download", LIBB64_DEB], cwd=tmp, capture_output=True, text=True
        )
        debs = list(Path(tmp).glob(f"{LIBB64_DEB}_*.deb"))
        if fetched.returncode != 0 or not debs:
            reason = (fetched.stderr.strip().splitlines() or ["no .deb downloaded"])[-1]
            raise PerfAnalyzerSetupError(
                f"perf_analyzer needs {LIBB64}: `apt-get download {LIBB64_DEB}` failed ({reason}); "
                f"install {LIBB64_DEB}"
            )
        cache.mkdir(parents=True, exist_ok=True)
        unpacked = subprocess.run(["dpkg", "-x", str(debs[0]), str(cache)], capture_output=True, text=True)
        if unpacked.returncode != 0:
            raise PerfAnalyzerSetupError(f"cannot unpack {debs[0].name}: {unpacked.stderr.strip()}")
    found = sorted(cache.glob(f"**/{LIBB64}"))
    if not found:
        raise PerfAnalyzerSetupError(f"{LIBB64_DEB} unpacked into {cache} but holds no {LIBB64}")
    return found[0].parent


def locate(explicit: str | Path | None = None, cache: Path | None = None) -> PerfAnalyzer:
    """A perf_analyzer whose shared libraries all resolve (fetching the two known ones if needed)."""
    binary = find_binary(explicit)
    library_dirs: list[Path] = []
    missing = missing_libraries(binary, library_dirs)
    if CUDART in missing:
        library_dirs.append(find_cudart())
    if LIBB64 in missing:
        library_dirs.append(find_or_fetch_libb64(cache or cache_dir()))
    still = missing_libraries(binary, library_dirs) if missing else []
    if still:
        raise PerfAnalyzerSetupError(f"{binary} cannot run, missing shared libraries: {', '.join(still)}")
    return PerfAnalyzer(binary, library_dirs)
