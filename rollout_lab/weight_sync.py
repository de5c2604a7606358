"""Weight sync from the trainer into vLLM, through vLLM's own in-place reload path.

The trainer ships (checkpoint_name, array) pairs as numpy (Ray moves numpy zero-copy; pickled
torch tensors go through torch.save and cost seconds per step). A worker extension, mixed into
vLLM's worker class by `worker_extension_cls` and called with `LLM.collective_rpc`, hands them
to the model runner's `reload_weights`. Plain `model.load_weights` is not enough: on CPU, vLLM
repacks linear weights into oneDNN handles after loading and drops the originals, and
`reload_weights` restores, loads and repacks them layer by layer. The same call works on GPU.
"""
from __future__ import annotations

import numpy as np
import torch

from rollout_lab import compat

# numpy has no bfloat16: such tensors travel as their int16 bit pattern.
_BITCAST = {torch.bfloat16: torch.int16}


def encode(named_tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, str, np.ndarray]]:
    """(name, dtype, array) triples that Ray can move without copying."""
    out = []
    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        carrier = tensor.view(_BITCAST[tensor.dtype]) if tensor.dtype in _BITCAST else tensor
        out.append((name, str(tensor.dtype).removeprefix("torch."), carrier.numpy()))
    return out


def decode(encoded: list[tuple[str, str, np.ndarray]]):
    """Iterate (name, tensor) pairs back from `encode`'s triples."""
    for name, dtype_name, array in encoded:
        dtype = getattr(torch, dtype_name)
        # Ray hands out read-only views of its object store; torch wants writable memory.
        tensor = torch.from_numpy(array.copy())
        yield name, (tensor.view(dtype) if dtype in _BITCAST else tensor)


class Shipment:
    """`encode`'s triples as one plain object for `collective_rpc`. To an engine core in its own process
    (engine.multiprocessing) vLLM sends the call through msgpack, which would deliver a bare list's arrays
    as [dtype, shape, buffer index] lists; an object it cannot encode it pickles whole (the sampler sets
    VLLM_ALLOW_INSECURE_SERIALIZATION for that engine)."""

    def __init__(self, encoded: list[tuple[str, str, np.ndarray]]):
        self.encoded = encoded


class WeightSyncExtension:
    """Methods vLLM mixes into its worker; called through `LLM.collective_rpc`."""

    def rl_load_weights(self, shipment: Shipment) -> int:
        """Load the shipment's (name, dtype, array) weights through vLLM's in-place reload."""
        compat.reload_weights(self.model_runner, decode(shipment.encoded))
        return len(shipment.encoded)
