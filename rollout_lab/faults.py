"""Planted faults: known silent (or crashing) engine bugs, the ground truth for the lab's detectors.

`install(worker, name, params)` runs inside vLLM's worker, through
`LLM.collective_rpc(install, args=(name, params))`, and wraps the worker's model runner. Faults
corrupt what the engine computes (the block tables it reads, logits), never our records; the
trainer never sees them. This module imports only torch, so a standalone repro.py can carry it
verbatim (the minimizer does).

Planted faults (ground truth for the lab's own detectors). PARAMS below declares each one's
parameters and their defaults: config.fault_params and the conf/fault/<name>.yaml presets read it.
  stale_state    Trigger: a request resumes after a preemption. With probability `p` (per
                 request, seeded), it keeps reading through the block table it held before the
                 preemption (KV blocks and, for hybrid models, the SSM state slot), whose blocks
                 other requests may have been given since. Silent, rare, only under pressure.
                 The KV it then computes is wrong and enters the prefix cache, so later
                 requests with the same prompt that hit the cache go wrong too.
  foreign_ssm_state
                 Trigger: a request resumes after a preemption (hybrid and Mamba models). With
                 probability `p` (per request, seeded), its first step after the resume step
                 (the re-prefill) starts from the SSM and conv state another request left in its
                 state slot (one that ran the step before the resume, a seeded pick), not from
                 its own: a request reading another request's slot, the bug of vLLM PR #32118.
                 Writes stay right, as in index_overflow: the other request's slot is left as it
                 was, so only the resumed request goes wrong, from its first Mamba layer on.
  index_overflow Emulates a 32-bit offset overflow: a block id b with b * `stride` >= `threshold`
                 (stride in blocks: at stride 1 the threshold is in blocks) is read from
                 b mod (threshold / stride). Writes are unaffected. Attention layers read KV
                 through the wrapped block table; a Mamba layer whose state slot b is past the
                 threshold starts each step from the state in slot b mod (threshold / stride) and
                 writes to b, so pure Mamba models fail too. Only requests holding blocks past the
                 threshold go wrong, so failures track cache size and the number of blocks in use.
  logit_noise    Gaussian noise of std `scale` on every logit of every request: a magnitude-only
                 perturbation whose structure depends on nothing (the negative control).
  batch_threshold
                 Trigger: an engine step schedules >= `min_batch` requests at once. Gaussian noise
                 of std `scale` on every logit of every request in that step; steps with fewer
                 requests are exact. Silent, and switched on by batch size: clean while
                 max_num_seqs < min_batch, failing once the scheduler may run min_batch requests
                 together (and as long as enough requests are in flight).
  kv_noise       Trigger: a token's K and V are written into a KV block with id >= `min_block`.
                 They are stored with Gaussian noise of std `scale` x the row's RMS, per element
                 (seeded): a small write-side KV corruption confined to a block range, for the
                 shift test (docs/shift.md) to find below the spike threshold. Reads are exact;
                 every later token that attends to those positions sees the noise.
  engine_crash   Raises RuntimeError in the forward pass at engine step `at_step`: a real
                 exception inside the engine, for crash capture and crash minimization.

An engine step is a call of the model runner's execute_model that schedules tokens. The Mamba
state faults read the slot at column 0 of a request's Mamba block row, the one vLLM's kernels use
with mamba_cache_mode 'none' (prefix caching off); install refuses other modes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

# Each planted fault's parameters and their defaults: the one declaration.
PARAMS = {
    "stale_state": {"p": 1.0, "seed": 0},
    "foreign_ssm_state": {"p": 1.0, "seed": 0},
    "index_overflow": {"threshold": 16, "stride": 1},
    "logit_noise": {"scale": 0.05, "seed": 0},
    "kv_noise": {"min_block": 64, "scale": 0.05, "seed": 0},
    "engine_crash": {"at_step": 3},
    "batch_threshold": {"min_batch": 4, "scale": 0.1, "seed": 0},
}


def _chance(seed: int, request_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, request id): the same run corrupts the same requests."""
    digest = hashlib.sha256(f"{seed}/{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


@dataclasses.dataclass
class _ForeignRead:
    """foreign_ssm_state: the state a resumed request will read, copied from `owner`'s slots at engine step `step`."""

    owner: str
    step: int
    states: list[list[torch.Tensor]]  # per Mamba cache group, per state tensor: the owner's slot


class _FaultState:
    """What a planted fault tracks across engine steps, inside one worker."""

    def __init__(self, runner, name: str, params: dict):
        self.runner, self.name, self.params = runner, name, params
        self.step = 0
        self.batch_size = 0  # requests scheduled in the current engine step
        self.block_rows: dict[str, tuple[list[int], ...]] = {}  # req -> blocks per group, this life
        self.stale_rows: dict[str, tuple[list[int], ...]] = {}  # req -> blocks before its preemption
        self.last_batch: list[str] = []  # the requests the step before scheduled
        # foreign_ssm_state and index_overflow: per Mamba cache group, its id and its layers' state
        # tensors (dim 0: the slot); foreign_ssm_state: per resumed request, the state it will read
        # at its next step.
        self.ssm_states: list[tuple[int, list[torch.Tensor]]] = []
        self.foreign_reads: dict[str, _ForeignRead] = {}
        self.generator = torch.Generator(device="cpu").manual_seed(int(params.get("seed", 0)))

    def begin_step(self, scheduler_output) -> None:
        """Before the runner's execute_model: track the step and make the planted reads it starts from."""
        if not scheduler_output.num_scheduled_tokens:
            # No forward pass, so not a step. CUDA vLLM (async scheduling) queues two batches; with
            # the lab's RecordingScheduler (no AsyncScheduler) every other one is empty, and counting
            # it made "the step before" a resume an empty batch: foreign_ssm_state never fired there.
            return
        self.observe(scheduler_output)
        if self.name == "foreign_ssm_state":
            self.read_foreign_states(scheduler_output)
        if self.name == "index_overflow":
            self.read_wrapped_states(scheduler_output)
        self.batch_size = len(scheduler_output.num_scheduled_tokens)
        if self.name == "engine_crash" and self.step == int(self.params["at_step"]):
            raise RuntimeError(f"planted engine_crash at engine step {self.step}")
        self.step += 1

    def observe(self, scheduler_output) -> None:
        """Track each request's block ids; on resume, remember the pre-preemption ones."""
        resumed = set(scheduler_output.scheduled_cached_reqs.resumed_req_ids or ())
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in self.block_rows and new.num_computed_tokens == 0:
                resumed.add(new.req_id)
            self._start_life(new.req_id, new.block_ids, resumed)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, new_blocks in zip(cached.req_ids, cached.new_block_ids):
            if req_id in resumed:
                self._start_life(req_id, new_blocks or (), resumed)
            elif new_blocks:
                row = self.block_rows.setdefault(req_id, tuple([] for _ in new_blocks))
                for group, blocks in zip(row, new_blocks):
                    group.extend(blocks)
        self.last_batch = list(scheduler_output.num_scheduled_tokens)

    def _start_life(self, req_id: str, block_ids, resumed: set) -> None:
        if req_id in resumed and self.name in ("stale_state", "foreign_ssm_state") and req_id in self.block_rows:
            if _chance(int(self.params["seed"]), req_id) < float(self.params["p"]):
                if self.name == "stale_state":
                    self.stale_rows[req_id] = tuple(list(g) for g in self.block_rows[req_id])
                else:
                    self._copy_foreign_state(req_id)
        self.block_rows[req_id] = tuple(list(g) for g in block_ids)

    def _copy_foreign_state(self, reader: str) -> None:
        """At `reader`'s resume step, before it runs: copy the state another request of the step before
        left in its slots (the resume re-prefills from zero, and vLLM may hand those slots on now)."""
        owners = [r for r in self.last_batch if r != reader]
        if not owners:
            return
        owner = owners[int(_chance(int(self.params["seed"]), f"{reader}/owner") * len(owners))]
        states = [[t[self._state_slot(owner, group)].clone() for t in tensors] for group, tensors in self.ssm_states]
        self.foreign_reads[reader] = _ForeignRead(owner, self.step, states)

    def read_foreign_states(self, scheduler_output) -> list[tuple[str, str]]:
        """Before a step runs: each request resumed in an earlier step finds another request's state in
        its slots (the read of the bug; its own writes then go to its own slots); the (reader, owner) pairs."""
        pairs = []
        for reader, read in list(self.foreign_reads.items()):
            if read.step < self.step and reader in scheduler_output.num_scheduled_tokens:
                for (group, tensors), states in zip(self.ssm_states, read.states):
                    slot = self._state_slot(reader, group)
                    for tensor, state in zip(tensors, states):
                        tensor[slot].copy_(state)
                del self.foreign_reads[reader]
                pairs.append((reader, read.owner))
        return pairs

    def _state_slot(self, req_id: str, group: int) -> int:
        """The state slot `req_id` reads in Mamba cache group `group`: column 0 of its block row (mode 'none')."""
        return self.block_rows[req_id][group][0]

    def _overflow_blocks(self) -> int:
        """index_overflow's threshold in blocks: ids from here on are read from id mod this."""
        return max(int(self.params["threshold"]) // int(self.params["stride"]), 1)

    def read_wrapped_states(self, scheduler_output) -> list[tuple[str, int, int]]:
        """Before a step runs: each scheduled request whose state slot b is past the threshold reads the
        state in slot b mod threshold (copied into b; its writes then go to b); (request, b, source) triples."""
        threshold, reads = self._overflow_blocks(), []
        for group, tensors in self.ssm_states:
            wrapped = [(req_id, self._state_slot(req_id, group)) for req_id in scheduler_output.num_scheduled_tokens
                       if req_id in self.block_rows and self.block_rows[req_id][group]]
            wrapped = [(req_id, slot, slot % threshold) for req_id, slot in wrapped if slot >= threshold]
            if wrapped:
                _, slots, sources = zip(*wrapped)
                for tensor in tensors:
                    tensor[torch.tensor(slots, device=tensor.device)] = tensor[torch.tensor(sources, device=tensor.device)]
                reads.extend(wrapped)
        return reads

    def remap_block_table(self, group_id: int, block_table: torch.Tensor, num_reqs: int) -> torch.Tensor:
        """The block table the corrupted kernel would read."""
        if self.name == "index_overflow":
            if any(group_id == group for group, _ in self.ssm_states):
                return block_table  # a state slot is both read and written through it: read_wrapped_states
            threshold = self._overflow_blocks()
            return torch.where(block_table >= threshold, block_table % threshold, block_table)
        if self.name == "stale_state" and self.stale_rows:
            table = block_table.clone()
            for row, req_id in self._rows(group_id, block_table, num_reqs):
                stale = self.stale_rows.get(req_id)
                current = self.block_rows.get(req_id, ())
                # Only a row that provably is this request's (its first block matches) is touched.
                if (
                    stale is not None and group_id < len(stale) and stale[group_id]
                    and group_id < len(current) and current[group_id]
                    and int(block_table[row, 0]) == current[group_id][0]
                ):
                    old = torch.tensor(stale[group_id][: table.shape[1]], dtype=table.dtype)
                    table[row, : len(old)] = old.to(table.device)
            return table
        return block_table

    def _rows(self, group_id: int, block_table: torch.Tensor, num_reqs: int) -> list[tuple[int, str]]:
        """(row, request id) of the batch's rows that may need a stale table."""
        batch = getattr(self.runner, "input_batch", None)
        if batch is not None:  # vLLM CPU and model runner v1: rows follow the persistent batch
            return list(enumerate(batch.req_ids[:num_reqs]))
        # Model runner v2 (vLLM 0.25 on CUDA) orders each step's rows afresh and keeps no batch:
        # find a stale request's row by its whole current block list (a request's last block is its own).
        table, rows = block_table[:num_reqs].cpu(), []
        for req_id in self.stale_rows:
            current = self.block_rows.get(req_id, ())
            if group_id < len(current) and current[group_id]:
                blocks = torch.tensor(current[group_id][: table.shape[1]], dtype=table.dtype)
                hits = (table[:, : len(blocks)] == blocks).all(dim=1).nonzero().flatten().tolist()
                if len(hits) == 1:
                    rows.append((hits[0], req_id))
        return rows


def _wrap_builders(runner, state: _FaultState) -> None:
    # Both model runners (v1, and v2 through attn_utils.build_attn_metadata) build every group's
    # metadata with these builders. v1 builds a second group of the same spec by update_block_table.
    for groups in runner.attn_groups:
        for attn_group in groups:
            for builder in attn_group.metadata_builders:
                builder.build = _remapping_build(builder.build, attn_group.kv_cache_group_id, state)
                if getattr(builder, "supports_update_block_table", False):
                    builder.update_block_table = _remapping_update(builder.update_block_table, attn_group.kv_cache_group_id, state)


def _remapping_build(build, group_id: int, state: _FaultState):
    def wrapped(common_prefix_len, common_attn_metadata, *args, **kwargs):
        table = state.remap_block_table(group_id, common_attn_metadata.block_table_tensor, common_attn_metadata.num_reqs)
        if table is not common_attn_metadata.block_table_tensor:
            common_attn_metadata = dataclasses.replace(common_attn_metadata, block_table_tensor=table)
        return build(common_prefix_len, common_attn_metadata, *args, **kwargs)

    return wrapped


def _remapping_update(update_block_table, group_id: int, state: _FaultState):
    def wrapped(metadata, block_table, slot_mapping):
        return update_block_table(metadata, state.remap_block_table(group_id, block_table, block_table.shape[0]), slot_mapping)

    return wrapped


def _ssm_states(runner) -> list[tuple[int, list[torch.Tensor]]]:
    """Per Mamba cache group: (its id, every state tensor of its layers); none for an attention-only model."""
    groups = [g for groups in runner.attn_groups for g in groups if "Mamba" in type(g.kv_cache_spec).__name__]
    if groups and runner.cache_config.mamba_cache_mode != "none":
        raise ValueError(f"the planted Mamba state read reads a request's one state slot (mamba_cache_mode 'none'); this "
                         f"engine runs mamba_cache_mode {runner.cache_config.mamba_cache_mode!r}: set engine.enable_prefix_caching=false")
    context = runner.compilation_config.static_forward_context
    states = []
    for group in groups:
        # vLLM 0.32 binds a tuple (conv, ssm) per layer; older releases a list of them per virtual engine.
        pending, tensors = [context[name].kv_cache for name in group.layer_names], []
        while pending:
            item = pending.pop()
            if isinstance(item, (list, tuple)):
                pending.extend(item)
            else:
                tensors.append(item)
        states.append((group.kv_cache_group_id, tensors))
    return states


def _wrap_kv_writes(runner, state: _FaultState) -> None:
    """kv_noise: every attention layer's KV write adds noise to the rows bound for blocks >= min_block."""
    impls = [m.impl for m in runner.model.modules() if hasattr(getattr(m, "impl", None), "do_kv_cache_update")]
    if not impls:
        raise ValueError("fault kv_noise needs an attention backend that writes the KV cache through "
                         "do_kv_cache_update (vLLM CPU's CPU_ATTN does); this engine's has none")
    min_block, scale = int(state.params["min_block"]), float(state.params["scale"])
    for impl in impls:
        update = impl.do_kv_cache_update

        def noisy_update(layer, key, value, kv_cache, slot_mapping, update=update):
            block_size = kv_cache.shape[2]  # CPU_ATTN layout: [num_blocks, num_kv_heads, block_size, 2 * head_size]
            rows = (slot_mapping[: key.shape[0]] // block_size) >= min_block
            if bool(rows.any()):
                key, value = key.clone(), value.clone()
                for tensor in (key, value):
                    chosen = tensor[rows].float()
                    rms = chosen.pow(2).mean(dim=tuple(range(1, chosen.dim())), keepdim=True).sqrt()
                    noise = torch.randn(chosen.shape, generator=state.generator, dtype=torch.float32)
                    tensor[rows] = (chosen + scale * rms * noise).to(tensor.dtype)
            return update(layer, key, value, kv_cache, slot_mapping)

        impl.do_kv_cache_update = noisy_update


def install(worker, name: str, params: dict) -> str:
    """Plant fault `name` (params already complete) in `worker`'s model runner; returns a description."""
    runner = worker.model_runner
    state = _FaultState(runner, name, params)
    if name in ("foreign_ssm_state", "index_overflow"):
        state.ssm_states = _ssm_states(runner)
        if name == "foreign_ssm_state" and not state.ssm_states:
            raise ValueError("fault foreign_ssm_state needs a model with Mamba layers (hybrid-tiny, mamba2-tiny, ...); "
                             "this one has only attention layers")
    # v1 and v2 model runners alike: the worker calls model_runner.execute_model (then sample_tokens).
    execute_model = runner.execute_model

    def observed_execute_model(scheduler_output, *args, **kwargs):
        state.begin_step(scheduler_output)
        return execute_model(scheduler_output, *args, **kwargs)

    runner.execute_model = observed_execute_model
    if name in ("stale_state", "index_overflow"):
        _wrap_builders(runner, state)
    if name in ("logit_noise", "batch_threshold"):
        model = runner.model
        compute_logits = model.compute_logits

        def noisy_compute_logits(*args, **kwargs):
            logits = compute_logits(*args, **kwargs)
            if logits is None or (name == "batch_threshold" and state.batch_size < int(params["min_batch"])):
                return logits
            noise = torch.randn(logits.shape, generator=state.generator, dtype=torch.float32)
            return logits + float(params["scale"]) * noise.to(logits.device, logits.dtype)

        model.compute_logits = noisy_compute_logits
    if name == "kv_noise":
        _wrap_kv_writes(runner, state)
    return f"{name} {json.dumps(params, sort_keys=True)}"
