"""Export formats: one module per training framework behind one interface (base.ExportFormat), and the registry.

Adding a format is a module with an ExportFormat and a line in FORMATS.
"""
from __future__ import annotations

from rollout_lab.ingest.formats import generic, nemo_rl, prime_rl, slime, trl, verl
from rollout_lab.ingest.formats.base import ExportFormat

FORMATS: dict[str, ExportFormat] = {
    f.name: f for f in (nemo_rl.FORMAT, prime_rl.FORMAT, slime.FORMAT, verl.FORMAT, trl.FORMAT, generic.FORMAT)
}
