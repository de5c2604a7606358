"""The hang and died oracles: a trial (or an engine start) that made no progress for the hunt's
timeout, and an engine process that ended without a word. The hunt's supervisor sees them
(hunt/supervise.py); the minimizer does not replay them."""
from __future__ import annotations

from typing import Optional

from rollout_lab.oracles.base import Oracle, register


class Stopped(Oracle):
    """A trial that never finished: `name` says how (hang, died)."""

    def __init__(self, name: str):
        self.name = self.signature_kind = name

    def why_not_minimized(self) -> Optional[str]:
        return "the minimizer replays crashes and mismatches, not hangs or dead engine processes"


register(Stopped("hang"))
register(Stopped("died"))
