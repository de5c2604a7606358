"""Hydra callback that ends every multirun with the sweep analysis (registered in conf/config.yaml)."""
from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class AnalyzeSweep(Callback):
    """After the last job of a multirun: analyze the sweep dir and print the ranked verdicts."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # Imported here: single runs instantiate the callback too and should not pay for scipy.
        from rollout_lab.analysis.report import analyze_sweep, print_report

        report = analyze_sweep(config.hydra.sweep.dir)
        print_report(report)
