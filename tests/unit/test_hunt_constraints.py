"""Constraints between engine knobs learned from vLLM's refusals (hunt/constraints.py), on vLLM's own
wording: the messages below are what vLLM 0.32's config validation and attention selector raise."""
from rollout_lab.hunt.constraints import Learned, learn
from rollout_lab.hunt.search import Coverage, Planner
from rollout_lab.hunt.space import Space, SpaceConfig

BELOW_LEN = ("1 validation error for SchedulerConfig Value error, max_num_batched_tokens (64) is smaller than "
             "max_model_len (512). This effectively limits the maximum sequence length")
BELOW_SEQS = "Value error, max_num_batched_tokens (16) must be greater than or equal to max_num_seqs (64)."
ALIGN = "1 validation error for VllmConfig Assertion failed, Chunked prefill is required for mamba cache mode 'align'."
MAMBA_BI = "VLLM batch_invariant mode is not supported for MAMBA2_ATTN."


def test_a_budget_below_max_model_len_is_learned_as_the_relation_with_chunked_prefill_off():
    point = {"model": "smollm2", "engine.max_num_batched_tokens": 64, "engine.max_model_len": 512,
             "engine.enable_chunked_prefill": False}
    exclusion = learn(point, BELOW_LEN)
    assert exclusion.describe() == "max_num_batched_tokens < max_model_len with enable_chunked_prefill=False"
    assert exclusion.covers(point | {"engine.max_num_batched_tokens": 256, "engine.max_model_len": 1024, "model": "x"})
    assert not exclusion.covers(point | {"engine.enable_chunked_prefill": True})
    assert not exclusion.covers(point | {"engine.max_num_batched_tokens": None})  # vLLM sizes its default itself
    assert not exclusion.covers(point | {"engine.max_num_batched_tokens": 1024})


def test_a_refusal_its_point_does_not_break_teaches_nothing():
    # The message matches, but the drawn point has chunked prefill on: the constraint does not explain it.
    assert learn({"engine.max_num_batched_tokens": 64, "engine.max_model_len": 512,
                  "engine.enable_chunked_prefill": True}, BELOW_LEN) is None
    assert learn({"engine.max_num_batched_tokens": 16, "engine.max_num_seqs": 64}, BELOW_SEQS).relation is not None
    assert learn({"engine.max_num_batched_tokens": 16}, "KV cache too small for max_model_len") is None


def test_combinations_are_learned_for_the_values_of_the_refused_point():
    mamba = {"model": "mamba2-tiny", "env.VLLM_BATCH_INVARIANT": "1", "engine.attention_backend": None,
             "engine.enable_prefix_caching": True, "engine.enable_chunked_prefill": False}
    bi = learn(mamba, MAMBA_BI)
    assert bi.covers(mamba | {"engine.enable_prefix_caching": False})
    assert not bi.covers(mamba | {"model": "smollm2"}) and not bi.covers(mamba | {"env.VLLM_BATCH_INVARIANT": "0"})
    align = learn(mamba, ALIGN)
    assert not align.covers(mamba | {"engine.enable_chunked_prefill": True})
    assert not align.covers(mamba | {"model": "hybrid-tiny"})


def test_learned_exclusions_count_their_draws_and_the_planner_draws_none_of_them():
    learned = Learned()
    point = {"model": "smollm2", "engine.max_num_batched_tokens": 64, "engine.max_model_len": 512,
             "engine.enable_chunked_prefill": False}
    learned.record(0, point, BELOW_LEN)
    learned.record(3, point | {"engine.max_model_len": 256}, "another wording, same relation")
    learned.record(5, {"model": "smollm2"}, "KV cache too small")
    assert learned.report_lines() == [
        "- 2 draw(s) rejected: max_num_batched_tokens < max_model_len with enable_chunked_prefill=False; now excluded"]
    assert learned.unexplained == [5]
    space = Space.from_config(SpaceConfig(models=["smollm2"], engine={
        "max_num_batched_tokens": [64, 256, None], "max_model_len": [256, 512], "enable_chunked_prefill": [True, False]},
        sampling={"n": [1]}, generators=["many_short"]), gpus=0)
    planner, coverage = Planner(space, 0, candidates=8), Coverage(space.dims())
    engines = [planner.next_group(i, coverage, 1, valid_engine=learned.allows).engine for i in range(40)]
    assert engines and all(learned.allows(e) for e in engines)


def test_the_report_counts_the_draws_each_learned_constraint_explains_and_where_the_time_went(tmp_path):
    from rollout_lab.hunt import report
    from rollout_lab.hunt.protocol import TrialResult
    from rollout_lab.hunt.space import HuntRunConfig
    from rollout_lab.hunt.store import Store, TrialRow

    store = Store(tmp_path / "hunt.db")
    point = {"model": "smollm2", "engine.max_num_batched_tokens": 64, "engine.max_model_len": 512,
             "engine.enable_chunked_prefill": False}
    for idx, length in enumerate((512, 256)):
        store.add_group(idx, f"g{idx}", point | {"engine.max_model_len": length}, "explore", 0.0)
        store.end_group(idx, "rejected", BELOW_LEN)
    store.add_group(2, "g2", {"model": "smollm2"}, "explore", 0.0)
    store.end_group(2, "ok", "", 20.0)
    result = TrialResult("ok", phase_seconds={"engine": 6.0, "reference": 3.0, "rescore": 1.0, "alone": 0.5})
    store.add_trial(TrialRow("t0", 2, {"model": "smollm2"}, {"generator": "many_short"}, "ok", None, result, 12.0, 40.0))
    store.set_meta("elapsed_s", 40.0)
    cfg = HuntRunConfig()
    text = report.markdown(tmp_path, store, Coverage({"model": ["smollm2"]}), [], [], cfg, None)
    assert ("- 2 draw(s) rejected: max_num_batched_tokens < max_model_len with enable_chunked_prefill=False; "
            "now excluded") in text
    assert "- 0 draw(s) rejected for other reasons (below)" in text
    spent = text.split("## Where the time went", 1)[1].split("\n## ", 1)[0]
    assert "- 1 trials in 40 s of hunt clock (90 an hour)" in spent
    assert "- engine start: 20 s (50%)" in spent and "- sampling: 6 s (15%)" in spent
    assert "- other trial time: 2 s (4%)" in spent and "- batch vs alone: 0 s (1%)" in spent
