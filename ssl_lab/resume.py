"""What `resume=auto` continues: the run as its `config.yaml` saved it, never a silently different one.

`python run.py run_dir=R resume=auto` alone continues R with its saved config; the original overrides need not be
repeated. Overrides that are repeated must agree with the saved values; any that change the experiment are
refused with a `key: saved -> requested` diff, since a changed config would be written over the record of the
first segment while the restored optimizer kept running the old one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ssl_lab.errors import ConfigError

# what names or places a run, or what the run derives itself: not part of the experiment
NOT_COMPARED = ("run_name", "run_dir", "resume", "scale")
MAX_LISTED = 8


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
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

    ours, theirs = _flatten(saved), _flatten(requested)
    keys = None if overridden is None else [_override_key(o) for o in overridden]
    if "accelerator.precision" in theirs:  # saved as what `auto` resolved to
        theirs["accelerator.precision"] = resolve_precision(str(theirs["accelerator.precision"]))
    diff = []
    for key in sorted(set(ours) | set(theirs)):
        if key.split(".", 1)[0] in NOT_COMPARED or (keys is not None and not _explicit(key, keys)):
            continue
        if ours.get(key, "<unset>") != theirs.get(key, "<unset>"):
            diff.append((key, ours.get(key, "<unset>"), theirs.get(key, "<unset>")))
    return diff


def continued_config(cfg: DictConfig, run_dir: Path, overridden: list[str] | None = None) -> DictConfig:
    """The config a resume=auto run continues with: the saved one, if the run directory has one and the request
    agrees with it (ConfigError with the diff otherwise); `cfg` itself for a run that has not saved one yet."""
    if cfg.get("resume") != "auto":
        return cfg
    saved = read_saved(run_dir)
    if saved is None:
        return cfg
    requested = OmegaConf.to_container(cfg, resolve=True)
    diff = config_diff(saved, requested, overridden)
    if diff:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:MAX_LISTED])
        more = f" (and {len(diff) - MAX_LISTED} more)" if len(diff) > MAX_LISTED else ""
        raise ConfigError(f"resume=auto: {run_dir} was run with another config ({listed}{more}). resume=auto "
                          f"continues a run exactly as it was saved: drop those overrides (python run.py "
                          f"run_dir={run_dir} resume=auto is enough), or start a new run_dir.")
    saved = {k: v for k, v in saved.items() if k not in NOT_COMPARED}
    return OmegaConf.create({**saved, **{k: requested.get(k) for k in NOT_COMPARED if k in requested}})
