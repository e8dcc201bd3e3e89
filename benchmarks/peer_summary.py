"""Peer check over seeds: mean ± std of every cell, and the targets judged on the means.

One seed of benchmarks/peer_check.py moves a cell by several points (450 digit or 300 lens test images: the
binomial standard error of one accuracy alone is 1-3 points), so the "ssl_lab >= lightly - 1 point" target is
only meaningful on an average. Each seed changes the split, the initialisation, the augmentation draws and (for
lens_sim) the simulated images; ssl_lab and lightly share all of them within a seed, so their difference is
paired. This script reads the JSON files of runs that differ in the seed only and prints, per dataset and method,
the mean ± std over seeds of each library's kNN and linear accuracy, the paired difference (mean ± standard error),
random init, the seconds-per-epoch ratio, and what misses the targets.

    python benchmarks/peer_summary.py peer_s0.json peer_s1.json peer_s2.json [--markdown]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

MARGIN = 0.01  # ssl_lab may trail lightly by at most one point, on the mean over seeds
METRICS = ("knn", "linear")
# settings that must agree between the runs (everything but the seed, the output path and the wall clock)
SAME = ("backbone", "batch_size", "digits_limit", "dino_local_crops", "epochs", "lens_per_class", "optim",
        "ssl_lab_override", "test_fraction", "knn", "linear_probe")


class SummaryError(ValueError):
    """Runs that cannot be averaged together; the message says which setting differs."""


def load(paths: list[str]) -> list[dict[str, Any]]:
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise SummaryError(f"{path}: no such file; pass the --out files of benchmarks/peer_check.py.") from None
        except json.JSONDecodeError as err:
            raise SummaryError(f"{path}: not JSON ({err.msg} at line {err.lineno}); is it a peer_check --out "
                               "file that was still being written?") from None
    return reports


def check_comparable(reports: list[dict[str, Any]], paths: list[str]) -> None:
    if not reports:
        raise SummaryError("no runs given; pass the JSON files written by benchmarks/peer_check.py --out.")
    first = reports[0]["settings"]
    seeds = [r["settings"]["seed"] for r in reports]
    if len(set(seeds)) != len(seeds):
        raise SummaryError(f"seed repeated among the runs ({seeds}); averaging a seed twice would fake agreement.")
    for report, path in zip(reports[1:], paths[1:]):
        for key in SAME:
            if report["settings"].get(key) != first.get(key):
                raise SummaryError(f"{path}: {key}={report['settings'].get(key)!r} but {paths[0]} has "
                                   f"{first.get(key)!r}; average only runs that differ in --seed.")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def _sem(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def summarise(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dataset and method: the per-seed values, their mean ± std, the paired Δ and the flags on the means.
    A (dataset, method) pair counts only over the seeds that measured it; the count is reported."""
    out: dict[str, Any] = {"seeds": [r["settings"]["seed"] for r in reports],
                           "epochs": reports[0]["settings"]["epochs"], "datasets": {}}
    names = dict.fromkeys(n for r in reports for n in r["datasets"])
    for name in names:
        runs = [r["datasets"][name] for r in reports if name in r["datasets"]]
        random = {m: [run["random"][m] for run in runs] for m in METRICS}
        ds = out["datasets"][name] = {
            "n_train": runs[0]["n_train"], "n_test": runs[0]["n_test"], "size": runs[0]["size"],
            "random": {m: _mean_std(random[m]) for m in METRICS}, "methods": {}}
        for method in dict.fromkeys(m for run in runs for m in run["methods"]):
            rows = [(run["methods"][method], run["random"]) for run in runs if method in run["methods"]]
            cell: dict[str, Any] = {"n_seeds": len(rows)}
            for lib in ("ssl_lab", "lightly"):
                cell[lib] = {m: _mean_std([row[lib][m] for row, _ in rows]) for m in METRICS}
            cell["delta"] = {}
            cell["vs_random"] = {}
            for m in METRICS:
                diffs = [row["ssl_lab"][m] - row["lightly"][m] for row, _ in rows]
                above = [row["ssl_lab"][m] - rnd[m] for row, rnd in rows]
                cell["delta"][m] = (statistics.fmean(diffs), _sem(diffs))
                cell["vs_random"][m] = (statistics.fmean(above), _sem(above))
            ratios = [row["ssl_lab"]["s_per_epoch"] / row["lightly"]["s_per_epoch"] for row, _ in rows
                      if row["ssl_lab"].get("s_per_epoch") and row["lightly"].get("s_per_epoch")]
            cell["s_per_epoch_ratio"] = statistics.median(ratios) if ratios else None
            cell["flags"] = [f"{m} < lightly-1 ({100 * cell['delta'][m][0]:+.1f})" for m in METRICS
                             if cell["delta"][m][0] < -MARGIN]
            cell["flags"] += [f"{m} <= random ({100 * cell['vs_random'][m][0]:+.1f})" for m in METRICS
                              if cell["vs_random"][m][0] <= 0]
            ds["methods"][method] = cell
    return out


def _pm(pair: tuple[float, float], signed: bool = False) -> str:
    mean, spread = (100 * v for v in pair)
    head = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return head if math.isnan(spread) else f"{head} ± {spread:.1f}"


def render(summary: dict[str, Any], markdown: bool) -> str:
    blocks = []
    for name, ds in summary["datasets"].items():
        rnd = ds["random"]
        title = (f"{name} ({ds['n_train']} train / {ds['n_test']} test, {ds['size']} px), {summary['epochs']} "
                 f"epochs, seeds {', '.join(map(str, summary['seeds']))}: kNN / linear in %, mean ± std "
                 f"(Δ: mean ± s.e. of the paired difference)")
        head = ["method", "ssl_lab kNN", "ssl_lab linear", "lightly kNN", "lightly linear", "Δ kNN", "Δ linear",
                "random kNN", "random linear", "s/epoch ratio", "misses"]
        rows = []
        for method, c in ds["methods"].items():
            ratio = "-" if c["s_per_epoch_ratio"] is None else f"{c['s_per_epoch_ratio']:.2f}"
            n = c["n_seeds"]
            rows.append([method + ("" if n == len(summary["seeds"]) else f" ({n} seed{'s' * (n != 1)})"),
                         _pm(c["ssl_lab"]["knn"]), _pm(c["ssl_lab"]["linear"]), _pm(c["lightly"]["knn"]),
                         _pm(c["lightly"]["linear"]), _pm(c["delta"]["knn"], True), _pm(c["delta"]["linear"], True),
                         _pm(rnd["knn"]), _pm(rnd["linear"]), ratio, "; ".join(c["flags"]) or "none"])
        if markdown:
            lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
        else:
            widths = [max(len(x) for x in col) for col in zip(head, *rows)]
            fmt = lambda r: " | ".join(x.ljust(w) for x, w in zip(r, widths))  # noqa: E731
            lines = [title, fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, rows)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSON files written by benchmarks/peer_check.py --out")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables (as in the README)")
    args = parser.parse_args(argv)
    reports = load(args.runs)
    check_comparable(reports, args.runs)
    summary = summarise(reports)
    print(render(summary, args.markdown))
    return summary


if __name__ == "__main__":
    try:
        main()
    except SummaryError as err:
        print(f"peer_summary: error: {err}", file=sys.stderr)
        sys.exit(2)
