"""What a run returns to a Hydra sweeper (Optuna: conf/hparams_search/): the number at `optimized_metric`, a dotted
key of the run's summary (what metrics.json / summary.json hold), e.g. `selected.value` (the best val metric of a
downstream run) or `test.accuracy`. A key the summary does not have stops the sweep with one line naming the keys
it does have: every trial would fail the same way."""
from __future__ import annotations

import math
import numbers
import sys
from typing import Any, Mapping


def numeric_keys(summary: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of every finite number in the summary (nested dicts included)."""
    found = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            found += numeric_keys(value, f"{name}.")
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            found.append(name)
    return found


def lookup(summary: Mapping[str, Any], metric: str) -> Any:
    value: Any = summary
    for key in str(metric).split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def optimized_value(summary: Mapping[str, Any], metric: str | None) -> float | None:
    """The float at `metric` in the summary, None without a metric; exits with status 2 when it is not a number."""
    if not metric:
        return None
    value = lookup(summary, metric)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    keys = numeric_keys(summary)
    shown = ", ".join(keys[:30]) + (", ..." if len(keys) > 30 else "")
    why = "is missing" if value is None else f"is {value!r}, not a number"
    if metric == "selected.value" and value is None:
        why += " (a downstream run selects by val only when dataset.val_fraction > 0)"
    print(f"ssl_lab: error: optimized_metric={metric} {why} in the summary of the {summary.get('task')} run "
          f"({summary.get('run_dir')}); choose one of its numbers: {shown or 'none'}.", file=sys.stderr)
    sys.exit(2)
