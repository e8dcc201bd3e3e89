"""Hydra callbacks: every multirun ends with its comparison tables (per run, and mean ± std over seeds), so a
comparison is one command."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class CompareOnMultirunEnd(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ssl_lab.evaluation.compare import MEAN_CSV, write_comparison

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        csv_path, md_path, markdown = write_comparison(sweep_dir)
        print(f"\n{markdown}\ncomparison written: {csv_path}, {csv_path.with_name(MEAN_CSV)} and {md_path}")
