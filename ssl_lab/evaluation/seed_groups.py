"""Which runs are one configuration trained under several seeds, and the mean ± std of their metrics.

The saved config.yaml is fully resolved, so a seed copied into `dataset.seed` or `method.seed` looks like any other
value, a downstream run of seed s points at the pretraining run of seed s, and Hydra numbers its job folders: none
of these may tell two configurations apart. Everything else in the config, the run's place in its sweep (pipeline
stages never merge) and the table's identity columns do.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# top-level keys that name a run, not a config
RUN_KEYS = ("seed", "run_name", "method_slot", "run_dir", "resume", "pretrained")
IDENTITY_COLUMNS = ("task", "method", "backbone", "dataset", "label_fraction")
# a sweep's job number (`3_pretrain_...`, `3`) or run_name's timestamp (`2024-05-01_12-00-00-123456_...`)
_JOB_PREFIX = re.compile(r"^(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}(-\d+)?|\d+)(_|$)")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def strip_job_prefix(rel_path: str) -> str:
    """'3_pipeline_simclr/linear' -> 'pipeline_simclr/linear': the seeds of one configuration are different jobs."""
    parts = (_JOB_PREFIX.sub("", part, count=1) for part in rel_path.split("/"))
    return "/".join(p for p in parts if p and p != ".")


def _leaves(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    for key, value in data.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, path)
        else:
            yield path, value


def seed_paths(configs: Iterable[Mapping[str, Any]]) -> set[tuple[str, ...]]:
    """Nested keys equal to their run's top-level seed in every run that has them: interpolated from it.

    Deciding over all runs at once keeps a value pinned by hand (`dataset.sim_seed: 0`) as part of the config even
    in the run whose seed happens to be 0; a key that equals the seed everywhere tracks it, or cannot matter."""
    follows: dict[tuple[str, ...], bool] = {}
    for config in configs:
        seed = config.get("seed")
        if not _is_int(seed):
            continue
        for path, value in _leaves({k: v for k, v in config.items() if k not in RUN_KEYS}):
            if len(path) > 1:
                follows[path] = follows.get(path, True) and _is_int(value) and value == seed
    return {path for path, every in follows.items() if every}


def _clean(config: Mapping[str, Any], paths: set[tuple[str, ...]], pretrained: Mapping[str, Any] | None) -> dict:
    """The config without what names the run: seed-derived values and copies of run_dir / run_name become markers,
    and `pretrained` is replaced by the pretraining run's own cleaned config (its path carries its seed)."""
    seed = config.get("seed")
    names = {k: config[k] for k in ("run_dir", "run_name") if isinstance(config.get(k), str) and config[k]}

    def clean(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, Mapping):
            return {str(k): clean(v, (*path, str(k))) for k, v in value.items()}
        if path in paths and _is_int(value) and value == seed:
            return "<seed>"
        if isinstance(value, str):
            for key, name in names.items():
                value = value.replace(name, f"<{key}>")
        return value

    out = {str(k): clean(v, (str(k),)) for k, v in config.items() if k not in RUN_KEYS}
    source = config.get("pretrained")
    if pretrained:
        out["pretrained"] = _clean(pretrained, paths, None)
    else:  # None or `random` as they are; a run whose config.yaml cannot be read stands for any pretraining run
        out["pretrained"] = "<pretrained>" if isinstance(source, str) and source != "random" else source
    return out


def config_ids(rows: Sequence[Mapping[str, Any]], configs: Sequence[Mapping[str, Any]],
               pretrained_configs: Sequence[Mapping[str, Any] | None]) -> list[str]:
    """One sha256 hex digest per run; runs that differ only in their seed share it.

    rows: the table's rows (`run` and the identity columns); configs: each run's config.yaml ({} when it has
    none: such runs group by the identity columns and their place in the sweep); pretrained_configs: the
    config.yaml of the run each one loaded its backbone from, or None."""
    paths = seed_paths(configs)
    ids = []
    for row, config, pretrained in zip(rows, configs, pretrained_configs):
        key: dict[str, Any] = {"path": strip_job_prefix(row["run"]), **{c: row.get(c) for c in IDENTITY_COLUMNS}}
        if config:
            key["config"] = _clean(config, paths, pretrained)
        blob = json.dumps(key, sort_keys=True, default=str)
        ids.append(hashlib.sha256(blob.encode()).hexdigest())
    return ids


def _sorted_seeds(seeds: Iterable[Any]) -> list[Any]:
    return sorted((s for s in seeds if s is not None), key=lambda s: (not is_number(s), s if is_number(s) else str(s)))


def aggregate(rows: Sequence[Mapping[str, Any]], ids: Sequence[str], metrics: Sequence[str]
              ) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) with one row per configuration, in order of first appearance: config (8 hex chars), path,
    the identity columns, n_seeds, seeds, and <metric>_mean, <metric>_std (sample, ddof=1; None for a single
    value), <metric>_n (runs that have the metric) for every metric column."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row, key in zip(rows, ids):
        groups.setdefault(key, []).append(row)
    columns = ["config", "path", *IDENTITY_COLUMNS, "n_seeds", "seeds",
               *(f"{m}_{stat}" for m in metrics for stat in ("mean", "std", "n"))]
    out = []
    for key, members in groups.items():
        seeds = _sorted_seeds(r.get("seed") for r in members)
        if len(set(map(str, seeds))) < len(seeds):
            print(f"ssl_lab.compare: warning: configuration {key[:8]} has a seed more than once "
                  f"({', '.join(r['run'] for r in members)}); its mean counts every run", file=sys.stderr)
        first = members[0]
        agg: dict[str, Any] = {"config": key[:8], "path": strip_job_prefix(first["run"]),
                               **{c: first.get(c) for c in IDENTITY_COLUMNS}, "n_seeds": len(members),
                               "seeds": ",".join(map(str, seeds)) or None}
        for metric in metrics:
            values = np.array([r[metric] for r in members if is_number(r.get(metric))], dtype=np.float64)
            agg[f"{metric}_mean"] = float(values.mean()) if len(values) else None
            agg[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
            agg[f"{metric}_n"] = len(values)
        out.append(agg)
    return columns, out


def _num(x: float) -> str:
    return f"{x:.2e}" if x != 0 and abs(x) < 0.0005 else f"{x:.3f}"  # 3 decimals, unless they would show 0.000


def mean_cell(mean: float | None, std: float | None, n: int) -> str | None:
    """'0.912 ± 0.004 (n=3)'; '0.912 (n=1)' for a single value; None when no run has the metric."""
    if mean is None:
        return None
    return f"{_num(mean)} ± {_num(std)} (n={n})" if std is not None else f"{_num(mean)} (n={n})"
