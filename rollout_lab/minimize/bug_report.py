"""REPORT.md in vLLM's bug template: the one place its wording lives, its checks, and the upstream search.

    BugReport (title, environment, script, expected/actual, output, flips, range, upstream) -> render() -> REPORT.md
    REPORT.md -> problems() -> what a maintainer would bounce it for (the unit test runs it on every report)

vLLM's template (.github/ISSUE_TEMPLATE/400-bug-report.yml) has three parts: "Your current
environment" (collect_env in <details>), "🐛 Describe the bug" (a minimal script, what happens
instead of what was expected, the full traceback) and the "searched for relevant issues" box.
Long material (the full collect_env, the script, the full output) sits in collapsed <details>
blocks; what stays visible fits VISIBLE_LINES.
"""
from __future__ import annotations

import json
import re
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

TITLE_PREFIX = "[Bug]: "
MAX_TITLE = 100
# Lines a maintainer sees without opening a collapsed <details> block.
VISIBLE_LINES = 80
SECTIONS = ("### Your current environment", "### 🐛 Describe the bug", "### What makes it go away",
            "### Release range", "### Related upstream", "### Before submitting a new issue...")
ISSUES_URL = "https://github.com/vllm-project/vllm/issues"
SEARCH_API = "https://api.github.com/search/issues"
# The collect_env lines that bear on an engine bug, by their key (the text before " : " or ":").
ENV_KEYS = ("vLLM Version", "PyTorch version", "CUDA used to build PyTorch", "Is CUDA available", "CUDA runtime version",
            "GPU models and configuration", "Nvidia driver version", "Python version", "OS", "Model name")
ENV_PACKAGES = ("torch", "transformers", "triton", "flashinfer-python", "numpy", "intel-openmp", "intel_extension_for_pytorch")
# CPU flags vLLM's CPU kernels dispatch on (csrc/cpu: AVX2, AVX-512, AMX; NEON on Arm).
CPU_FLAGS = re.compile(r"^(avx2|avx512\w*|amx\w*|neon|asimd)$")
# An absolute filesystem path (not a URL's path: no ':' or '/' or a word character right before it).
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.<~-])/(?:[\w.+@-]+/)+[\w.+@-]*")
TRACEBACK_HEAD = "Traceback (most recent call last):"
# A progress bar's line (tqdm: "... 1/1 [00:00<00:00,  1.04it/s]").
PROGRESS_LINE = re.compile(r"(it/s|s/it)\]$")
# A line of vLLM's logger ("(EngineCore pid=1) INFO 12-07 09:35:40 [core.py:9] ..."): the engine's chatter, not
# the script's output; a maintainer reruns with VLLM_LOGGING_LEVEL=DEBUG for it.
LOG_LINE = re.compile(r"^(\(\w+ pid=\d+\) )?(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d ")


@dataclass
class Upstream:
    """What searching vLLM's issues found: the query, and the hits (None: the search did not run)."""

    query: str
    hits: Optional[list[str]] = None
    # Why the search did not run, when it did not ("GitHub not reachable from here: ...").
    why_not: str = ""
    # A person's verdict after reading the threads: "duplicate of #N", "related to #N", "new".
    verdict: str = ""

    def url(self) -> str:
        return f"{ISSUES_URL}?q={urllib.parse.quote_plus(self.query)}"


