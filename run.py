"""ssl_lab command line: `python run.py [group=choice ...] [key=value ...]`; `--help` lists the groups."""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from ssl_lab.resolvers import register

register()  # or_else (hydra.run.dir follows run_dir), by_device, pretrained_method (the run's name)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from ssl_lab.cli import run_or_exit  # imported late so --help stays fast
    from ssl_lab.sweeps import optimized_value

    summary = run_or_exit(cfg)
    return optimized_value(summary, cfg.get("optimized_metric"))  # a dotted key: what a sweeper optimises


def cli() -> None:
    """Hydra rejects a bad override (unknown key or group choice, bad syntax) before `main` runs, with a multi-line
    message and status 1. With HYDRA_FULL_ERROR set it raises instead, so the error becomes ssl_lab's one line and
    status 2, like every other bad input; a user who sets HYDRA_FULL_ERROR=1 still gets the trace."""
    from hydra.errors import CompactHydraException

    wants_trace = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except CompactHydraException as err:
        if wants_trace:
            raise
        text = str(err).split("Config search path:")[0]  # the search path is noise next to the valid choices
        cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
        print(f"ssl_lab: error: {' '.join((text + cause).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
