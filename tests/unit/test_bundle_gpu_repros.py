"""scripts/bundle.py's pinned torch stack, and the GPU repros' bounded share of the GPU (issue 33)."""
import argparse
import importlib.util
import re
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bundle", ROOT / "scripts" / "bundle.py")
bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bundle)


def bundler(tmp_path, **kw):
    args = argparse.Namespace(out=str(tmp_path), python="3.12", platform="manylinux_x86_64", glibc=39,
                              vllm="0.33.0", have=["torch==2.11.0", "numpy"], have_file=None, skip=[],
                              constraint=[], no_default_skip=False, replace=[], pinned_stack=False)
    return bundle.Bundler(argparse.Namespace(**{**vars(args), **kw}))


def test_target_torch_is_left_out_unless_the_pinned_stack_is_asked(tmp_path, capsys):
    assert bundler(tmp_path).want(Requirement("torch==2.14.0"), "vllm") is None
    assert "--pinned-stack" in capsys.readouterr().err
    pinned = bundler(tmp_path, pinned_stack=True)
    assert pinned.want(Requirement("torch==2.14.0"), "vllm") == "torch"
    assert str(pinned.specs["torch"]) == "==2.14.0"
    assert pinned.want(Requirement("numpy"), "vllm") is None  # the rest of the target stays


def test_replace_bundles_a_package_the_target_has(tmp_path):
    assert bundler(tmp_path, replace=["numpy"]).want(Requirement("numpy>=2"), "vllm") == "numpy"


def test_repros_only_needs_no_project_dependencies():
    assert bundle.project_roots("0.33.0", repros_only=True) == ["gguf", "vllm==0.33.0"]


def test_every_gpu_repro_takes_a_bounded_share_of_the_gpu():
    scripts = sorted(ROOT.glob("repro/gpu_*/repro*.py"))
    assert len(scripts) >= 6
    for script in scripts:
        text = script.read_text()
        shares = [float(x) for x in re.findall(r"gpu_memory_utilization['\"]?\s*[=:]\s*([0-9.]+)", text)]
        assert shares and max(shares) <= 0.2, f"{script}: gpu_memory_utilization {shares}"
        assert "kv_cache_memory_bytes" in text, f"{script}: no explicit cache size"