@dataclass
class BugReport:
    """Everything REPORT.md states; render() words it."""

    title: str
    # collect_env's full output (in <details>) and the lines of it that bear on the bug (visible).
    environment: str
    summary: str
    script: str
    command: str
    expected: str
    actual: str
    # What the command printed, the full traceback included (paths relative: relative_paths()).
    output: str
    # Each kept knob flipped, with the outcome measured ("max_num_batched_tokens default: NOT REPRODUCED 1/1").
    go_away: list[str]
    release_range: str
    upstream: Upstream
    # Set when the case is not the minimal one (the budget ran out): why, and the report is a DRAFT.
    draft: str = ""
    # Facts a maintainer needs beside the above (where it fails, how it was found); a line each.
    notes: list[str] = field(default_factory=list)
    # How many of the output's last lines at the margin show outside <details> (the exception, the verdict).
    shown_output_lines: int = 3

    def render(self) -> str:
        """REPORT.md."""
        output = script_output(self.output)
        # The last lines at the margin: the exception and the verdict (the frames are in the full output).
        shown = [line for line in output.splitlines() if line and not line[0].isspace() and line != TRACEBACK_HEAD
                 and not PROGRESS_LINE.search(line)][-self.shown_output_lines:]
        lines = [f"# {self.title}", ""]
        if self.draft:
            lines += [f"> **DRAFT, not ready to file**: {self.draft}", ""]
        lines += ["### Your current environment", "", *environment_summary(self.environment), "",
                  "<details>", "<summary>The output of <code>python collect_env.py</code></summary>", "",
                  "```text", relative_paths(self.environment).strip("\n"), "```", "", "</details>", "",
                  "### 🐛 Describe the bug", "", textwrap.fill(self.summary, 100), "",
                  f"- **Expected:** {self.expected}", f"- **Actual:** {self.actual}", "",
                  f"`{self.command}` (in an empty directory; the script builds or names its model):", "",
                  "<details>", f"<summary>repro.py ({len(self.script.splitlines())} lines)</summary>", "",
                  "```python", self.script.rstrip("\n"), "```", "", "</details>", "",
                  "Its output ends with:", "", "```text", *shown, "```", "",
                  "<details>", "<summary>Full output, traceback included</summary>", "",
                  "```text", output, "```", "", "</details>", ""]
        if self.notes:
            lines += [*(f"- {note}" for note in self.notes), ""]
        lines += ["### What makes it go away", "", *(f"- {flip}" for flip in self.go_away or ["(nothing measured)"]), "",
                  "### Release range", "", self.release_range, "",
                  "### Related upstream", "", *upstream_lines(self.upstream), "",
                  "### Before submitting a new issue...", "",
                  f"- [{'x' if self.upstream.hits is not None or self.upstream.verdict else ' '}] "
                  "Make sure you already searched for relevant issues (the search above).", ""]
        return "\n".join(lines)


def script_output(text: str) -> str:
    """What a repro printed, paths relative, vLLM's log lines left out (counted); the traceback stays whole."""
    lines = relative_paths(text).rstrip("\n").splitlines()
    kept = [line for line in lines if not LOG_LINE.match(line)]
    dropped = len(lines) - len(kept)
    return "\n".join(([f"({dropped} lines of vLLM's log left out)"] if dropped else []) + kept)


def upstream_lines(upstream: Upstream) -> list[str]:
    """The "Related upstream" section: the verdict, the query, and what the search found or why it did not run."""
    lines = [f"**{upstream.verdict}**", ""] if upstream.verdict else []
    lines.append(f"Searched vLLM's issues for `{upstream.query}` ([the search]({upstream.url()})).")
    if upstream.hits is None:
        lines.append(f"Not run from here ({upstream.why_not or 'no search'}): run it before filing.")
    elif not upstream.hits:
        lines.append("It found no issue.")
    else:
        lines += ["It found:", "", *(f"- {hit}" for hit in upstream.hits)]
    return lines


def environment_summary(collect_env: str) -> list[str]:
    """The collect_env lines that bear on an engine bug: versions, CUDA/driver, GPU, CPU model and SIMD flags, key packages."""
    found: dict[str, str] = {}
    lines = collect_env.splitlines()
    for i, line in enumerate(lines):
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep:
            continue
        if key in ENV_KEYS and key not in found and value:
            # "GPU models and configuration :" puts the GPUs on the next lines.
            found[key] = value or (lines[i + 1].strip() if i + 1 < len(lines) else "")
        elif key == "Flags" and "CPU flags" not in found:
            flags = sorted({f for f in value.split() if CPU_FLAGS.match(f)})
            found["CPU flags"] = " ".join(flags) or "(no AVX2/AVX-512/AMX)"
        elif key == "vLLM Build Flags" and i + 1 < len(lines):
            found[key] = lines[i + 1].strip()
    packages = [m.group(1) for m in re.finditer(r"^\[pip3\] (\S+)$", collect_env, re.MULTILINE)
                if m.group(1).split("==")[0] in ENV_PACKAGES]
    rows = [f"- {key}: `{value}`" for key, value in found.items()]
    return rows + ([f"- packages: `{' '.join(packages)}`"] if packages else [])


