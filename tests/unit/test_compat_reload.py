"""compat.reload_weights' capability check on the runner shapes the vLLM releases have."""
import pytest

from rollout_lab import compat


class V1Runner:  # vLLM's GPUModelRunner and CPU runner: the keyword arguments themselves
    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        self.loaded = (list(weights_iterator), is_checkpoint_format)


class V2Runner:  # model runner v2 (CUDA vLLM 0.25) forwards everything to the v1 runner's reload
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
