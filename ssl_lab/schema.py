"""One check of the composed config before a run starts: the types, finiteness and ranges of the values a user
types, and run names that stay inside the runs folder.

A value typed on the command line arrives as whatever YAML makes of it (`optim.lr=1e-3x` is a string, `=nan` a
float NaN), and deep in the code it would become a traceback, or worse a run that trains on NaN. The data modules
check their own options (dataset.*) where they are used, with messages that name the data; everything else a
user sets is checked here, by the key patterns below, before the run directory is claimed. Any other number in
the config must at least be finite.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ssl_lab.errors import ConfigError
from ssl_lab.resume import flat_keys

Check = Callable[[Any], "str | None"]


def _range(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool, integer: bool) -> str:
    what = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        return f"{what} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{what} {'>' if lo_open else '>='} {lo:g}"
    return what


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           integer: bool = False, optional: bool = False, also: tuple[Any, ...] = ()) -> Check:
    want = _range(lo, hi, lo_open, hi_open, integer)
    if also:
        want += " (or " + " or ".join(repr(a) for a in also) + ")"
    if optional:
        want += " (or null)"

    def check(value: Any) -> str | None:
        if value is None and optional or (not isinstance(value, float) and value in also):
            return None
        real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not real or (integer and not isinstance(value, numbers.Integral)):
            return f"must be {want}"
        if not math.isfinite(value):
            return f"must be a finite number, {want}"
        if (lo is not None and (value <= lo if lo_open else value < lo)) or \
                (hi is not None and (value >= hi if hi_open else value > hi)):
            return f"must be {want}"
        return None
    return check


def boolean(also: tuple[Any, ...] = ()) -> Check:
    def check(value: Any) -> str | None:
        return None if isinstance(value, bool) or value in also else \
            "must be true or false" + "".join(f" (or {a!r})" for a in also)
    return check


def numbers_list(item: Check, length: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
            return f"must be a list of {length or 'some'} values"
        for v in value:
            problem = item(v)
            if problem:
                return f"holds {v!r}, which {problem}"
        return None
    return check


def limit_batches(value: Any) -> str | None:
    """Lightning's limit_*_batches: a fraction of the epoch in (0, 1] or a number of batches >= 1 (0: none)."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        return None
    if isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0:
        return None
    return "must be a number of batches (an integer >= 0), a fraction of the epoch in [0, 1], or null"


POSITIVE = number(lo=0, lo_open=True)
NON_NEGATIVE = number(lo=0)
FRACTION = number(lo=0, hi=1)
COUNT = number(lo=1, integer=True)

# key pattern -> (check, an example of a good value)
RULES: dict[str, tuple[Check, str]] = {
    "seed": (number(lo=0, integer=True), "0"),
    "keep_last": (boolean(), "true"),
    "trainer.max_epochs": (number(lo=1, integer=True, also=(-1,)), "10"),
    "trainer.max_steps": (number(lo=1, integer=True, also=(-1,)), "-1 (no step limit)"),
    "trainer.limit_*_batches": (limit_batches, "null"),
    "trainer.log_every_n_steps": (COUNT, "10"),
    "trainer.gradient_clip_val": (number(lo=0, lo_open=True, optional=True), "1.0"),
    "trainer.accumulate_grad_batches": (COUNT, "1"),
    "trainer.deterministic": (boolean(also=("warn",)), "false"),
    "trainer.enable_progress_bar": (boolean(), "true"),
    "optim.lr": (POSITIVE, "1e-3"),
    "optim.weight_decay": (NON_NEGATIVE, "1e-6"),
    "optim.momentum": (number(lo=0, hi=1, hi_open=True), "0.9"),
    "optim.eta": (POSITIVE, "0.02"),
    "optim.warmup_epochs": (NON_NEGATIVE, "0"),
    "optim.min_lr_ratio": (FRACTION, "0.0"),
    "optim.base_batch_size": (COUNT, "256"),
    "optim.betas": (numbers_list(number(lo=0, hi=1, hi_open=True), 2), "[0.9,0.999]"),
    "guard.max_bad_steps": (number(lo=0, integer=True), "0"),
    "guard.check_every_n_steps": (number(lo=1, integer=True, optional=True), "null"),
    "guard.collapse_std": (NON_NEGATIVE, "0.05"),
    "guard.patience": (COUNT, "3"),
    "method.*temp": (POSITIVE, "0.1"),
    "method.temperature": (POSITIVE, "0.1"),
    "method.*tau": (FRACTION, "0.99"),
    "method.center_momentum": (FRACTION, "0.9"),
    "method.*_dim": (COUNT, "128"),
    "method.*_dims": (numbers_list(COUNT), "[2048]"),
    "method.*_weight": (NON_NEGATIVE, "1.0"),
    "method.lambd": (NON_NEGATIVE, "0.0051"),
    "method.mask_ratio": (number(lo=0, hi=1, lo_open=True, hi_open=True), "0.75"),
    "task.max_epochs": (COUNT, "10"),
    "task.backbone_lr": (NON_NEGATIVE, "1e-4"),
    "task.head_lr": (POSITIVE, "1e-3"),
    "task.dropout": (number(lo=0, hi=1, hi_open=True), "0.0"),
    "task.regression_weight": (NON_NEGATIVE, "1.0"),
    "task.hidden_dims": (numbers_list(COUNT), "[512]"),
    "task.lrs": (numbers_list(POSITIVE), "[0.01,0.1,1.0]"),
    "task.weight_decays": (numbers_list(NON_NEGATIVE), "[0.0,1e-4]"),
    "task.knn_k": (numbers_list(COUNT), "[20,200]"),
    "task.knn_temperature": (POSITIVE, "0.07"),
    "task.batch_size": (COUNT, "256"),
    "task.aug_passes": (number(lo=0, integer=True), "0"),
    "method.n_local_crops": (number(lo=0, integer=True), "0"),
    "method.freeze_last_layer": (number(lo=0, integer=True), "1"),
    "method.decoder_depth": (COUNT, "2"),
    "method.decoder_heads": (COUNT, "4"),
    "augment.ops.*.p": (FRACTION, "0.5"),
    "augment.n_views": (COUNT, "2"),
    "augment.size": (number(lo=1, integer=True, optional=True), "null (the image size)"),
    "accelerator.num_nodes": (COUNT, "1"),
    "accelerator.compile": (boolean(), "false"),
    "accelerator.sync_batchnorm": (boolean(), "false"),
}


def _check_run_name(name: Any) -> None:
    if name is None:
        return
    path = PurePath(str(name))
    if not str(name).strip() or path.is_absolute() or ".." in path.parts:
        raise ConfigError(f"run_name={name!r} must name a folder inside the runs folder (no leading /, no ..); "
                          "to write somewhere else pass run_dir=<folder> (absolute paths are fine there).")


def check_config(cfg: DictConfig) -> None:
    """ConfigError naming the first bad value, what it must be and an example, before anything is written."""
    values = flat_keys(OmegaConf.to_container(cfg, resolve=True))
    _check_run_name(values.get("run_name"))
    for key, value in values.items():
        rule = next((r for pattern, r in RULES.items() if fnmatch.fnmatchcase(key, pattern)), None)
        if rule is not None:
            problem = rule[0](value)
            if problem:
                raise ConfigError(f"{key}={value!r} {problem}; e.g. {key}={rule[1]}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number.")
