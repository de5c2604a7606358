"""block_pool_head: where a vLLM block pool's free queue starts, and the presets that set it."""
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf
from vllm.v1.core.block_pool import BlockPool

from rollout_lab.config import ConfigError, RunConfig, validate
from rollout_lab.hunt.space import PRESSURE_DIR, with_pressure
from rollout_lab.pressure import head_block, move_pool_head


def engine_with_pool(num_blocks: int, enable_caching: bool = False):
    """An object shaped like vllm.LLM down to its in-process block pool (a real vLLM BlockPool)."""
    pool = BlockPool(num_blocks, enable_caching, hash_block_size=16)
    scheduler = SimpleNamespace(kv_cache_manager=SimpleNamespace(block_pool=pool))
    llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace(engine_core=SimpleNamespace(scheduler=scheduler))))
    return llm, pool


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


@pytest.mark.parametrize("fraction, num_blocks, head", [(0.8, 223, 178), (0.9, 77476, 69728), (0.0, 10, 1), (0.99, 10, 9)])
def test_the_head_is_that_fraction_of_the_pool_kept_off_the_null_block(fraction, num_blocks, head):
    assert head_block(fraction, num_blocks) == head


@pytest.mark.parametrize("fraction", [1.0, -0.1, 2])
def test_a_fraction_outside_the_pool_is_refused(fraction):
    with pytest.raises(ValueError, match="block_pool_head"):
        head_block(fraction, 100)


def test_requests_get_the_top_ids_first_then_wrap_to_the_lowest():
    llm, pool = engine_with_pool(10)
    assert ids(pool.get_new_blocks(2)) == [1, 2]  # a fresh pool: lowest first
    pool.free_blocks(pool.blocks[1:3])
    assert move_pool_head(llm, 0.5) == 5
    assert ids(pool.get_new_blocks(7)) == [5, 6, 7, 8, 9, 1, 2]
    assert pool.get_num_free_blocks() == 2


def test_a_pool_with_blocks_still_held_is_not_moved():
    llm, pool = engine_with_pool(8, enable_caching=True)
    pool.free_block_queue.remove(pool.blocks[3])  # a held block
    with pytest.raises(RuntimeError, match="1 blocks are still held"):
        move_pool_head(llm, 0.5)


def test_no_head_leaves_the_pool_as_it_is():
    llm, pool = engine_with_pool(10)
    queue = pool.free_block_queue
    assert move_pool_head(llm, None) is None and pool.free_block_queue is queue


def test_an_engine_core_in_another_process_is_named():
    llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=object()))
    with pytest.raises(RuntimeError, match="engine.multiprocessing=false"):
        move_pool_head(llm, 0.5)


def test_the_hunt_point_carries_the_presets_head_and_drops_a_previous_one():
    high = with_pressure({"model": "smollm2", "pressure": "high_ids", "engine.block_size": 128})
    assert high["block_pool_head"] == 0.8 and high["engine.block_size"] == 32
    # A neighbour of that engine with another preset keeps no head of the old one.
    assert "block_pool_head" not in with_pressure(high | {"pressure": "kv_tight"})


@pytest.mark.parametrize("overrides, message", [({"block_pool_head": 1.5}, "fraction in"),
                                                ({"block_pool_head": 0.5, "engine": {"multiprocessing": True}}, "multiprocessing")])
def test_the_run_config_refuses_a_head_it_cannot_move(overrides, message):
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), overrides))
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(PRESSURE_DIR / f"{name}.yaml"))


@pytest.mark.parametrize("model, tensors, page_bytes, crossing", [
    # mamba2-tiny: 4 layers, each its own tensor; page = conv 640x3 + SSM 8x64x64 = 34,688 float32 elements.
    ("mamba2-tiny", 4, 34688 * 4, -(-2**31 // 34688)),
    # hybrid-tiny: 2 tensors (an attention and a Mamba layer each), 144-token attention page of 2x2x64 a token.
    ("hybrid-tiny", 2, 144 * 256 * 4, -(-2**31 // (144 * 256))),
])
def test_many_slots_gpu_puts_the_head_past_the_32_bit_crossing(model, tensors, page_bytes, crossing):
    gpu = preset("many_slots_gpu")
    slots = gpu["pressure_by_model"][model]["engine"]["kv_cache_memory_bytes"] // (tensors * page_bytes)
    assert head_block(gpu["block_pool_head"], slots) > crossing


@pytest.mark.parametrize("fraction, num_blocks", [(0.8, 223), (0.0, 10), (0.99, 10)])
def test_an_emitted_repro_moves_the_head_where_the_rl_job_and_the_minimizer_do(fraction, num_blocks):
    from rollout_lab.minimize.script import ReproSpec, repro_source
    from rollout_lab.minimize.standalone import Case, Expected, Request

    case = Case("m", {"dtype": "float32"}, [Request([1, 2, 3], 0)], 4, block_pool_head=fraction)
    namespace = {}
    exec(repro_source(ReproSpec("[Bug]: t", "d.", "m", case, Expected("mismatch", 1e-3, request_class="any"))), namespace)
    ours, ours_pool = engine_with_pool(num_blocks)
    theirs, theirs_pool = engine_with_pool(num_blocks)
    move_pool_head(ours, fraction)
    namespace["move_pool_head"](theirs)
    assert ids(theirs_pool.get_new_blocks(num_blocks - 1)) == ids(ours_pool.get_new_blocks(num_blocks - 1))
