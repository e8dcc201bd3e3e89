"""Which images each stage used: ``splits.json`` in every run directory, and the check that refuses a downstream
run whose test images were among the images its backbone was pretrained on.

The split itself is computed by the data modules (one code path for both modes, seeded by ``dataset.split_seed``),
so matching settings cannot leak; this check catches the settings that differ between the two runs (another
split_seed or test_fraction, pretraining without labels on a file that has them) and says which to change.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only

from ssl_lab.artifacts import atomic_write
from ssl_lab.errors import DataError

log = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"
# the settings that decide where a test split falls (the fractions of val and labels never move it)
TEST_SETTINGS = ("split_seed", "test_fraction", "label_key", "split_key", "split_keys")


def write_splits(run_dir: str | Path, datamodule: Any) -> Path:
    """Write ``datamodule.split_record()`` to ``<run_dir>/splits.json`` (rank zero only; atomically; compact, since
    a large file lists hundreds of thousands of ids) and return its path."""
    path = Path(run_dir) / SPLITS_FILE
    if rank_zero_only.rank == 0:
        text = json.dumps(datamodule.split_record(), separators=(",", ":"), sort_keys=True) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def read_splits(path: str | Path) -> dict[str, Any]:
    """A splits.json written by ``write_splits``, checked enough that the leak check can trust its fields."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as splits.json ({e}); remove it or rerun the run that wrote it.")
    ok = isinstance(record, dict) and isinstance(record.get("source"), dict) and \
        isinstance(record.get("splits"), dict) and all(isinstance(record["splits"].get(k), dict)
                                                       for k in ("train", "val", "test", "fit"))
    if not ok:
        raise DataError(f"{path}: is not a splits.json of ssl_lab (needs source and splits train/val/test/fit); "
                        "remove it or rerun the run that wrote it.")
    return record


def _splits_path(pretrained: str | Path) -> Path:
    p = Path(str(pretrained)).expanduser()
    return p / SPLITS_FILE if p.is_dir() else p.parent / SPLITS_FILE


def same_source(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same data (kind, absolute path or root, size): ids are then compared group by group, so a run that read
    other keys of the same file is still checked on the keys both read."""
    identity = lambda s: {k: v for k, v in s.items() if k != "image_keys"}  # noqa: E731
    return identity(a) == identity(b)


def overlap(fit: dict[str, list], test: dict[str, list]) -> int:
    """How many test ids (per group: image key, folder, STL-10 part) are also fit ids."""
    return sum(len(set(fit.get(group, ())) & set(ids)) for group, ids in test.items())


def _hydra(value: Any) -> str:
    """A value as a command-line override reads it back."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return f'"{text}"' if any(c in text for c in "{}[],: '") else text


def _fix(before: dict[str, Any], now: dict[str, Any]) -> str:
    """What to set so that the two runs share the test split, from their settings."""
    if before.get("label_key") is None and now.get("label_key") is not None:
        return (f"the pretraining run read no labels, so it held no test split out: pretrain with "
                f"dataset.label_key={_hydra(now['label_key'])} (and this run's split settings)")
    diffs = [k for k in TEST_SETTINGS if before.get(k) != now.get(k)]
    if not diffs:
        return "pretrain again on this data with this run's dataset settings (the data or the split code changed)"
    theirs = " ".join(f"dataset.{k}={_hydra(before.get(k))}" for k in diffs)
    mine = ", ".join(f"{k}={_hydra(now.get(k))}" for k in diffs)
    return f"set {theirs} as the pretraining run did (this run has {mine}), or pretrain again with this run's settings"


def check_no_leak(pretrained: str | Path | None, datamodule: Any) -> None:
    """Refuse a downstream run whose test images the backbone was pretrained on.

    ``pretrained`` is what ``pretrained=`` holds: a pretraining run directory or its backbone.pt (None or "random":
    nothing to check). A pretraining run without splits.json (from before it existed) is let through with a
    warning; one on another source cannot leak into this run's test split."""
    if pretrained is None or str(pretrained) == "random":
        return
    path = _splits_path(pretrained)
    if not path.is_file():
        log.warning("%s not found (a pretraining run from before splits.json existed?): cannot check that this run's "
                    "test images were not pretrained on", path)
        return
    before, now = read_splits(path), datamodule.split_record()
    if not same_source(before["source"], now["source"]):
        return
    test = now["splits"]["test"]
    leaked = overlap(before["splits"]["fit"], test)
    if leaked:
        where = now["source"].get("path") or now["source"].get("root") or now["source"].get("kind")
        raise DataError(
            f"{leaked} of the {sum(map(len, test.values()))} test images of {where} were pretraining images of the "
            f"run whose splits are in {path}, so the test score would not measure unseen data; "
            f"{_fix(before.get('settings', {}), now.get('settings', {}))}."
        )
