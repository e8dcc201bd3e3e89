"""The text form of an inspection report (the --json form is the report dict itself)."""

from __future__ import annotations

from typing import Any


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.5g}"


def _shape(s: list[int] | None) -> str:
    return "-" if not s else "(" + ", ".join(map(str, s)) + ("," if len(s) == 1 else "") + ")"


def _role(k: dict[str, Any]) -> str:
    if k["role"] == "image":
        return f"image {k['layout']}, {k['channels']} channel{'s' * (k['channels'] != 1)}"
    if k["role"] == "label":
        return f"label, {len(k['classes'])} class{'es' * (len(k['classes']) != 1)}"
    return k["role"]


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _h5_lines(report: dict[str, Any]) -> list[str]:
    keys = report["keys"]
    lines = [f"HDF5 file {report['path']} ({report['bytes'] / 2**20:.1f} MB, {len(keys)} datasets)"]
    rows = [["key", "shape", "dtype", "chunks", "compression", "role"]]
    rows += [[k["key"], _shape(k["shape"]), k["dtype"], _shape(k["chunks"]) if k["chunks"] else "contiguous",
              k["compression"] or (",".join(k["filters"]) or "none"), _role(k)] for k in keys]
    lines += _table(rows)
    for k in keys:
        if "stats" not in k or not k["rows"]:
            continue
        lines.append(f"'{k['key']}': read {k['rows_examined']} of {k['rows']} rows in {k['blocks_read']} blocks")
        rows = [["channel", "min", "max", "mean", "std", "NaN", "Inf"]]
        rows += [[str(s["channel"]) if k["role"] == "image" else "all", _num(s["min"]), _num(s["max"]),
                  _num(s["mean"]), _num(s["std"]), str(s["nan"]), str(s["inf"])] for s in k["stats"]]
        lines += _table(rows, "    ")
    return lines


def _folder_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"image folder {report['path']} ({report['layout']} layout, {report['files']} files)"]
    for split, counts in report["splits"].items():
        lines.append(f"  {split}: " + ", ".join(f"{c}: {n}" for c, n in counts.items()))
    if report["files"]:
        lines.append(f"  decoded {report['examined']} files: modes {report['modes']}, sizes (H x W) "
                     f"{report['sizes']}, channels {report['channels']}")
        lines += [f"  unreadable: {u['path']}: {u['reason']}" for u in report["unreadable"]]
    return lines


def format_report(report: dict[str, Any]) -> str:
    """Keys (or classes), statistics, findings (problems first) and the suggested command line."""
    lines = _h5_lines(report) if report["kind"] == "hdf5" else _folder_lines(report)
    found = sorted(report["findings"], key=lambda f: f["level"] != "warning")
    if found:
        lines.append("findings:")
        lines += [f"  {'WARNING' if f['level'] == 'warning' else 'info'}: {f['message']}" for f in found]
    if report["suggestion"]:
        lines += ["suggested command:", f"  {report['suggestion']}"]
    lines += [f"  note: {n}" for n in report["suggestion_notes"]]
    return "\n".join(lines)
