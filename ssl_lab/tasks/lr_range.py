"""`task.lr_find=true`: a learning-rate range test before a downstream run trains (finetune, joint, supervised).

Lightning's own `Tuner(trainer).lr_find` runs it: `task.lr_find_steps` optimizer steps on the train split only (no
val or test batch is read), the lr rising exponentially across `task.lr_find_range`, the smoothed train loss
recorded at each step; the suggestion is the lr of the steepest loss descent. Lightning saves the model, optimizer
and loop state before the test and restores them after it, so training starts from the same weights it would
have started from without the test.

What is searched is the head lr. The backbone keeps its ratio to the head (backbone_lr / head_lr as configured),
during the test (`Downstream.tied_lr_ratio`: Lightning's test gives every param group the same lr) and after it:
the configured ratio encodes how much gentler the backbone's updates should be (1e-5 / 1e-4 for the jets recipe,
equal rates from scratch) and a range test over one number cannot tell it. The run then trains with the suggested
head lr and the scaled backbone lr; both, with the configured ones, are logged in one line, written to
lr_find.json (with the test's lrs and losses) and lr_find.png, and recorded in the run's summary (metrics.json
`lr_find`, report.md). A resumed run does not test again: it takes the lrs its lr_find.json applied.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from ssl_lab.artifacts import write_json
from ssl_lab.errors import ConfigError

log = logging.getLogger(__name__)

SUPPORTED = ("finetune", "joint", "supervised")
INSTEAD = {
    "linear": "it fits its heads on cached features over its own grid of learning rates and keeps the best on val: "
              "widen task.lrs instead, or train a head with Lightning: task=finetune task.freeze_backbone=true "
              "task.lr_find=true",
    "evaluate": "it trains nothing by gradient descent (kNN, logistic regression, maps); for a range test use "
                "task=finetune task.lr_find=true",
    "pretrain": "the range test is for the downstream heads; pretraining takes optim.lr as given (compare "
                "several with python run.py -m optim.lr=1e-4,1e-3), or use task=finetune task.lr_find=true",
    "pipeline": "set it per stage: task.finetune.lr_find=true, task.joint.lr_find=true or "
                "task.supervised.lr_find=true",
}
JSON = "lr_find.json"
PNG = "lr_find.png"
SKIP_BEGIN, SKIP_END = 10, 1  # Lightning's suggestion() skips these points: a test needs more steps than both
MIN_STEPS = SKIP_BEGIN + SKIP_END + 2
_NO_VAL = r".*defined a `validation_step` but have no `val_dataloader`.*"  # the test reads the train split only


def check_lr_find(task: DictConfig) -> None:
    """Refuse task.lr_find=true (one line, before anything is written) for a task without a range test, and
    settings the test cannot run with."""
    wanted = task.get("lr_find")
    if wanted in (None, False):
        return
    if wanted is not True:
        raise ConfigError(f"task.lr_find={wanted!r} must be true or false.")
    if task.name not in SUPPORTED:
        instead = INSTEAD.get(task.name, f"use task=finetune (the range test runs for {', '.join(SUPPORTED)})")
        raise ConfigError(f"task.lr_find=true: task={task.name} has no learning-rate range test; {instead}.")
    steps = task.get("lr_find_steps", 100)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < MIN_STEPS:
        raise ConfigError(f"task.lr_find_steps={steps!r} must be an integer >= {MIN_STEPS} (the suggestion skips "
                          f"the first {SKIP_BEGIN} and the last {SKIP_END} points); e.g. task.lr_find_steps=100.")
    bounds = list(task.get("lr_find_range", (1e-7, 1.0)))
    ok = len(bounds) == 2 and all(isinstance(b, numbers.Real) and not isinstance(b, bool) and math.isfinite(b)
                                  and b > 0 for b in bounds) and bounds[0] < bounds[1]
    if not ok:
        raise ConfigError(f"task.lr_find_range={bounds!r} must be [lowest, highest] learning rates, both > 0 and "
                          "lowest < highest; e.g. task.lr_find_range=[1e-7,1.0].")


def _finite(values: list[Any]) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in values]  # JSON has no NaN


def _resumed(run_dir: Path, model: pl.LightningModule) -> dict[str, Any]:
    """A resumed run trains on with the lrs its range test applied (its checkpoint's schedule was built from
    them); the test is not run again."""
    path = run_dir / JSON
    if not path.is_file():
        raise ConfigError(f"task.lr_find=true on a resumed run, but {path} is missing: the range test runs before "
                          "training starts, so it cannot be added to a run that has trained; continue with "
                          "task.lr_find=false (resume=force), or start a new run_dir.")
    saved = json.loads(path.read_text())
    model.head_lr, model.backbone_lr = float(saved["applied"]["head_lr"]), float(saved["applied"]["backbone_lr"])
    log.info("lr range test: resumed run keeps the lrs it applied: head_lr %.4g, backbone_lr %.4g (%s)",
             model.head_lr, model.backbone_lr, path)
    return {key: saved[key] for key in ("suggestion", "configured", "applied", "ratio", "steps", "plot")}


def range_test(trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any, run_dir: Path, task: DictConfig,
               ckpt_path: str | None = None) -> dict[str, Any] | None:
    """Run the range test when task.lr_find=true and set the model's head_lr / backbone_lr to what it suggests;
    what it did (for the summary), or None when the task does not ask for it."""
    check_lr_find(task)
    if not task.get("lr_find"):
        return None
    run_dir = Path(run_dir)
    if ckpt_path:
        return _resumed(run_dir, model)
    from lightning.pytorch.tuner import Tuner

    steps = int(task.get("lr_find_steps", 100))
    low, high = (float(b) for b in task.get("lr_find_range", (1e-7, 1.0)))
    head0, backbone0 = float(model.head_lr), float(model.backbone_lr)
    ratio = backbone0 / head0
    loop = trainer.fit_loop
    max_epochs = loop.max_epochs
    # Lightning bounds the test by steps only; on a train split of few batches it must not stop at max_epochs.
    loop.max_epochs = max(int(max_epochs or 1), steps * int(trainer.accumulate_grad_batches))
    model.tied_lr_ratio = None if model.freeze_backbone else ratio
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_VAL)
            finder = Tuner(trainer).lr_find(model, train_dataloaders=datamodule.train_dataloader(), min_lr=low,
                                            max_lr=high, num_training=steps, mode="exponential",
                                            attr_name="head_lr", update_attr=True)
    finally:
        model.tied_lr_ratio = None
        loop.max_epochs = max_epochs
    suggestion = finder.suggestion(skip_begin=SKIP_BEGIN, skip_end=SKIP_END) if finder is not None else None
    if suggestion is None or not math.isfinite(suggestion):
        ran = len(finder.results.get("loss", [])) if finder is not None else 0
        raise ConfigError(f"the lr range test found no learning rate: {ran} steps ran (it stops early when the loss "
                          "diverges) and too few had a finite loss; widen task.lr_find_range, raise "
                          "task.lr_find_steps, or set task.lr_find=false.")
    model.head_lr, model.backbone_lr = float(suggestion), float(suggestion) * ratio
    result = {"suggestion": float(suggestion), "ratio": ratio, "steps": len(finder.results["lr"]),
              "configured": {"head_lr": head0, "backbone_lr": backbone0},
              "applied": {"head_lr": model.head_lr, "backbone_lr": model.backbone_lr},
              "plot": PNG, "data": "train split"}
    log.info("lr range test: head_lr %.4g -> %.4g, backbone_lr %.4g -> %.4g (backbone/head ratio %.4g kept; %s, "
             "%s)", head0, model.head_lr, backbone0, model.backbone_lr, ratio, run_dir / JSON, run_dir / PNG)
    if rank_zero_only.rank == 0:
        write_json(run_dir / JSON, {**result, "range": [low, high], "mode": "exponential",
                                    "lrs": _finite(finder.results["lr"]),
                                    "losses": _finite(finder.results["loss"])})
        from ssl_lab.evaluation.plots import save_figure  # switches matplotlib to Agg first

        fig = finder.plot(suggest=True, show=False)
        fig.axes[0].set_title(f"lr range test: head_lr {head0:.3g} -> {model.head_lr:.3g} (backbone x{ratio:.3g})")
        save_figure(fig, run_dir / PNG)
    return result
