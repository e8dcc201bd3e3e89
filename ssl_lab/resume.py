"""What a resumed run continues: the run as its `config.yaml` saved it, or a change the user asked for by name.

`python run.py run_dir=R resume=auto` alone continues R exactly, with its saved config; the original overrides
need not be repeated, and any repeated one must agree with the saved value (a changed one is refused with a
`key: saved -> requested` diff, since the restored optimizer would keep running the old config). Two modes change
a run on purpose, each as a new *segment*: `resume=extend` takes a new length (trainer.max_epochs or max_steps;
task.max_epochs downstream) and re-plans the schedule for the new end; `resume=force` takes any change that the
checkpoint can carry. The config each segment ran with is kept as `config.<segment>.yaml` and the segments are
listed in `segments.json` and the run's summary.json (ssl_lab.segments).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ssl_lab.errors import ConfigError

# what names or places a run, or what the run derives itself: not part of the experiment
NOT_COMPARED = ("run_name", "method_slot", "run_dir", "resume", "scale")
MAX_LISTED = 8
RESOLVED_AUTO = ("backbone.small_stem",)  # `auto` options the saved config holds as resolved (tasks.common)
MODES = ("auto", "extend", "force")
CHANGING_MODES = ("extend", "force")  # each continues the run as a new segment (ssl_lab.segments)
# what decides where a run ends: resume=extend may change these (the task's own max_epochs downstream)
LENGTH_KEYS = ("trainer.max_epochs", "trainer.max_steps", "task.max_epochs")
# what the checkpoint's weights and optimizer state are made of: no mode can change them
FIXED_KEYS = ("task.name", "method.name", "backbone.name", "optim.name", "task.freeze_backbone", "task.head",
              "dataset.in_chans")


def flat_keys(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} for a nested dict (lists and empty dicts are leaves)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flat_keys(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]  # group@package=choice: the group


def _explicit(key: str, overridden: list[str]) -> bool:
    return any(key == o or key.startswith(o + ".") for o in overridden)


def read_saved(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot be read ({' '.join(str(err).split())[:200]}); resume=auto needs the "
                          "config the run saved. Restore it, or start a new run_dir.") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("task"), dict):
        raise ConfigError(f"{path}: not a config saved by an ssl_lab run; resume=auto needs the run's own "
                          "config.yaml. Restore it, or start a new run_dir.")
    return saved


def config_diff(saved: dict[str, Any], requested: dict[str, Any],
                overridden: list[str] | None) -> list[tuple[str, Any, Any]]:
    """(key, saved, requested) for every experiment setting that differs. `overridden`: the keys given on the
    command line (only they are compared; the rest are defaults the user did not restate); None: all keys."""
    from ssl_lab.tasks.common import resolve_precision

    ours, theirs = flat_keys(saved), flat_keys(requested)
    keys = None if overridden is None else [_override_key(o) for o in overridden]
    if "accelerator.precision" in theirs:  # saved as what `auto` resolved to
        theirs["accelerator.precision"] = resolve_precision(str(theirs["accelerator.precision"]))
    for key in RESOLVED_AUTO:  # saved as what `auto` chose for the built model: asking for `auto` again is the same
        if theirs.get(key) == "auto" and key in ours:
            theirs[key] = ours[key]
    diff = []
    for key in sorted(set(ours) | set(theirs)):
        if key.split(".", 1)[0] in NOT_COMPARED or (keys is not None and not _explicit(key, keys)):
            continue
        if ours.get(key, "<unset>") != theirs.get(key, "<unset>"):
            diff.append((key, ours.get(key, "<unset>"), theirs.get(key, "<unset>")))
    return diff


def _listed(diff: list[tuple[str, Any, Any]]) -> str:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:MAX_LISTED])
    return listed + (f" (and {len(diff) - MAX_LISTED} more)" if len(diff) > MAX_LISTED else "")


def _apply(saved: dict[str, Any], diff: list[tuple[str, Any, Any]]) -> dict[str, Any]:
    """`saved` with each differing key set to its requested value (removed where the request has none)."""
    import copy

    out = copy.deepcopy(saved)
    for key, _, value in diff:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        if value == "<unset>":
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out


def _check_new_end(run_dir: Path, diff: list[tuple[str, Any, Any]]) -> None:
    """resume=extend: the new end must lie past what the checkpoint has already trained."""
    from ssl_lab.checkpoint_io import read_checkpoint, resume_position
    from ssl_lab.tasks.common import LAST_CKPT

    last = run_dir / LAST_CKPT
    if not last.is_file():
        return  # nothing trained yet: the run starts fresh with the new length
    ckpt = read_checkpoint(last, mmap=True)
    epochs_done, step = resume_position(ckpt)[0], int(ckpt.get("global_step", 0))
    for key, _, value in diff:
        if key.endswith("max_epochs") and value not in (None, -1) and int(value) <= epochs_done:
            raise ConfigError(f"resume=extend: {run_dir} has trained {epochs_done} epoch(s) already; {key}={value} "
                              f"does not go past them: pass a larger {key}.")
        if key == "trainer.max_steps" and value not in (None, -1) and int(value) <= step:
            raise ConfigError(f"resume=extend: {run_dir} has trained {step} step(s) already; trainer.max_steps="
                              f"{value} does not go past them: pass a larger trainer.max_steps.")


def continued_config(cfg: DictConfig, run_dir: Path, overridden: list[str] | None = None) -> DictConfig:
    """The config a resumed run continues with: the saved one (auto), the saved one with a new length (extend) or
    with the requested changes (force); ConfigError with the diff for a change the mode does not allow. `cfg`
    itself for resume=auto into a run that has not saved its config yet."""
    mode = cfg.get("resume")
    if mode not in MODES:
        return cfg
    saved = read_saved(run_dir)
    if saved is None:
        if mode == "auto":
            return cfg
        raise ConfigError(f"resume={mode}: {run_dir} holds no run to continue (no config.yaml); check run_dir, or "
                          "start the run without resume=.")
    requested = OmegaConf.to_container(cfg, resolve=True)
    diff = config_diff(saved, requested, overridden)
    if mode == "auto" and diff:
        raise ConfigError(f"resume=auto: {run_dir} was run with another config ({_listed(diff)}). resume=auto "
                          f"continues a run exactly as it was saved: drop those overrides (python run.py "
                          f"run_dir={run_dir} resume=auto is enough), train longer with resume=extend, change it "
                          "with resume=force, or start a new run_dir.")
    fixed = [d for d in diff if d[0] in FIXED_KEYS]
    if fixed:
        raise ConfigError(f"resume={mode}: {_listed(fixed)} cannot change in a resumed run (the checkpoint holds "
                          "that model and optimizer state); start a new run_dir (pretrained=<this run> starts from "
                          "its weights).")
    if mode == "extend":
        other = [d for d in diff if d[0] not in LENGTH_KEYS]
        if other:
            raise ConfigError(f"resume=extend changes only where the run ends ({', '.join(LENGTH_KEYS)}); "
                              f"{run_dir} was run with another config ({_listed(other)}): drop those overrides, or "
                              "use resume=force to change them in a new segment.")
    merged = _apply(saved, diff)
    if mode == "extend":
        _check_new_end(run_dir, diff)
    merged = {k: v for k, v in merged.items() if k not in NOT_COMPARED}
    return OmegaConf.create({**merged, **{k: requested.get(k) for k in NOT_COMPARED if k in requested}})
