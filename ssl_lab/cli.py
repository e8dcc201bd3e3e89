"""Turns a failed check into one readable line on stderr and exit status 2, instead of a traceback."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from ssl_lab.errors import RunInterrupted, SSLLabError
from ssl_lab.tasks import run
from ssl_lab.tasks.fitting import one_line

log = logging.getLogger("ssl_lab")


def _process_started() -> float:
    try:  # Linux: when this process began (the cli module itself is imported after Hydra made the folder)
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()  # elsewhere: only a folder made after this import is removed


STARTED = _process_started()


def _remove_empty_job_dir() -> None:
    """Hydra makes the job's output folder before the run's checks; a refused run leaves it empty: removed, unless
    it was there before this process started (a folder the user made)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    out = Path(HydraConfig.get().runtime.output_dir)
    with contextlib.suppress(OSError):
        if out.is_dir() and not any(out.iterdir()) and out.stat().st_mtime >= STARTED:
            out.rmdir()


def _fail(message: str) -> None:
    log.error(message)
    print(f"ssl_lab: error: {message}", file=sys.stderr)
    _remove_empty_job_dir()
    sys.exit(2)


def _finish_wandb() -> None:
    """In a multirun every job runs in this process: an unfinished W&B run would swallow the next job's logs."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def run_or_exit(cfg: DictConfig) -> dict[str, Any]:
    try:
        summary = run(cfg)
    except RunInterrupted as err:  # not a failure: the run stopped on request and can continue
        log.warning(str(err))
        print(f"ssl_lab: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except SSLLabError as err:
        _fail(one_line(err))  # a reader's error from a DataLoader worker comes wrapped in torch's traceback
    except MissingMandatoryValue as err:
        _fail(f"{err.full_key} must be set (it is ??? in the config); pass {err.full_key}=<value>.")
    except InstantiationException as err:
        cause = err.__cause__
        _fail(str(cause) if isinstance(cause, SSLLabError) else " ".join(str(err).split()))
    finally:
        _finish_wandb()
    if rank_zero_only.rank == 0:
        print(f"ssl_lab: {summary['task']} finished; outputs in {summary['run_dir']}")
    return summary
