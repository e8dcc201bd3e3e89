"""What a run does: one function per task, chosen by `task.name`."""
from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig

from ssl_lab.errors import ConfigError
from ssl_lab.tasks.evaluate import evaluate
from ssl_lab.tasks.finetune import train_heads
from ssl_lab.tasks.linear import linear_probe
from ssl_lab.tasks.pipeline import pipeline
from ssl_lab.tasks.pretrain import pretrain

TASKS: dict[str, Callable[[DictConfig], dict[str, Any]]] = {
    "pretrain": pretrain,
    "linear": linear_probe,
    "finetune": train_heads,
    "joint": train_heads,
    "supervised": train_heads,
    "evaluate": evaluate,
}
TASKS["pipeline"] = lambda cfg: pipeline(cfg, TASKS)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the task the config names and return its summary (the metrics a sweep can optimise)."""
    task = TASKS.get(cfg.task.name)
    if task is None:
        raise ConfigError(f"task={cfg.task.name} is not a known task; choose one of: {', '.join(TASKS)}.")
    return task(cfg)


__all__ = ["TASKS", "evaluate", "linear_probe", "pipeline", "pretrain", "run", "train_heads"]
