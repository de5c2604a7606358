"""The oracles: one interface (base.Oracle) and a registry. Each module below registers its oracle
when imported; a new oracle is a module here and its name on this import line (docs/oracles.md)."""
from rollout_lab.oracles import batch_invariance, crash, hang, metamorphic, reference, weight_sync  # noqa: F401
from rollout_lab.oracles.base import (Expected, Oracle, Replay, Trial, get, measure_trial, oracle_of, register,  # noqa: F401
                                      trial_oracles, unregister)
