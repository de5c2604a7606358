"""Stored clean profiles: the largest clean divergence at each capture point, per model, device, engine
release and dtype, in <cache>/clean_profiles.json (like calibrate.py's spike thresholds).

`python -m rollout_lab.localize <run_dir> --store-profile` measures one on a run's replay (its clean
tokens) and stores it; every later localization of that model and setting raises its clean levels to
at least the profile's, so a run whose own replay shows few clean tokens still has a clean level.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from rollout_lab.localize.divergence import Point
from rollout_lab.models import cache_dir
from rollout_lab.tolerances import calibration_key


@dataclass
class CleanProfile:
    """Per capture point (by label, forward order), the largest divergence clean tokens showed there."""

    key: str
    points: list[str]
    clean_max: list[float]
    tokens: int
    source: str

    def levels_for(self, points: list[Point]) -> Optional[list[float]]:
        """The profile's maxima in the order of `points`; None when the points differ (another architecture)."""
        return self.clean_max if [p.label() for p in points] == self.points else None


def profile_key(model: str, dtype: str) -> str:
    """'<model> | <device> | <vLLM distribution and version> | <dtype>'."""
    return f"{Path(model).name} | {calibration_key(dtype)}"


def profiles_path() -> Path:
    return cache_dir() / "clean_profiles.json"


def read(model: str, dtype: str, path: Optional[Path] = None) -> Optional[CleanProfile]:
    """The stored profile of this model and setting, or None."""
    path = path or profiles_path()
    if not path.is_file():
        return None
    entry = json.loads(path.read_text()).get(profile_key(model, dtype))
    return None if entry is None else CleanProfile(**entry)


def write(profile: CleanProfile, path: Optional[Path] = None) -> Path:
    """Store (or replace) the profile under its key; returns the file."""
    path = path or profiles_path()
    table = json.loads(path.read_text()) if path.is_file() else {}
    table[profile.key] = asdict(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    return path
