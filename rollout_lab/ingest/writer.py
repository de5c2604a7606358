"""An export, streamed into a run dir of the lab's own schema.

Sequences arrive in step order; every `batch_sequences` of them the missing sides are computed
(the trainer's by teacher forcing, batched; the sampler's by an engine replay) and their tokens
appended to the step's records file as one row group. A finished step gets its requests file,
its metrics line and its W&B step. Memory holds one batch of sequences and one step's requests and
three token columns: the export itself is never held whole.
"""
from __future__ import annotations

import io
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from rollout_lab.config import ConfigError, RunConfig, validate
from rollout_lab.ingest.formats import FORMATS
from rollout_lab.ingest.formats.base import ExportFormat
from rollout_lab.ingest.record import COMPUTED_TRAINER, FROM_EXPORT, REPLAYED_SAMPLER, IngestRecord
from rollout_lab.ingest.sequence import ExportError, ExportedSequence
from rollout_lab.mismatch import token_metrics
from rollout_lab.records import (
    SCHEMA_VERSION,
    TOKEN_SCHEMA,
    RolloutBatch,
    RunResult,
    Sample,
    SampledRequest,
    token_table,
    write_config,
    write_requests,
    write_summary,
)
from rollout_lab.tolerances import threshold_for

# Per-request facts an export may carry that the token table has no column for.
EXTRA_SCHEMA = pa.schema([("step", pa.int32()), ("worker", pa.int32()), ("request_id", pa.string()), ("weight_version", pa.int64())],
                         metadata={"rollout_lab.schema_version": SCHEMA_VERSION})
EXTRA_DIR = "extra"
# Top-level keys an --engine-config YAML may set: the engine (typed knobs and args), the sampling
# params the export does not record, and a planted fault (the lab's own check of this path).
ENGINE_CONFIG_KEYS = ("engine", "workload", "fault")


