"""Findings shared by the HDF5 and folder inspections: facts (info) and problems (warning), and class balance."""

from __future__ import annotations

import re
import shlex
from typing import Any

INFO, WARNING = "info", "warning"
IMBALANCE_RATIO = 10  # largest class / smallest class at or above this is called a heavy imbalance
_PLAIN = re.compile(r"[A-Za-z_/.~][\w/.\-+:~]*")
_HYDRA_WORDS = {"null", "none", "true", "false", "nan", "inf", "-inf"}


def finding(level: str, message: str) -> dict[str, str]:
    return {"level": level, "message": message}


def class_balance(where: str, counts: dict[Any, int], fix: str) -> list[dict[str, str]]:
    """Counts per class as a fact; a single class or a largest/smallest ratio >= IMBALANCE_RATIO as a problem."""
    total = sum(counts.values())
    listing = ", ".join(f"{k}: {v} ({100 * v / max(1, total):.1f}%)" for k, v in counts.items())
    out = [finding(INFO, f"{where}: {len(counts)} class{'es' * (len(counts) != 1)}: {listing}")]
    if len(counts) == 1:
        out.append(finding(WARNING, f"{where}: a single class ({listing}); downstream (labelled) tasks and class "
                                    f"metrics need at least two classes. {fix}"))
    elif counts:
        big = max(counts, key=counts.get)
        small = min(counts, key=counts.get)
        ratio = counts[big] / max(1, counts[small])
        if ratio >= IMBALANCE_RATIO:
            out.append(finding(WARNING, f"{where}: heavy class imbalance: class {big} has {counts[big]} samples, "
                                        f"{ratio:.0f}x the {counts[small]} of class {small}; accuracy will mostly "
                                        "reflect the big class (read balanced accuracy / AUC)."))
    return out


def hydra_value(value: str) -> str:
    """An override value Hydra reads back as this exact string (quoted when it would parse as something else)."""
    if _PLAIN.fullmatch(value) and value.lower() not in _HYDRA_WORDS:
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def command_line(words: list[str]) -> str:
    """A shell line: every word quoted where the shell would change it (e.g. the brackets of a list override)."""
    return " ".join(shlex.quote(w) for w in words)
