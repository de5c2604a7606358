"""Pure logic of rollout_lab.ingest: each format's record reader, the generic schema's round trip, the
typed files beside an ingested run, and each diagnosis on hand-built token tables."""
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rollout_lab.ingest.diagnoses import Context, FillValue, ShiftByOne, StaleWeights, TrainerVariance, TruncatedSampling
from rollout_lab.ingest.formats import FORMATS, nemo_rl, prime_rl, slime
from rollout_lab.ingest.record import IngestRecord
from rollout_lab.ingest.sequence import ExportedSequence, ExportError, GenericWriter, from_dict, read_generic
from rollout_lab.noise_floor import NoiseFloor, above_floor
from rollout_lab.records import RecordsError


def test_registry_has_every_format():
    assert list(FORMATS) == ["nemo-rl", "prime-rl", "slime", "verl", "trl", "generic"]
    assert [f.name for f in FORMATS.values() if not f.has_sampler_logprobs] == ["verl", "trl"]


def test_nemo_rl_line_splits_prompt_and_completion_at_the_loss_mask():
    row = {"token_ids": [5, 6, 7, 8, 9, 0, 0], "input_lengths": 5, "token_loss_mask": [0, 0, 1, 1, 1, 0, 0],
           "generation_logprobs": [0, 0, -1.0, -2.0, -3.0, 0, 0], "prev_logprobs": [0, 0, -1.1, -2.1, -3.1, 0, 0], "rewards": [0.5]}
    seq = nemo_rl.sequence(row, step=3, number=1, where="f:1")
    assert (seq.step, seq.prompt_token_ids, seq.token_ids) == (3, [5, 6], [7, 8, 9])
    assert seq.sampler_logprobs == [-1.0, -2.0, -3.0] and seq.trainer_logprobs == [-1.1, -2.1, -3.1] and seq.reward == 0.5
    with pytest.raises(ExportError, match="missing field.*prev_logprobs"):
        nemo_rl.sequence({k: v for k, v in row.items() if k != "prev_logprobs"}, 3, 1, "f:1")
    with pytest.raises(ExportError, match="not one span"):
        nemo_rl.sequence(row | {"token_loss_mask": [0, 0, 1, 0, 1, 0, 0]}, 3, 1, "f:1")


def test_prime_rl_row_unpacks_sequences_at_position_zero():
    row = {"schema_version": 1, "step": 2, "rank": 1, "token_ids": [1, 2, 3, 4, 5, 6, 7],
           "position_ids": [0, 1, 2, 0, 1, 2, 3], "loss_mask": [0, 1, 1, 0, 0, 1, 1],
           "inference_logprobs": [0, -1, -2, 0, 0, -3, -4], "trainer_logprobs": [0, -1.5, -2.5, 0, 0, -3.5, -4.5]}
    first, second = prime_rl.sequences_of_row(row, "r:1")
    assert (first.prompt_token_ids, first.token_ids, first.sampler_logprobs) == ([1], [2, 3], [-1.0, -2.0])
    assert (second.prompt_token_ids, second.token_ids, second.trainer_logprobs) == ([4, 5], [6, 7], [-3.5, -4.5])
    assert first.step == second.step == 2 and first.worker == 1
    with pytest.raises(ExportError, match="schema_version 2"):
        prime_rl.sequences_of_row(row | {"schema_version": 2}, "r:1")
    with pytest.raises(ExportError, match="differ in length"):
        prime_rl.sequences_of_row(row | {"loss_mask": [1]}, "r:1")


def test_slime_sample_takes_the_response_tail_and_the_oldest_weight_version():
    sample = {"tokens": [9, 8, 7, 6], "response_length": 2, "rollout_log_probs": [-0.5, -0.25], "reward": 1.0,
              "weight_versions": ["3", "2"], "prefix_cache_info": {"cached_tokens": 16}, "index": 4, "group_index": 1}
    seq = slime.sequence(sample, step=3, where="s")
    assert (seq.prompt_token_ids, seq.token_ids, seq.sampler_logprobs) == ([9, 8], [7, 6], [-0.5, -0.25])
    assert (seq.trainer_logprobs, seq.weight_version, seq.num_cached_tokens, seq.prompt_index) == (None, 2, 16, 1)
    with pytest.raises(ExportError, match="sampler_logprobs has 1 values for 2"):
        slime.sequence(sample | {"rollout_log_probs": [-0.5]}, 3, "s")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_generic_schema_round_trips(tmp_path, suffix):
    sequences = [ExportedSequence(step=0, prompt_token_ids=[1, 2], token_ids=[3, 4], sampler_logprobs=[-1.0, -2.0], reward=0.5,
                                  weight_version=0, top_p=0.9),
                 ExportedSequence(step=1, prompt_token_ids=[5], token_ids=[6], trainer_logprobs=[-0.5], request_id="r7")]
    path = tmp_path / f"export{suffix}"
    with GenericWriter(path, rows_per_group=1) as writer:
        for s in sequences:
            writer.write(s)
    with path.open("rb") as f:
        assert list(read_generic(f, path)) == sequences