def relative_paths(text: str) -> str:
    """Paths made relative to the package: site-packages/vllm/x.py -> vllm/x.py, the stdlib to pythonX.Y/,
    anything else absolute (a temp dir, a checkout) to its last component."""
    text = re.sub(r"(?<![\w:/.<~-])/(?:[\w.+@-]+/)*(?:site|dist)-packages/", "", text)
    text = re.sub(r"(?<![\w:/.<~-])/(?:[\w.+@-]+/)*lib/(python3\.\d+)/", r"\1/", text)
    return ABSOLUTE_PATH.sub(lambda m: "<" + (m.group(0).rstrip("/").rsplit("/", 1)[-1] or "dir") + ">/"
                             if m.group(0).endswith("/") else m.group(0).rsplit("/", 1)[-1], text)


def search_query(exception: str = "", function: str = "", knobs: tuple[str, ...] = ()) -> str:
    """The search a maintainer would run first: vLLM's issues, the exception type, the function, the key knobs."""
    return " ".join(["repo:vllm-project/vllm", "is:issue", *[t for t in (exception, function) if t], *knobs])


def search_upstream(query: str, timeout: float = 5.0, limit: int = 5) -> Upstream:
    """Run `query` against GitHub's public search API (unauthenticated); offline, say so and keep the query."""
    url = f"{SEARCH_API}?q={urllib.parse.quote_plus(query)}&per_page={limit}"
    request = urllib.request.Request(url, headers={"Accept": "application/vnd.github+json", "User-Agent": "rollout_lab"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            items = json.load(response).get("items", [])
    except (OSError, ValueError) as exc:  # URLError, timeouts and refused connections are OSErrors
        return Upstream(query, None, f"GitHub not reachable from here: {type(exc).__name__}")
    return Upstream(query, [f"#{i['number']} {i['title']} ({i['state']})" for i in items[:limit]])


def visible_lines(text: str) -> list[str]:
    """The lines outside collapsed <details> blocks (a `<details open>` one stays visible)."""
    kept, depth = [], 0
    for line in text.splitlines():
        if line.strip().startswith("<details") and "open" not in line:
            depth += 1
        elif line.strip() == "</details>" and depth:
            depth -= 1
        elif not depth:
            kept.append(line)
    return kept


def problems(text: str) -> list[str]:
    """What a maintainer would bounce REPORT.md for; [] when it is in shape."""
    found = []
    title = text.splitlines()[0][2:] if text.startswith("# ") else ""
    if not title.startswith(TITLE_PREFIX):
        found.append(f"the first line is not '# {TITLE_PREFIX}...'")
    if len(title) > MAX_TITLE:
        found.append(f"title of {len(title)} characters (at most {MAX_TITLE})")
    at = -1
    for section in SECTIONS:
        where = text.find("\n" + section + "\n")
        if where < 0:
            found.append(f"no section {section!r}")
        elif where < at:
            found.append(f"section {section!r} out of order")
        at = max(at, where)
    visible = visible_lines(text)
    if len(visible) > VISIBLE_LINES:
        found.append(f"{len(visible)} visible lines outside collapsed <details> (at most {VISIBLE_LINES})")
    for name in ("Expected", "Actual"):
        if not re.search(rf"^- \*\*{name}:\*\* \S", text, re.MULTILINE):
            found.append(f"no one-line '- **{name}:**'")
    paths = ABSOLUTE_PATH.findall(text)
    if paths:
        found.append(f"absolute paths: {sorted(set(paths))[:3]}")
    if re.search(r"last (\d+ )?lines\)?:", text) or "..." + "\n" + "Traceback" in text:
        found.append("a cut output ('last lines')")
    for block in re.findall(r"```text\n(.*?)```", text, re.DOTALL):
        if re.search(r'^  File "', block, re.MULTILINE) and TRACEBACK_HEAD not in block:
            found.append("a traceback without its head (cut)")
        if TRACEBACK_HEAD in block and not re.search(r"^\w+(\.\w+)*(Error|Exception|Interrupt|Exit)\b.*$", block.split(TRACEBACK_HEAD)[-1], re.MULTILINE):
            found.append("a traceback without its exception line")
    if text.count("```python") > 1:
        found.append("the script more than once")
    return found
