"""engine.args: names checked against the installed vLLM's EngineArgs, passed through to vllm.LLM,
named in config.json and in a sweep; the minimizer's knob for each; dict-valued hunt knobs."""
import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rollout_lab.analysis.outcome import next_sweep_command
from rollout_lab.analysis.signature import flatten
from rollout_lab.config import ConfigError, EngineConfig, RunConfig
from rollout_lab.config_keys import check_override_keys
from rollout_lab.engine import engine_arg_message, engine_kwargs, vllm_engine_args
from rollout_lab.minimize.knobs import deviating_knobs, knob_args, knob_targets, with_knobs

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def test_a_misspelled_argument_names_the_closest_valid_ones():
    message = engine_arg_message("kv_cache_dtyp")
    assert message.startswith("engine.args.kv_cache_dtyp is not an engine argument of the installed vLLM")
    assert "did you mean engine.args.kv_cache_dtype" in message and "\n" not in message


def test_an_unknown_argument_with_nothing_close_is_one_short_line():
    message = engine_arg_message("zzqx")
    assert "none of its" in message and "EngineArgs" in message and len(message) < 200


def test_a_typed_knob_or_an_argument_the_lab_sets_is_refused_with_where_to_set_it():
    assert engine_arg_message("dtype") == "engine.args.dtype duplicates a typed knob; use engine.dtype"
    assert engine_arg_message("max_num_batched_tokens").endswith("use engine.max_num_batched_tokens")
    assert engine_arg_message("model") == "engine.args.model is set by rollout_lab: the model is model.name"
    assert "weight sync" in engine_arg_message("worker_extension_cls")


def test_every_other_engine_argument_may_be_passed():
    typed = {f.name for f in dataclasses.fields(EngineConfig)}
    for name in ("kv_cache_dtype", "async_scheduling", "compilation_config", "attention_backend", "tensor_parallel_size"):
        assert name in vllm_engine_args() and name not in typed
        assert engine_arg_message(name) is None


def test_engine_kwargs_passes_the_arguments_through_after_the_typed_knobs():
    cfg = RunConfig()
    cfg.engine.args = {"kv_cache_dtype": "fp8", "compilation_config": {"cudagraph_mode": "PIECEWISE"}}
    kwargs = engine_kwargs(cfg, "/models/m")
    assert kwargs["kv_cache_dtype"] == "fp8" and kwargs["compilation_config"] == {"cudagraph_mode": "PIECEWISE"}
    assert kwargs["dtype"] == "float32" and kwargs["model"] == "/models/m"
    assert "kv_cache_dtype" not in engine_kwargs(RunConfig(), "/models/m")


def test_the_override_check_of_a_sweep_validates_engine_args_names():
    check_override_keys(["+engine.args.long_prefill_token_threshold=0,16", "+engine.args.compilation_config.cudagraph_mode=NONE"], RunConfig)
    with pytest.raises(ConfigError, match="did you mean engine.args.long_prefill_token_threshold"):
        check_override_keys(["+engine.args.long_prefil_token_threshold=0,16"], RunConfig)
    with pytest.raises(ConfigError, match="use engine.max_num_seqs"):
        check_override_keys(["+engine.args.max_num_seqs=1,2"], RunConfig)


def test_the_arguments_are_in_config_json_and_a_sweep_names_them(compose):
    cfg = compose("+engine.args.kv_cache_dtype=fp8", "+engine.args.async_scheduling=true")
    assert cfg.engine.args == {"kv_cache_dtype": "fp8", "async_scheduling": True}
    config_json = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # what loop.run writes
    assert flatten(config_json)["engine.args.kv_cache_dtype"] == "fp8"
    assert compose().engine.args == {}


def test_the_next_sweep_over_an_engine_argument_keeps_its_plus():
    command = next_sweep_command("engine.args.long_prefill_token_threshold", [4, 8],
                                 ["loop.steps=1", "+engine.args.long_prefill_token_threshold=0,16"])
    assert command.endswith("loop.steps=1 +engine.args.long_prefill_token_threshold=4,8")
    assert next_sweep_command("engine.max_num_seqs", [2], ["engine.max_num_seqs=1,4"]).endswith(" engine.max_num_seqs=2")


HUNT_CASE = {
    "dtype": "bfloat16", "seed": 0, "disable_log_stats": False, "max_model_len": 512, "enforce_eager": False,
    "kv_cache_dtype": "fp8", "compilation_config": {"cudagraph_mode": "FULL"}, "attention_backend": "FLASHINFER",
}


def test_each_extra_argument_is_a_knob_of_its_own_that_goes_back_to_vllms_default():
    gpu = knob_targets(on_gpu=True)
    assert deviating_knobs(HUNT_CASE, gpu) == ["max_model_len", "enforce_eager", "kv_cache_dtype", "compilation_config", "attention_backend"]
    assert knob_args("kv_cache_dtype") == ("kv_cache_dtype",) and knob_args("cache_size") == ("kv_cache_memory_bytes", "gpu_memory_utilization")
    # Kept knobs stay; the others leave vLLM's defaults; the fixed arguments are no knobs.
    assert with_knobs(HUNT_CASE, ["compilation_config"], gpu) == {
        "dtype": "bfloat16", "seed": 0, "disable_log_stats": False, "compilation_config": {"cudagraph_mode": "FULL"},
    }
    # On CPU, enforce_eager's target is True; an argument at that target does not deviate.
    cpu_case = {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.3, "long_prefill_token_threshold": 16}
    assert deviating_knobs(cpu_case, knob_targets(on_gpu=False)) == ["long_prefill_token_threshold"]
    assert with_knobs(cpu_case, [], knob_targets(on_gpu=False)) == {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.3}


def test_a_dict_valued_hunt_knob_is_drawn_and_counted():
    from rollout_lab.hunt.search import Coverage, Planner
    from rollout_lab.hunt.space import Space, SpaceConfig, engine_args

    modes = [None, {"cudagraph_mode": "PIECEWISE"}, {"cudagraph_mode": "FULL_DECODE_ONLY"}]
    space = Space.from_config(SpaceConfig(models=["smollm2"], engine={"compilation_config": modes, "enforce_eager": [False]},
                                          sampling={"n": [1]}, generators=["many_short"]))
    coverage = Coverage(space.dims())
    drawn = Counter()
    for index in range(6):
        group = Planner(space, seed=0).next_group(index, coverage, num_workloads=1)
        for workload in group.workloads:
            coverage.record(group.engine | workload)
        drawn[json.dumps(engine_args(group.engine).get("compilation_config"))] += 1
    assert set(drawn) == {json.dumps(m) for m in modes}  # every mode tried, null left out as vLLM's default
    assert coverage.covered()[0] == coverage.totals()[0]


def test_the_gpu_space_has_the_cuda_dimensions():
    from hydra import compose, initialize_config_dir

    from rollout_lab.hunt.space import Space, register

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("hunt_run", overrides=["hunt=gpu"])
    space = Space.from_config(OmegaConf.to_object(cfg).hunt.space)
    assert {None, "FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION"} <= set(space.engine["attention_backend"])
    assert {"cudagraph_mode": "FULL_AND_PIECEWISE"} in space.engine["compilation_config"]
    assert 1 in space.engine["max_num_batched_tokens"] and "many_slots_gpu" in space.pressure