def load_engine_config(path: Path, cfg: RunConfig) -> RunConfig:
    """cfg with the user's engine config YAML merged in and validated like `engine.args` (vLLM's own
    checks); ConfigError names a bad key or value."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from rollout_lab.config_keys import check_keys

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--engine-config {path} does not exist")
    user = OmegaConf.load(path)
    bad = sorted(set(user) - set(ENGINE_CONFIG_KEYS))
    if bad:
        raise ConfigError(f"--engine-config {path}: key(s) {', '.join(bad)} not allowed; it sets {', '.join(ENGINE_CONFIG_KEYS)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), user)
        check_keys(merged, RunConfig)
        return validate(OmegaConf.to_object(merged))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"--engine-config {path}: {exc}".splitlines()[0]) from None


class _TrackedFile(io.RawIOBase):
    """A file whose reads advance a byte progress bar (every format reads through it)."""

    def __init__(self, path: Path, bar: tqdm):
        self._file, self._bar = open(path, "rb"), bar

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        self._bar.update(n)
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        super().close()


class _Scorer:
    """The sides an export lacks: the trainer's by teacher forcing (float32 reference, batched), the
    sampler's by vLLM prefill scoring on the user's engine configuration."""

    def __init__(self, cfg: RunConfig, model_path: str, batch_tokens: int):
        self.cfg, self.model_path, self.batch_tokens = cfg, model_path, batch_tokens
        self._reference = self._llm = None

    def trainer(self, sequences: list[ExportedSequence]) -> None:
        from rollout_lab.reference import load_reference, reference_logprobs
        from rollout_lab.trainer import resolve_device

        todo = [s for s in sequences if s.trainer_logprobs is None]
        if not todo:
            return
        if self._reference is None:
            self._reference = load_reference(self.model_path, str(resolve_device(self.cfg.trainer.device)))
        scored = reference_logprobs(self._reference, [(s.prompt_token_ids, s.token_ids) for s in todo], self.batch_tokens)
        for s, logprobs in zip(todo, scored):
            s.trainer_logprobs = logprobs

    def sampler(self, sequences: list[ExportedSequence]) -> None:
        from rollout_lab import engine
        from rollout_lab.minimize.predicate import direct_engine_args

        todo = [s for s in sequences if s.sampler_logprobs is None]
        if not todo:
            return
        if self._llm is None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            self._llm = engine.start(model=self.model_path, **direct_engine_args(self.cfg, self.model_path))
            if self.cfg.fault.name:
                from rollout_lab.config import fault_params

                engine.install_fault(self._llm, self.cfg.fault.name, fault_params(self.cfg.fault.name, dict(self.cfg.fault.params)))
        params = engine.sampling_params(None, max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outputs = self._llm.generate([{"prompt_token_ids": s.prompt_token_ids + s.token_ids} for s in todo], params, use_tqdm=False)
        for s, out in zip(todo, outputs):
            full = s.prompt_token_ids + s.token_ids
            s.sampler_logprobs = [out.prompt_logprobs[i][full[i]].logprob for i in range(len(s.prompt_token_ids), len(full))]


@dataclass
class _Totals:
    """Run-wide sums for summary.json, kept as the steps stream by."""

    tokens: int = 0
    abs_diff_sum: float = 0.0
    abs_diff_max: float = 0.0
    spikes: int = 0
    equal: int = 0
    rewards: list[float] = field(default_factory=list)


class _StepWriter:
    """One step at a time: its records file (a row group per batch), requests, extra facts, metrics."""

    def __init__(self, run_dir: Path, run_id: str, cfg: RunConfig, threshold: float, logger, tokenizer):
        self.run_dir, self.run_id, self.cfg, self.threshold = Path(run_dir), run_id, cfg, threshold
        self.logger, self.tokenizer = logger, tokenizer
        self.step: Optional[int] = None
        self.done: list[int] = []
        self.totals = _Totals()
        self._writer = None

    def _open(self, step: int) -> None:
        if step in self.done:
            raise ExportError(f"records of step {step} come again after step {self.done[-1]}: the export must be ordered by step")
        self.step, self.requests, self.extra, self.prompts, self.samples = step, [], [], {}, {}
        self.records_dir = self.run_dir / "records"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.records_dir / f"step_{step:05d}.parquet"
        self._writer = pq.ParquetWriter(self.path.with_suffix(".parquet.tmp"), TOKEN_SCHEMA)

    def add(self, sequences: list[ExportedSequence]) -> None:
        """Append sequences (any steps, in order) whose both sides are known."""
        run: list[ExportedSequence] = []
        for s in sequences:
            if s.step != self.step:
                self._append(run)
                run = []
                if self.step is not None:
                    self._close()
                self._open(s.step)
            run.append(s)
        self._append(run)

    def _append(self, sequences: list[ExportedSequence]) -> None:
        by_worker: dict[int, list] = {}
        for s in sequences:
            if s.prompt_index is None:
                s.prompt_index = self.prompts.setdefault(tuple(s.prompt_token_ids), len(self.prompts))
            if s.sample_index is None:
                s.sample_index = self.samples.get(s.prompt_index, 0)
            self.samples[s.prompt_index] = max(self.samples.get(s.prompt_index, 0), s.sample_index + 1)
            s.request_id = s.request_id or f"{len(self.requests)}"
            by_worker.setdefault(s.worker, []).append(s)
            self.requests.append(s)
            self.extra.append({"step": s.step, "worker": s.worker, "request_id": s.request_id, "weight_version": s.weight_version})
        for worker, group in by_worker.items():
            samples = [Sample(s.prompt_index, s.sample_index, s.request_id, s.prompt_token_ids, s.token_ids, s.sampler_logprobs,
                              s.num_cached_tokens or 0, None, None, "") for s in group]
            table = token_table(self.run_id, RolloutBatch(self.step, worker, samples), [np.asarray(s.trainer_logprobs) for s in group],
                                [s.reward for s in group])
            self._writer.write_table(table)
            self.totals.rewards += [s.reward for s in group if s.reward is not None]
            for s in group:  # written: the step keeps only what its requests and worst tokens need
                s.sampler_logprobs = s.trainer_logprobs = None

    def _close(self) -> None:
        self._writer.close()
        os.replace(self.path.with_suffix(".parquet.tmp"), self.path)
        # One (n, max_tokens, temperature, top_p, top_k) per step, as a sampler sends them: what the minimizer replays.
        w = self.cfg.workload
        longest = max(len(s.token_ids) for s in self.requests)
        write_requests(self.run_dir, self.step, [SampledRequest(
            step=s.step, worker=s.worker, request_id=s.request_id, prompt_index=s.prompt_index, sample_index=s.sample_index,
            prompt_token_ids=s.prompt_token_ids, seed=s.seed, n=1, max_tokens=s.max_tokens or longest,
            temperature=s.temperature if s.temperature is not None else w.temperature,
            top_p=s.top_p if s.top_p is not None else w.top_p, top_k=s.top_k if s.top_k is not None else w.top_k, logprobs=0,
        ) for s in self.requests])
        if any(e["weight_version"] is not None for e in self.extra):
            (self.run_dir / EXTRA_DIR).mkdir(exist_ok=True)
            pq.write_table(pa.Table.from_pylist(self.extra, schema=EXTRA_SCHEMA), self.run_dir / EXTRA_DIR / f"step_{self.step:05d}.parquet")
        self._log_step()
        self.done.append(self.step)

    def _log_step(self) -> None:
        columns = ["worker", "request_id", "position", "token_id", "sampler_logprob", "trainer_logprob", "abs_diff", "reward"]
        frame = pq.read_table(self.path, columns=columns).to_pandas()
        sequence_id = frame["worker"].astype(str).to_numpy() + "/" + frame["request_id"].to_numpy()
        metrics = token_metrics(frame["sampler_logprob"].to_numpy(), frame["trainer_logprob"].to_numpy(), sequence_id, self.threshold)
        rewards = [s.reward for s in self.requests if s.reward is not None]
        if rewards:
            metrics["reward_mean"] = float(np.mean(rewards))
        abs_diff = frame["abs_diff"].to_numpy()
        t = self.totals
        t.tokens += abs_diff.size
        t.abs_diff_sum += float(abs_diff.sum())
        t.abs_diff_max = max(t.abs_diff_max, float(abs_diff.max()))
        t.spikes += int(np.sum(abs_diff > self.threshold))
        t.equal += int(np.sum(abs_diff == 0.0))
        self.logger.log_step(self.step, metrics, abs_diff, self._worst(frame))

    def _worst(self, frame) -> list[dict]:
        """The worst tokens with the text before them, as the loop logs them."""
        k = self.cfg.logger.worst_tokens
        prompts = {(s.worker, s.request_id): s for s in self.requests}
        rows = []
        for i in np.argsort(-frame["abs_diff"].to_numpy())[:k]:
            row = frame.iloc[int(i)]
            s = prompts[(int(row.worker), row.request_id)]
            context = (s.prompt_token_ids + s.token_ids[: int(row.position)])[-24:]
            rows.append({"step": self.step, "worker": int(row.worker), "request_id": row.request_id, "position": int(row.position),
                         "token_id": int(row.token_id), "sampler_logprob": float(row.sampler_logprob),
                         "trainer_logprob": float(row.trainer_logprob), "abs_diff": float(row.abs_diff),
                         "context": self.tokenizer.decode(context), "token": self.tokenizer.decode([int(row.token_id)])})
        return rows

    def finish(self) -> None:
        if self._writer is not None:
            self._close()


def ingest(format_name: str, path: Path, model: str, run_dir: Optional[Path] = None, engine_config: Optional[Path] = None,
           dtype: str = "float32", spike_threshold: Optional[float] = None, batch_sequences: int = 64, batch_tokens: int = 4096,
           logger_mode: str = "offline", progress: bool = True) -> tuple[RunResult, IngestRecord]:
    """Read a `format_name` export at `path` into a run dir (default runs/<date>/<time>-ingest-<format>)."""
    from transformers import AutoTokenizer

    from rollout_lab.loop import environment
    from rollout_lab.models import resolve_model
    from rollout_lab.wandb_log import RunLogger

    if format_name not in FORMATS:
        raise ExportError(f"unknown export format {format_name!r}; choose one of {', '.join(FORMATS)}")
    fmt: ExportFormat = FORMATS[format_name]
    files = fmt.files(Path(path))
    if not fmt.has_sampler_logprobs and engine_config is None:
        raise ConfigError(f"{format_name} exports keep no logprobs: the sampler side needs an engine replay, pass "
                          "--engine-config <yaml of the engine you ran> (docs/your_run.md)")
    started = time.perf_counter()
    cfg = RunConfig(run_name=f"ingest-{format_name}")
    cfg.model.name = model
    cfg.engine.dtype = cfg.trainer.dtype = dtype
    cfg.loop.spike_threshold = spike_threshold
    cfg.logger.mode = logger_mode
    cfg = load_engine_config(engine_config, cfg) if engine_config is not None else validate(cfg)
    run_dir = Path(run_dir or f"runs/{time.strftime('%Y-%m-%d/%H-%M-%S')}-{cfg.run_name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run_dir)
    model_path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    run_id = f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    threshold, threshold_source = threshold_for(cfg)
    scorer = _Scorer(cfg, model_path, batch_tokens)
    logger = RunLogger(cfg, run_dir, run_id, write_config(run_dir, cfg))
    steps = _StepWriter(run_dir, run_id, cfg, threshold, logger, tokenizer)
    total_bytes = sum(f.stat().st_size for f in files)
    sides = {"sampler": set(), "trainer": set()}
    sequences = cached = versions = 0

    def flush(batch: list[ExportedSequence]) -> None:
        for s in batch:
            sides["sampler"].add(s.sampler_logprobs is not None)
            sides["trainer"].add(s.trainer_logprobs is not None)
        scorer.sampler(batch)
        scorer.trainer(batch)
        steps.add(batch)

    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"ingest {format_name}", disable=not progress) as bar:
        batch: list[ExportedSequence] = []
        for file in files:
            with io.BufferedReader(_TrackedFile(file, bar), buffer_size=1 << 20) as handle:
                for s in fmt.sequences(handle, file, tokenizer):
                    sequences += 1
                    cached += s.num_cached_tokens is not None
                    versions += s.weight_version is not None
                    batch.append(s)
                    if len(batch) >= batch_sequences:
                        flush(batch)
                        batch = []
                        bar.set_postfix(sequences=sequences, step=steps.step)
        flush(batch)
        steps.finish()
    if not steps.done:
        raise ExportError(f"{path}: the export holds no sequence")

    t = steps.totals
    result = RunResult(run_id=run_id, run_dir=str(run_dir), status="ok", steps_completed=len(steps.done), num_tokens=t.tokens,
                       abs_diff_max=t.abs_diff_max, abs_diff_mean=t.abs_diff_sum / max(t.tokens, 1),
                       spike_fraction=t.spikes / max(t.tokens, 1), bitwise_equal_fraction=t.equal / max(t.tokens, 1),
                       spike_threshold=threshold, spike_threshold_source=threshold_source,
                       reward_mean=float(np.mean(t.rewards)) if t.rewards else 0.0,
                       environment=environment() | {"source": f"{format_name} export {Path(path).resolve()}"})
    missing = {"num_preemptions": "not in the export (null: unknown)"}
    if cached < sequences:
        missing["num_cached_tokens"] = "not in the export (0 in records)"
    if versions < sequences:
        missing["weight_version"] = "not in the export"
    record = IngestRecord(
        format=format_name, source=str(Path(path).resolve()), model=model,
        sampler_side=_side(sides["sampler"], FROM_EXPORT, REPLAYED_SAMPLER),
        trainer_side=_side(sides["trainer"], FROM_EXPORT, COMPUTED_TRAINER),
        engine_config=str(Path(engine_config).resolve()) if engine_config else None,
        files=len(files), sequences=sequences, tokens=t.tokens, steps=steps.done, bytes_read=total_bytes, missing=missing,
    )
    cfg.loop.steps = len(steps.done)
    write_config(run_dir, cfg)
    result.seconds = record.seconds = time.perf_counter() - started
    summary = {k: v for k, v in asdict(result).items() if k != "crash"}
    result.wandb_dir = logger.finish(summary | {"crash_key": None, "ingest/format": format_name,
                                                "ingest/sampler_side": record.sampler_side, "ingest/trainer_side": record.trainer_side})
    write_summary(run_dir, result)
    record.write(run_dir)
    return result, record


def _side(given: set[bool], exported: str, computed: str) -> str:
    """Who gave a side: the export, the lab, or each for some sequences."""
    if given == {True}:
        return exported
    if given == {False}:
        return computed
    return f"mixed: {exported} where present, else {computed}"
