"""The data a run trains on, as a short table for its log (the full dict stays in summary.json)."""
from __future__ import annotations

from typing import Any, Mapping


def _stats(values: Any) -> str:
    values = list(values or [])
    shown = ", ".join(f"{float(v):.4g}" for v in values[:4])
    return f"[{shown}{', ...' if len(values) > 4 else ''}]"


def data_table(summary: Mapping[str, Any]) -> str:
    """Rows of `what | value`: source, images, split sizes, labels and targets, normalisation, data problems."""
    source = summary.get("path") or summary.get("root") or summary.get("simulator", {}).get("simulator") or "-"
    shape = "x".join(str(s) for s in summary.get("image_shape", []))
    image = f"{summary.get('in_chans')} ch, {shape} px"
    if summary.get("dtype"):
        image += f", {summary['dtype']}" + (f" {summary['layout']}" if summary.get("layout") else "")
    split = f"train {summary.get('n_train')}, val {summary.get('n_val')}"
    if summary.get("n_test") is not None:
        split += f", test {summary['n_test']}"
    split += f" (split_seed {summary.get('split_seed')}"
    if summary.get("label_fraction") not in (None, 1.0):
        split += f", label_fraction {summary['label_fraction']}"
    split += ")"
    classes = summary.get("num_classes")
    labels = f"{classes} classes" if classes else "none"
    names = summary.get("class_names") or []
    if names:
        labels += f": {', '.join(map(str, names[:6]))}{', ...' if len(names) > 6 else ''}"
    targets = ", ".join(summary.get("target_names") or []) or "none"
    rows = [("data", f"{summary.get('name')} ({'labelled' if summary.get('labelled') else 'all images'})"),
            ("source", str(source)), ("images", image), ("split", split), ("labels", labels),
            ("targets", targets), ("mean / std", f"{_stats(summary.get('mean'))} / {_stats(summary.get('std'))}")]
    problems = [f"{key} {summary[key]}" for key in ("nan_pixels_replaced", "dropped") if summary.get(key)]
    if problems:
        rows.append(("non-finite", ", ".join(problems)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)} | {v}" for k, v in rows)
