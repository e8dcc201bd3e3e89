"""`dataset.bad_samples`: what a sample that cannot be read does to a run that is already training.

Start-up reads a bounded sample of the data, so in a large folder or file a corrupt item (a truncated PNG, an
unreadable HDF5 chunk, NaN under nan_policy=error) can surface hours in. `error` (the default) stops the run: its
checkpoint is written first (ssl_lab.tasks.fitting) and the message names the file or index. `skip` drops the item
from its batch and counts it; more than `dataset.max_bad_samples` of them stop the run as `error` would. The count is
exact across DataLoader workers (one shared flag per sample) and goes into summary.json; it covers the samples this
process read (a resumed run counts its own segment).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from ssl_lab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("error", "skip")
READ_ERRORS = (DataError, OSError)  # what the readers raise for an item they cannot decode (h5py: OSError)


def check_bad_samples(policy: Any, cap: Any) -> tuple[str, int]:
    if policy not in BAD_SAMPLE_POLICIES:
        raise ConfigError(f"dataset.bad_samples={policy!r} is not one of {', '.join(BAD_SAMPLE_POLICIES)} (error: "
                          "stop at an unreadable sample; skip: drop and count it).")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise ConfigError(f"dataset.max_bad_samples={cap!r} must be an integer >= 0 (how many unreadable samples "
                          "bad_samples=skip drops before it stops the run).")
    return str(policy), int(cap)


class SkipBadSamples(Dataset):
    """Returns None for an item its dataset cannot read (the collate leaves it out), and marks it."""

    def __init__(self, dataset: Dataset, cap: int, split: str) -> None:
        self.dataset, self.cap, self.split = dataset, int(cap), split
        self.bad = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()  # set by whichever worker read it

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except READ_ERRORS as err:
            self.bad[i] = True
            count = int(self.bad.sum())
            if count > self.cap:
                raise DataError(f"{count} unreadable samples in the {self.split} split, more than "
                                f"dataset.max_bad_samples={self.cap} allows; the last: {err}") from None
            log.warning("skipping unreadable sample %d of the %s split (%d so far): %s", i, self.split, count, err)
            return None

    def count(self) -> int:
        return int(self.bad.sum())

    def examples(self, n: int = 5) -> list[int | str]:
        """The first skipped samples: their files where the dataset has them, else their indices in the split."""
        idx = [int(i) for i in torch.nonzero(self.bad).flatten()[:n]]
        files = getattr(self.dataset, "files", None)
        return [str(files[i]) for i in idx] if files is not None else idx


def skip_collate(items: list[Any]) -> Any:
    kept = [x for x in items if x is not None]
    if not kept:
        raise DataError(f"every sample of a batch of {len(items)} was unreadable (dataset.bad_samples=skip); check "
                        "the data with python -m ssl_lab.inspect <path>.")
    return default_collate(kept)
