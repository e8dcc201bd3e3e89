"""ssl_lab command line: `python run.py [group=choice ...] [key=value ...]`; `--help` lists the groups."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from ssl_lab.cli import run_or_exit  # imported late so --help stays fast

    summary = run_or_exit(cfg)
    metric = cfg.get("optimized_metric")
    return summary.get(metric) if metric else None


if __name__ == "__main__":
    main()
