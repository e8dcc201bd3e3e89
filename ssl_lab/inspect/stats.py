"""Statistics merged block by block in float64, so a key far larger than memory is summarised in one bounded pass.

Non-finite values are counted, not averaged: min / max / mean / std describe the finite values only, which is what a
loader that replaces or drops NaN/Inf (dataset.nan_policy) will train on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MAX_DISTINCT = 1000  # a 1-D column with more distinct values is not a class label: stop counting them


class ChannelStats:
    """Per-channel count / min / max / mean / M2 (Chan et al. merge) and NaN / Inf counts, plus rows with any."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.count = np.zeros(channels, np.int64)
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)
        self.nan = np.zeros(channels, np.int64)
        self.inf = np.zeros(channels, np.int64)
        self.rows = 0
        self.bad_rows = 0

    def update(self, block: np.ndarray, channel_axis: int | None) -> None:
        """Add rows ``block`` [rows, ...]; ``channel_axis`` None treats every value as one channel."""
        rows = block.shape[0]
        if rows == 0:
            return
        if channel_axis is None:
            planes = block.reshape(rows, 1, 1, -1)
        else:  # a view: (rows, axes before the channel, channel, axes after): one channel copied at a time
            pre = math.prod(block.shape[1:channel_axis])
            planes = block.reshape(rows, pre, self.channels, -1)
        row_bad = np.zeros(rows, bool)
        check = block.dtype.kind == "f" and not np.isfinite(block).all()  # one contiguous pass: usually clean
        for c in range(self.channels):
            v = planes[:, :, c, :].reshape(rows, -1)  # a view with a long inner axis (fast numpy loops)
            if check:
                finite = np.isfinite(v)
                if not finite.all():
                    nan = int(np.count_nonzero(np.isnan(v)))
                    self.nan[c] += nan
                    self.inf[c] += int(finite.size - np.count_nonzero(finite)) - nan
                    row_bad |= ~finite.reshape(rows, -1).all(axis=1)
                    v = v[finite]
            self._merge(c, np.asarray(v, np.float64).ravel())
        self.rows += rows
        self.bad_rows += int(row_bad.sum())

    def _merge(self, c: int, v: np.ndarray) -> None:
        n = v.size
        if n == 0:
            return
        mean = float(v.sum()) / n
        d = v - mean
        m2 = float(d @ d)
        total = int(self.count[c]) + n
        delta = mean - self.mean[c]
        self.mean[c] += delta * n / total
        self.m2[c] += m2 + delta * delta * int(self.count[c]) * n / total
        self.count[c] = total
        self.min[c] = min(self.min[c], float(v.min()))
        self.max[c] = max(self.max[c], float(v.max()))

    def result(self) -> list[dict[str, Any]]:
        """One json-ready dict per channel; the value fields are None where a channel had no finite value."""
        out = []
        for c in range(self.channels):
            has = self.count[c] > 0
            out.append({
                "channel": c,
                "min": float(self.min[c]) if has else None,
                "max": float(self.max[c]) if has else None,
                "mean": float(self.mean[c]) if has else None,
                "std": math.sqrt(self.m2[c] / self.count[c]) if has else None,
                "finite": int(self.count[c]), "nan": int(self.nan[c]), "inf": int(self.inf[c]),
            })
        return out


class ValueCounts:
    """Distinct finite values of a 1-D column and their counts (up to MAX_DISTINCT), and whether all are integers."""

    def __init__(self, limit: int = MAX_DISTINCT) -> None:
        self.limit = limit
        self.counts: dict[Any, int] = {}
        self.overflow = False
        self.integral = True

    def update(self, values: np.ndarray) -> None:
        v = values.ravel()
        if v.dtype.kind == "f":
            v = v[np.isfinite(v)]
            if self.integral and not np.array_equal(v, np.round(v)):
                # not class ids: their counts are not needed
                self.integral, self.overflow, self.counts = False, True, {}
        if self.overflow or v.size == 0:
            return
        uniq, counts = np.unique(v, return_counts=True)
        for value, k in zip(uniq.tolist(), counts.tolist()):
            self.counts[value] = self.counts.get(value, 0) + k
        if len(self.counts) > self.limit:
            self.overflow, self.counts = True, {}

    @property
    def distinct(self) -> int | None:
        """Number of distinct finite values, None when more than the limit."""
        return None if self.overflow else len(self.counts)

    def classes(self) -> dict[int, int]:
        """Counts per integer value, sorted by value (for an integral column)."""
        return {int(k): v for k, v in sorted(self.counts.items())}
