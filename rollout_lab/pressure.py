"""High block ids on purpose: the engine's free block queue started near the top of its pool.

A fresh vLLM block pool hands out blocks from the head of its free queue, lowest id first, so a
small workload on a big cache only ever holds the lowest block ids and state slots, and a bug that
needs a high one (a 32-bit `index * stride` passing 2^31) is never reached. A pressure preset's
`block_pool_head: f` makes the engine's free queue start at block id f x num_blocks (and wrap round
to id 1 after the top), before each RL step's and each hunt trial's requests: they are then handed
the ids from there up. KV blocks and Mamba state slots come from the same pool, so both move.

It rebuilds the queue with vLLM's own FreeKVCacheBlockQueue (as engine.reset does):
no request, no kernel, whatever the cache size. Throwaway requests would not do: a pool that frees
uncached blocks to the head of the queue (vLLM 0.32) hands the same low ids out again, and on a
Mamba model a request holds one slot, so reaching slot 62k would take 62k requests held at once.
"""
from __future__ import annotations

from typing import Optional

from rollout_lab import compat


def head_block(fraction: float, num_blocks: int) -> int:
    """The block id the free queue starts at: fraction x num_blocks, kept off the null block 0."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"block_pool_head={fraction!r} must be a fraction of the pool in [0, 1)")
    return min(max(int(fraction * num_blocks), 1), num_blocks - 1)


def move_pool_head(llm, fraction: Optional[float]) -> Optional[int]:
    """Start the engine's free block queue at block id fraction x num_blocks (the ids below follow
    the top); returns that id. None: leave the pool as it is. Every block must be free."""
    if fraction is None:
        return None
    pool = compat.block_pool(llm)
    held = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
    if held:
        raise RuntimeError(f"block_pool_head: {held} blocks are still held by requests; the queue is moved between requests")
    head = head_block(fraction, pool.num_gpu_blocks)
    # Cached blocks keep their hashes: the prefix cache still finds them, only the order changes.
    compat.hand_out_blocks_in_order(pool, pool.blocks[head:] + pool.blocks[1:head])
    return head
