"""A run continued with a changed config (resume=extend or resume=force) keeps the record of each part.

Segment 1 is the run as first started; each extend or force that changes the config starts the next. Before the
new config.yaml is written, the previous segment's config is kept as `config.<n>.yaml`, its finished weights
(backbone.pt, model.pt) as `backbone.<n>.pt` / `model.<n>.pt` and its summary (or metrics) inside
`segments.json`, which the run's summary.json repeats. A resume=auto continuation is the same segment: it
changes nothing.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from ssl_lab.artifacts import atomic_write, write_json

SEGMENTS = "segments.json"
KEPT_WEIGHTS = ("backbone.pt", "model.pt")
REPORTS = ("summary.json", "metrics.json")  # pretraining's, a downstream task's


def read_segments(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / SEGMENTS
    return list(json.loads(path.read_text())["segments"]) if path.is_file() else []


def _keep(src: Path, dst: Path) -> None:
    """A second name for a finished file: a hard link (the new segment replaces the file by a rename, which leaves
    the old inode to this name), a copy where links are not possible."""
    if not src.is_file() or dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _position(run_dir: Path) -> dict[str, int]:
    from ssl_lab.checkpoint_io import read_checkpoint, resume_position
    from ssl_lab.tasks.common import LAST_CKPT

    last = run_dir / LAST_CKPT
    if not last.is_file():
        return {"from_epoch": 0, "from_step": 0}
    ckpt = read_checkpoint(last, mmap=True)
    return {"from_epoch": resume_position(ckpt)[0], "from_step": int(ckpt.get("global_step", 0))}


def start_segment(run_dir: Path, mode: str, changed: list[tuple[str, Any, Any]]) -> list[dict[str, Any]]:
    """Record a new segment before its config.yaml replaces the previous one; returns the segments so far.

    `changed`: (key, previous, new) for every setting the new segment changes."""
    run_dir = Path(run_dir)
    segments = read_segments(run_dir)
    if not segments:
        segments = [{"segment": 1, "mode": "new", "config": "config.1.yaml", "from_epoch": 0, "from_step": 0}]
    n = len(segments)
    previous = segments[-1]
    _keep(run_dir / "config.yaml", run_dir / previous["config"])
    for name in REPORTS:  # the previous segment finished: what it reported stays in the record
        if (run_dir / name).is_file():
            report = json.loads((run_dir / name).read_text())
            previous[Path(name).stem] = {k: v for k, v in report.items() if k not in ("data", "segments")}
    for name in KEPT_WEIGHTS:
        kept = f"{Path(name).stem}.{n}.pt"
        if (run_dir / name).is_file():
            _keep(run_dir / name, run_dir / kept)
            previous.setdefault("kept", []).append(kept)
    segments.append({"segment": n + 1, "mode": mode, "config": f"config.{n + 1}.yaml", **_position(run_dir),
                     "changed": {k: [a, b] for k, a, b in changed}})
    write_json(run_dir / SEGMENTS, {"segments": segments})
    return segments


def save_segment_config(run_dir: Path, saved: dict[str, Any]) -> None:
    """The current segment's config under its own name too (config.yaml always holds the latest)."""
    segments = read_segments(run_dir)
    if segments:
        atomic_write(Path(run_dir) / segments[-1]["config"],
                     lambda tmp: Path(tmp).write_text(yaml.safe_dump(saved, sort_keys=False)))