def test_generic_schema_names_a_bad_field(tmp_path):
    with pytest.raises(ExportError, match="unknown field.*logprobs"):
        from_dict({"step": 0, "prompt_token_ids": [1], "token_ids": [2], "logprobs": [-1]}, "x:1")
    with pytest.raises(ExportError, match="x:1: missing required field.*token_ids"):
        from_dict({"step": 0, "prompt_token_ids": [1]}, "x:1")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"step": 0, "prompt_token_ids": [1], "token_ids": [2]}\nnot json\n')
    with path.open("rb") as f, pytest.raises(ExportError, match="bad.jsonl:2 is not JSON"):
        list(read_generic(f, path))


def test_ingest_record_and_noise_floor_round_trip(tmp_path):
    record = IngestRecord("slime", "/x", "llama-tiny", "export", "computed", steps=[0, 1], missing={"a": "b"})
    record.write(tmp_path)
    assert IngestRecord.read(tmp_path) == record
    floor = NoiseFloor("llama-tiny", "float32", "1 vs 8", 4, 40, 0.0, 1e-7, 2e-7)
    floor.write(tmp_path)
    assert NoiseFloor.read(tmp_path) == floor
    assert "within the trainer's own floor" in above_floor(1e-7, floor)
    assert "above the trainer's own floor 2e-07 (5x)" in above_floor(1e-6, floor)
    (tmp_path / "ingest.json").write_text('{"version": 9}')
    with pytest.raises(RecordsError, match="version 9"):
        IngestRecord.read(tmp_path)


def _tokens(sampler, trainer, requests=None, step=0):
    """A step's token table: one request per list in sampler/trainer, positions 0.."""
    rows = []
    for r, (s, t) in enumerate(zip(sampler, trainer)):
        for p, (a, b) in enumerate(zip(s, t)):
            rows.append({"step": step, "worker": 0, "request_id": str(r), "position": p, "token_id": p, "sampler_logprob": a,
                         "trainer_logprob": b, "abs_diff": abs(a - b)})
    return pd.DataFrame(rows)


def _context(tmp_path, threshold=1e-3, floor=None):
    return Context(Path(tmp_path), threshold, floor)


def test_fill_value_finds_zeros_where_the_trainer_is_unlikely(tmp_path):
    rng = np.random.default_rng(0)
    trainer = [list(-rng.uniform(1, 5, 10)) for _ in range(3)]
    sampler = [list(t) for t in trainer]
    sampler[1][0] = 0.0
    sampler[2][4] = -9999.0
    d = FillValue(_context(tmp_path))
    explained = d.observe(0, _tokens(sampler, trainer))
    assert explained.sum() == 2
    finding = d.finding()
    assert finding.tokens == 2 and "0 x1" in finding.evidence[0] and "-9999 x1" in finding.evidence[0]
    # A 0.0 where the trainer too says p ~ 1 is no fill value.
    clean = FillValue(_context(tmp_path))
    clean.observe(0, _tokens([[0.0, -1.0]], [[-1e-6, -1.0]]))
    assert clean.finding() is None


def test_shift_by_one_matches_the_next_token(tmp_path):
    rng = np.random.default_rng(1)
    trainer = [list(-rng.uniform(0.1, 5, 12)) for _ in range(4)]
    sampler = [t[1:] + [t[-1]] for t in trainer]
    d = ShiftByOne(_context(tmp_path))
    d.observe(0, _tokens(sampler, trainer))
    finding = d.finding()
    assert finding is not None and "(i+1)" in finding.evidence[0]
    aligned = ShiftByOne(_context(tmp_path))
    aligned.observe(0, _tokens([[x + rng.normal(0, 0.5) for x in t] for t in trainer], trainer))
    assert aligned.finding() is None


def test_truncated_sampling_is_one_sided(tmp_path):
    rng = np.random.default_rng(2)
    trainer = [list(-rng.uniform(0.5, 5, 10)) for _ in range(4)]
    truncated = [[x + rng.uniform(0.01, 0.3) for x in t] for t in trainer]
    d = TruncatedSampling(_context(tmp_path))
    assert d.observe(0, _tokens(truncated, trainer)).sum() == 40
    assert d.finding().tokens == 40
    both_ways = TruncatedSampling(_context(tmp_path))
    both_ways.observe(0, _tokens([[x + rng.normal(0, 0.3) for x in t] for t in trainer], trainer))
    assert both_ways.finding() is None


