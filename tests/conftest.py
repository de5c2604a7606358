import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true",
                     help="run the selected tests in reverse order: a test that needs another's side effects fails")


# The fixtures that make a run (an engine, a job, a minimization), with the tests that read them:
# under `pytest -n N --dist loadgroup` (the Makefile's) the tests reading one go to one worker, which
# makes the run once. The session runs (tests/integration/conftest.py) are read by tests in several
# files; the module-scoped ones by one file's tests, one group per parameter (test_external_bugs
# makes one run per bug). Every other test is a group of its own, so the two workers share out one
# file's tests too (a module fixture left out here, like test_models' `prepared`, is cheap to make twice).
SHARED_RUNS = ("stale_state_run", "overflow_run")
MODULE_RUNS = ("bug_run", "lab_run")


def worker_group(item) -> str:
    """The xdist group of a test: the first run fixture it reads (`=param` for a parametrized one: xdist
    reads a group name with a "]" in it as no group), else its node id."""
    names = getattr(item, "fixturenames", ())
    for name in SHARED_RUNS:
        if name in names:
            return name
    for name in MODULE_RUNS:
        if name in names:
            callspec = getattr(item, "callspec", None)
            param = callspec.params.get(name) if callspec else None
            return f"{item.nodeid.split('::')[0]}::{name}" + (f"={param}" if param is not None else "")
    return item.nodeid


class _WorkerGroups:
    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items):
        # tryfirst: before pytest-xdist reads the groups into the node ids.
        for item in items:
            if not item.get_closest_marker("xdist_group"):
                item.add_marker(pytest.mark.xdist_group(worker_group(item)))


def pytest_configure(config):
    config.pluginmanager.register(_WorkerGroups(), "rollout_lab_worker_groups")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    # trylast: after pytest has grouped the items by fixture scope, so a module's tests stay together.
    if config.getoption("--reverse"):
        items.reverse()


@pytest.fixture(autouse=True)
def _restore_environ():
    """Every test leaves os.environ as it found it. The lab's entry points set vLLM's variables for
    their own process (`localize.main` VLLM_USE_V2_MODEL_RUNNER=0, an exec'd repro.py its ENV), and
    tests call them in-process: before this, a unit test's VLLM_USE_V2_MODEL_RUNNER=1 reached every
    engine the same worker started after it (found by `pytest -n 2`: "Model Runner V2 requires
    Triton" in test_ingest, test_faults, test_external_bugs). Session fixtures are set up before this
    one (pytest orders fixtures by scope), so what they set stays."""
    before = dict(os.environ)
    yield
    for name in set(os.environ) - set(before) - {"PYTEST_CURRENT_TEST"}:
        del os.environ[name]
    for name, value in before.items():
        if name != "PYTEST_CURRENT_TEST" and os.environ.get(name) != value:
            os.environ[name] = value


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session; runs reuse it."""
    import ray

    ray.init(num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def compose():
    """compose(*overrides) -> the RunConfig `python -m rollout_lab OVERRIDES` runs: conf/ as
    shipped, the presets' own values, the per-model pressure values (rollout_lab/__main__.py)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from rollout_lab.config import RunConfig, register
    from rollout_lab.config_keys import check_keys
    from rollout_lab.presets import apply_pressure_by_model

    register()

    def build(*overrides: str) -> RunConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose("config", overrides=list(overrides))
        check_keys(cfg, RunConfig)
        return OmegaConf.to_object(apply_pressure_by_model(cfg, list(overrides)))

    return build


@pytest.fixture
def toy_oracle():
    """A new oracle registered through the public interface (docs/oracles.md), dropped after the test:
    a sampled token that vLLM itself gave a logprob below its floor (spike_threshold). llama-tiny's random
    weights spread every next-token distribution thin, so every token it samples is one."""
    from rollout_lab.oracles import Expected, Oracle, register, unregister
    from rollout_lab.oracles.records import Outcome, OracleVerdict

    class UnlikelyToken(Oracle):
        name = "unlikely_token"
        floor = -1.0

        def tolerance(self, oracles, row: str) -> float:
            return self.floor

        def measure(self, trial) -> OracleVerdict:
            logprobs = [(lp, item.request, p) for item in trial.items for p, lp in enumerate(item.logprobs)]
            flagged = [lp for lp, _, _ in logprobs if lp < trial.tolerances[self.name]]
            return OracleVerdict(tokens=len(logprobs), flagged=len(flagged), max_diff=-min((lp for lp, _, _ in logprobs), default=0.0),
                                 request_class="any" if flagged else None)

        def expected(self, finding, tolerance: float) -> Expected:
            return Expected(self.name, self.floor)

        def judge(self, replay, expected: Expected) -> Outcome:
            logprobs = [lp for out in replay.outputs for lp in out.logprobs]
            return Outcome(num_requests=len(replay.outputs), num_tokens=len(logprobs),
                           num_flagged=sum(lp < expected.spike_threshold for lp in logprobs),
                           max_abs_diff=-min(logprobs, default=0.0))

        def same_failure(self, expected: Expected, outcome: Outcome) -> bool:
            return outcome.crash_key is None and outcome.num_flagged > 0

        def describe(self, expected: Expected) -> str:
            return f"a sampled token whose vLLM logprob is below {expected.spike_threshold:g}"

        def repro_check(self, case, expected: Expected, model: str, install: str) -> str:
            from rollout_lab.minimize.script_run import is_seeded

            each, seed = ("p, seed", "seed=seed, ") if is_seeded(case) else ("p", "")
            return f'''FLOOR = {expected.spike_threshold!r}  # the failure: a sampled token vLLM gives a logprob below this

def reproduce(args) -> tuple[str, str]:
    import vllm
    llm = vllm.LLM(model={model}, skip_tokenizer_init=True, **ENGINE_ARGS){install}
    params = [vllm.SamplingParams({seed}logprobs=0, detokenize=False, **SAMPLING) for {each} in REQUESTS]
    outputs = llm.generate([{{"prompt_token_ids": PROMPTS[p]}} for {each} in REQUESTS], params, use_tqdm=False)
    low = [lp[t].logprob for o in outputs for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids) if lp[t].logprob < FLOOR]
    return ("REPRODUCED", f"{{len(low)}} sampled tokens below {{FLOOR}}") if low else ("NOT REPRODUCED", "none below")
'''

    oracle = register(UnlikelyToken())
    yield oracle
    unregister(oracle.name)
