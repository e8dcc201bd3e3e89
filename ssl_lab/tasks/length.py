"""`trainer.max_epochs` says how long a run trains in every task. The downstream tasks keep their own, longer
default (`task.max_epochs`), so a length typed as `trainer.max_epochs=N` for one of them is applied to it, and when
both are typed the task's key wins, with a warning that names both: never a length silently ignored."""
from __future__ import annotations

import logging

from omegaconf import DictConfig

log = logging.getLogger(__name__)

EPOCH_TASKS = ("linear", "finetune", "joint", "supervised")  # downstream tasks whose length is task.max_epochs


def typed(overrides: list[str], key: str) -> str | None:
    """The value of `key` among Hydra command-line overrides (`key=v`, `+key=v`, `++key=v`; the last one, as Hydra
    applies them), or None."""
    found = None
    for item in overrides:
        name, sep, value = item.partition("=")
        if sep and name.lstrip("+") == key:
            found = value
    return found


def apply_typed_length(cfg: DictConfig, overrides: list[str] | None) -> tuple[DictConfig, list[str] | None]:
    """The config and overrides with a typed trainer length carried to the task that reads its own; unchanged
    outside the command line (`overrides` None: a Python caller sets task.max_epochs itself)."""
    task = str(cfg.task.name)
    if overrides is None:
        return cfg, overrides
    epochs, task_epochs = typed(overrides, "trainer.max_epochs"), typed(overrides, "task.max_epochs")
    steps = typed(overrides, "trainer.max_steps")
    if task in EPOCH_TASKS and epochs is not None:
        if task_epochs is None:
            cfg.task.max_epochs = cfg.trainer.max_epochs
            overrides = [*overrides, f"task.max_epochs={cfg.trainer.max_epochs}"]
            log.info("trainer.max_epochs=%s: task=%s trains for task.max_epochs=%s", epochs, task, epochs)
        elif str(task_epochs) != str(epochs):
            log.warning("task=%s: task.max_epochs=%s wins over trainer.max_epochs=%s (the task's own length); "
                        "pass one of them", task, task_epochs, epochs)
    if steps not in (None, "-1") and task in ("linear", "evaluate"):  # pipeline: trainer.* is its pretraining's
        log.warning("trainer.max_steps=%s does not apply to task=%s (%s); it is ignored", steps, task,
                    "its probe trains on cached features for task.max_epochs epochs" if task == "linear"
                    else "it trains nothing")
    if epochs is not None and task == "evaluate":
        log.warning("trainer.max_epochs=%s does not apply to task=evaluate (it trains nothing); it is ignored",
                    epochs)
    return cfg, overrides