def test_stale_weights_without_versions_needs_a_clean_first_step_and_broad_later_steps(tmp_path):
    rng = np.random.default_rng(3)
    trainer = [list(-rng.uniform(0.5, 5, 6)) for _ in range(5)]
    d = StaleWeights(_context(tmp_path))
    d.observe(0, _tokens(trainer, trainer, step=0))
    d.observe(1, _tokens([[x + 0.01 for x in t] for t in trainer], trainer, step=1))
    assert "suspected" in d.finding().title
    one_request = StaleWeights(_context(tmp_path))
    one_request.observe(0, _tokens(trainer, trainer, step=0))
    one_request.observe(1, _tokens([[x + 0.01 for x in trainer[0]]] + trainer[1:], trainer, step=1))
    assert one_request.finding() is None


def test_trainer_variance_explains_what_the_floor_reaches(tmp_path):
    floor = NoiseFloor("m", "bfloat16", "1 vs 8", 1, 10, 0.01, 0.05, 0.06)
    d = TrainerVariance(_context(tmp_path, 1e-3, floor))
    assert d.observe(0, _tokens([[-1.0, -1.0, -1.0]], [[-1.02, -1.5, -1.0]])).tolist() == [True, False, False]
    assert "1 of 2 tokens" in d.finding().evidence[0]
    assert TrainerVariance(_context(tmp_path)).finding() is None


def test_write_rollouts_drops_padding_and_reads_back(tmp_path):
    import torch

    from rollout_lab.ingest.hooks import write_rollouts

    path = tmp_path / "rollouts.jsonl"
    prompt = torch.tensor([[0, 5, 6], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    completion = torch.tensor([[10, 11], [12, 0]])
    completion_mask = torch.tensor([[1, 1], [1, 0]])
    sampler = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    assert write_rollouts(path, 4, prompt, completion, sampler, rewards=[1.0, 0.0], prompt_mask=prompt_mask,
                          completion_mask=completion_mask, weight_version=3) == 2
    with path.open("rb") as f:
        first, second = read_generic(f, path)
    assert (first.prompt_token_ids, first.token_ids, first.sampler_logprobs, first.weight_version) == ([5, 6], [10, 11], [-1.0, -2.0], 3)
    assert (second.prompt_token_ids, second.token_ids, second.sampler_logprobs, second.trainer_logprobs) == ([7, 8, 9], [12], [-3.0], None)


def test_text_formats_tokenize_with_the_models_tokenizer():
    from transformers import AutoTokenizer

    from rollout_lab.ingest.formats import trl, verl
    from rollout_lab.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("llama-tiny"))
    seq = verl.sequence({"input": "1 + 2 =", "output": " 3", "score": 1.0, "step": 5}, 0, 1, tokenizer, "v:1")
    assert (seq.step, seq.reward, seq.sampler_logprobs, seq.trainer_logprobs) == (5, 1.0, None, None)
    assert tokenizer.decode(seq.prompt_token_ids + seq.token_ids) == "1 + 2 = 3"
    row = {"step": 2, "prompt": [{"role": "user", "content": "hi"}], "completion": "ok", "accuracy": 0.5, "format": 0.25,
           "advantage": 0.1}
    seq = trl.sequence(row, 0, tokenizer, "t:0")
    assert seq.reward == 0.75 and tokenizer.decode(seq.token_ids) == "ok"
    assert "hi" in tokenizer.decode(seq.prompt_token_ids)


def test_engine_config_allows_only_engine_sampling_and_fault(tmp_path):
    from rollout_lab.config import ConfigError, RunConfig
    from rollout_lab.ingest.writer import load_engine_config

    path = tmp_path / "engine.yaml"
    path.write_text("engine:\n  max_num_seqs: 4\nworkload:\n  top_p: 0.9\n")
    cfg = load_engine_config(path, RunConfig())
    assert (cfg.engine.max_num_seqs, cfg.workload.top_p) == (4, 0.9)
    path.write_text("trainer:\n  dtype: bfloat16\n")
    with pytest.raises(ConfigError, match="key\\(s\\) trainer not allowed"):
        load_engine_config(path, RunConfig())
    path.write_text("engine:\n  max_num_seq: 4\n")
    with pytest.raises(ConfigError, match="max_num_seq"):
        load_engine_config(path, RunConfig())
