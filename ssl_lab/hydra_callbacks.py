"""Hydra callbacks: every multirun ends with its comparison tables (per run, and mean ± std over seeds), so a
comparison is one command; and every job of it knows it is job k of N."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

JOBS_ENV = "SSL_LAB_MULTIRUN_JOBS"  # how many jobs this multirun launches (CountJobs), read by callbacks.job_label


class CompareOnMultirunEnd(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ssl_lab.evaluation.compare import MEAN_CSV, write_comparison

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        csv_path, md_path, markdown = write_comparison(sweep_dir)
        print(f"\n{markdown}\ncomparison written: {csv_path}, {csv_path.with_name(MEAN_CSV)} and {md_path}")


def sweep_size(config: DictConfig) -> int | None:
    """How many jobs the sweep will launch: the product of the swept choices (command line and
    hydra.sweeper.params) for Hydra's basic sweeper, n_trials for Optuna's; None when it cannot be told."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.get("sweeper") or {}
    if sweeper.get("n_trials") is not None:
        return int(sweeper.n_trials)
    params = sweeper.get("params") or {}
    typed = [*(f"{k}={v}" for k, v in params.items()), *config.hydra.overrides.task]
    try:
        overrides = OverridesParser.create().parse_overrides(typed)
    except Exception:  # noqa: BLE001 - a count for a progress label must not stop a sweep
        return None
    counts = {}
    for override in overrides:
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                return None
            counts[override.get_key_element()] = len(list(override.sweep_string_iterator()))
    return math.prod(counts.values()) if counts else 1


class CountJobs(Callback):
    """Tells each job of a multirun how many there are (an environment variable: launchers that run jobs in other
    processes inherit it), for the `job k/N` in its first line and progress bar."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        total = sweep_size(config)
        if total is None:
            os.environ.pop(JOBS_ENV, None)
        else:
            os.environ[JOBS_ENV] = str(total)
