"""compat.reload_weights' capability check on the runner shapes the vLLM releases have."""
from types import SimpleNamespace

import pytest
import torch
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

from rollout_lab import compat


class V1Runner:  # vLLM's GPUModelRunner and CPU runner: the keyword arguments themselves
    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        self.loaded = (list(weights_iterator), is_checkpoint_format)

    def get_model(self):
        return torch.nn.Module()


class V2Runner(V1Runner):  # model runner v2 (CUDA vLLM 0.25) forwards everything to the v1 runner's reload
    def reload_weights(self, *args, **kwargs):
        self.loaded = (list(kwargs["weights_iterator"]), kwargs["is_checkpoint_format"])


class OldRunner:  # no in-place reload with an iterator
    def reload_weights(self):
        pass


@pytest.mark.parametrize("runner", [V1Runner(), V2Runner()])
def test_runners_that_take_an_iterator_get_one(runner):
    compat.reload_weights(runner, iter([("w", 1)]))
    assert runner.loaded == ([("w", 1)], True)


def test_a_runner_without_it_gets_one_line_naming_what_is_missing():
    with pytest.raises(RuntimeError, match=r"OldRunner.reload_weights\(weights_iterator=..., is_checkpoint_format=...\) is missing"):
        compat.reload_weights(OldRunner(), iter([]))


class PackingExperts(CPUUnquantizedExperts):  # records the post-load step instead of prepacking
    def __init__(self):
        self.packed = []

    def process_weights_after_loading(self, layer):
        self.packed.append(layer)


def _moe_layer(experts) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.quant_method = SimpleNamespace(moe_kernel=SimpleNamespace(fused_experts=experts))
    return layer


def test_cpu_moe_experts_are_prepacked_again_after_the_reload_and_no_other_layer_is():
    cpu, other = _moe_layer(PackingExperts()), _moe_layer(SimpleNamespace(process_weights_after_loading=pytest.fail))
    model = torch.nn.ModuleList([cpu, other, torch.nn.Linear(2, 2)])
    runner = V1Runner()
    runner.get_model = lambda: model
    compat.reload_weights(runner, iter([]))
    assert cpu.quant_method.moe_kernel.fused_experts.packed == [cpu]
