"""REPORT.md's template (minimize/bug_report.py): its checks, on every curated report and on a rendered one."""
import io
import json
import urllib.error
from pathlib import Path

import pytest

from rollout_lab.minimize import bug_report
from rollout_lab.minimize.bug_report import BugReport, Upstream, problems, relative_paths, search_upstream, visible_lines

REPRO = Path(__file__).resolve().parents[2] / "repro"
CURATED = sorted(REPRO.glob("*/REPORT.md"))
ENV = "PyTorch version              : 2.13.0+cpu\nvLLM Version                 : 0.32.0\n[pip3] torch==2.13.0+cpu\n"
OUTPUT = """Traceback (most recent call last):
  File "/work/main/.venv/lib/python3.11/site-packages/vllm/v1/engine/llm_engine.py", line 3, in step
  File "/tmp/tmpab12/repro.py", line 9, in reproduce
IndexError: index 1 is out of bounds for dimension 0 with size 1
REPRODUCED: IndexError: index 1 is out of bounds"""


def rendered(**changes) -> str:
    fields = dict(title="[Bug]: IndexError in conv_ssm_forward with enable_prefix_caching=True (CPU)", environment=ENV,
                  summary="One sentence.", script="print('repro')\n", command="python -I repro.py", expected="it returns.",
                  actual="it raises.", output=OUTPUT, go_away=["enable_prefix_caching=False: clean 1/1"],
                  release_range="0.32.0 only.", upstream=Upstream("repo:vllm-project/vllm is:issue IndexError", None, "offline"))
    return BugReport(**(fields | changes)).render()


def test_there_are_curated_reports():
    assert len(CURATED) >= 7, CURATED


@pytest.mark.parametrize("path", CURATED, ids=lambda p: p.parent.name)
def test_every_curated_report_is_in_the_template(path):
    assert problems(path.read_text()) == []


def test_a_rendered_report_passes_and_keeps_the_whole_traceback_with_relative_paths():
    text = rendered()
    assert problems(text) == []
    assert '  File "vllm/v1/engine/llm_engine.py", line 3, in step' in text and '  File "repro.py", line 9' in text
    assert text.count("Traceback (most recent call last):") == 1 and "IndexError: index 1 is out of bounds for dimension" in text
    assert "Not run from here (offline): run it before filing." in text and "- [ ] Make sure" in text


@pytest.mark.parametrize("change,problem", [
    ({"title": "[Bug]: " + "x" * 100}, "title of 107 characters"),
    ({"title": "IndexError"}, "the first line is not"),
    ({"output": "Traceback (most recent call last):\n  File \"vllm/x.py\", line 1, in f\n"}, "a traceback without its exception line"),
    ({"notes": ["a note"] * 80}, "visible lines outside collapsed <details>"),
    ({"expected": ""}, "no one-line '- **Expected:**'"),
    ({"output": OUTPUT.split("\n", 1)[1]}, "a traceback without its head (cut)"),
])
def test_each_check_catches_what_it_names(change, problem):
    assert any(problem in p for p in problems(rendered(**change))), problems(rendered(**change))


def test_an_absolute_path_left_in_the_text_is_caught_but_urls_and_ratios_are_not():
    assert any(p.startswith("absolute paths") for p in problems(rendered(summary="see /home/me/x/repro.py")))
    assert problems(rendered(summary="https://github.com/vllm-project/vllm/pull/1 moved it by 3/18 tokens, w13/w2")) == []


def test_a_script_or_output_cut_to_its_last_lines_is_caught():
    assert "a cut output ('last lines')" in problems(rendered() + "\nIts output (last lines):\n")
    assert "the script more than once" in problems(rendered(summary="```python\nprint(1)\n```"))


def test_relative_paths_strip_venvs_temp_dirs_and_the_stdlib():
    text = ('File "/root/.pyenv/versions/3.11.7/lib/python3.11/runpy.py", /work/x/.venv/lib/python3.11/site-packages/torch/a.py '
            "/tmp/repro-model-x1/ and https://github.com/vllm-project/vllm/issues")
    assert relative_paths(text) == 'File "python3.11/runpy.py", torch/a.py <repro-model-x1>/ and https://github.com/vllm-project/vllm/issues'


def test_only_lines_outside_collapsed_details_are_visible():
    text = "a\n<details>\nhidden\n</details>\n<details open>\nshown\n</details>\nb"
    assert visible_lines(text) == ["a", "<details open>", "shown", "</details>", "b"]


def test_the_environment_summary_keeps_what_bears_on_an_engine_bug(tmp_path):
    env = ("Is CUDA available             : False\nFlags: fpu sse2 avx2 avx512f amx_bf16 sha_ni\n"
           "[pip3] transformers==5.19.0\n[pip3] pyzmq==27.3.0\nvLLM Version : 0.32.0\n")
    assert bug_report.environment_summary(env) == [
        "- Is CUDA available: `False`", "- CPU flags: `amx_bf16 avx2 avx512f`", "- vLLM Version: `0.32.0`",
        "- packages: `transformers==5.19.0`"]


def test_offline_the_search_keeps_its_query_and_says_why_it_did_not_run(monkeypatch):
    def unreachable(request, timeout):
        raise urllib.error.URLError("no route")

    monkeypatch.setattr(bug_report.urllib.request, "urlopen", unreachable)
    found = search_upstream("repo:vllm-project/vllm is:issue IndexError conv_ssm_forward", timeout=0.1)
    assert (found.hits, found.why_not) == (None, "GitHub not reachable from here: URLError")
    assert found.url() == "https://github.com/vllm-project/vllm/issues?q=repo%3Avllm-project%2Fvllm+is%3Aissue+IndexError+conv_ssm_forward"


def test_online_the_search_lists_what_githubs_api_found(monkeypatch):
    seen = []

    def answer(request, timeout):
        seen.append(request.full_url)
        return io.StringIO(json.dumps({"items": [{"number": 54504, "title": "mamba-cache-mode all crashes on CPU", "state": "open"}]}))

    monkeypatch.setattr(bug_report.urllib.request, "urlopen", answer)
    found = search_upstream("repo:vllm-project/vllm is:issue IndexError")
    assert found.hits == ["#54504 mamba-cache-mode all crashes on CPU (open)"]
    assert seen == ["https://api.github.com/search/issues?q=repo%3Avllm-project%2Fvllm+is%3Aissue+IndexError&per_page=5"]
    assert "- #54504 mamba-cache-mode all crashes on CPU (open)" in rendered(upstream=found)
