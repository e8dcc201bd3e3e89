"""What a run does: one function per task, chosen by `task.name`."""
from __future__ import annotations

import functools
from typing import Any, Callable

from omegaconf import DictConfig

from ssl_lab.errors import ConfigError
from ssl_lab.resume import continued_config
from ssl_lab.run_lock import hold
from ssl_lab.schema import check_config
from ssl_lab.speed import check_device
from ssl_lab.tasks.common import resolve_run_dir
from ssl_lab.tasks.evaluate import evaluate
from ssl_lab.tasks.finetune import train_heads
from ssl_lab.tasks.length import apply_typed_length
from ssl_lab.tasks.linear import linear_probe
from ssl_lab.tasks.lr_range import check_lr_find
from ssl_lab.tasks.pipeline import pipeline
from ssl_lab.tasks.pretrain import pretrain

Task = Callable[[DictConfig], dict[str, Any]]


def one_process_per_run_dir(task: Task) -> Task:
    """Every task holds its run directory's lock (ssl_lab.run_lock) from before its first write to its end; under
    the lock, resume=auto checks the request against the run's saved config (ssl_lab.resume)."""
    @functools.wraps(task)
    def locked(cfg: DictConfig) -> dict[str, Any]:
        check_lr_find(cfg.task)  # task.lr_find=true where no range test runs: refused before anything is done
        run_dir = resolve_run_dir(cfg)
        with hold(run_dir):
            return task(continued_config(cfg, run_dir))
    return locked


TASKS: dict[str, Task] = {
    "pretrain": pretrain,
    "linear": linear_probe,
    "finetune": train_heads,
    "joint": train_heads,
    "supervised": train_heads,
    "evaluate": evaluate,
}
TASKS["pipeline"] = functools.partial(pipeline, tasks=TASKS)  # each stage takes its own folder's lock too
TASKS.update({name: one_process_per_run_dir(task) for name, task in TASKS.items()})  # in place: the pipeline's too


def command_line_overrides() -> list[str] | None:
    """The overrides the user typed (Hydra's task overrides), or None outside a Hydra app (compare everything)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the task the config names and return its summary (the metrics a sweep can optimise). With resume=auto
    the run's saved config names it: `run.py run_dir=R resume=auto` needs no other argument."""
    check_config(cfg)  # types, finiteness and ranges of every value, before the run directory is claimed
    cfg, overrides = apply_typed_length(cfg, command_line_overrides())  # trainer.max_epochs in every task
    continued = continued_config(cfg, resolve_run_dir(cfg), overrides)
    if continued is not cfg:
        check_config(continued)  # what a resumed run takes from its saved config, and the overrides it changes
    cfg = continued
    check_device(cfg.accelerator.accelerator, cfg.get("resume"))
    task = TASKS.get(cfg.task.name)
    if task is None:
        raise ConfigError(f"task={cfg.task.name} is not a known task; choose one of: {', '.join(TASKS)}.")
    return task(cfg)


__all__ = ["TASKS", "evaluate", "linear_probe", "pipeline", "pretrain", "run", "train_heads"]
