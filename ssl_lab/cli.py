"""Turns a failed check into one readable line on stderr and exit status 2, instead of a traceback."""
from __future__ import annotations

import logging
import sys
from typing import Any

from hydra.errors import InstantiationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from ssl_lab.errors import RunInterrupted, SSLLabError
from ssl_lab.tasks import run
from ssl_lab.tasks.fitting import one_line

log = logging.getLogger("ssl_lab")


def _fail(message: str) -> None:
    log.error(message)
    print(f"ssl_lab: error: {message}", file=sys.stderr)
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
