"""kv_noise on a stand-in attention layer: K/V rows bound for blocks >= min_block are written noised, the rest exact."""
from types import SimpleNamespace

import torch

from rollout_lab.config import fault_params
from rollout_lab.faults import install


class Layer(torch.nn.Module):
    """An attention layer as the fault finds it: an `impl` whose do_kv_cache_update writes the cache."""

    def __init__(self):
        super().__init__()
        self.written = None
        self.impl = SimpleNamespace(do_kv_cache_update=self.write)

    def write(self, layer, key, value, kv_cache, slot_mapping):
        self.written = (key, value)


def test_only_rows_in_high_blocks_are_noised():
    layer = Layer()
    runner = SimpleNamespace(model=torch.nn.Sequential(layer), attn_groups=[], execute_model=lambda out: None)
    params = fault_params("kv_noise", {"min_block": 2, "scale": 0.1})
    assert params == {"min_block": 2, "scale": 0.1, "seed": 0}
    install(SimpleNamespace(model_runner=runner), "kv_noise", params)
    block_size = 4
    kv_cache = torch.zeros(8, 1, block_size, 2 * 16)  # CPU_ATTN: [blocks, kv heads, block size, 2 x head size]
    key, value = torch.ones(6, 1, 16), torch.full((6, 1, 16), 2.0)
    slots = torch.tensor([0, 5, 7, 8, 11, 30])  # blocks 0, 1, 1, 2, 2, 7
    layer.impl.do_kv_cache_update(layer, key, value, kv_cache, slots)
    written_key, written_value = layer.written
    assert torch.equal(written_key[:3], key[:3]) and torch.equal(written_value[:3], value[:3])
    key_noise, value_noise = written_key[3:] - 1.0, (written_value[3:] - 2.0) / 2.0  # scale x RMS: 0.1 x 1, 0.1 x 2
    assert 0.05 < key_noise.std() < 0.15 and 0.05 < value_noise.std() < 0.15
    assert torch.equal(key, torch.ones(6, 1, 16))  # the caller's tensors are left as they were
