"""STL-10 from the official binary files, memory-mapped so the 2.7 GB unlabeled split is never loaded whole."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ssl_lab.data.base import BaseDataModule, ChannelStats, check_fraction, split_rows
from ssl_lab.errors import ConfigError, DataError

IMAGE_BYTES = 3 * 96 * 96
CLASS_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
SPLITS = {"unlabeled": ["unlabeled"], "train": ["train"], "unlabeled+train": ["unlabeled", "train"]}
LAYOUT = (
    "expected <root>/stl10_binary/ with unlabeled_X.bin, train_X.bin, train_y.bin, test_X.bin, test_y.bin "
    "(the official stl10_binary.tar.gz unpacked); set dataset.root to the folder that contains stl10_binary/"
)


class STL10Dataset(Dataset):
    """Concatenation of .bin image files; each process maps the files itself (a memmap must not be pickled).

    ``indices`` (into the concatenation) selects a subset, e.g. a labelled train/val split.
    """

    def __init__(
        self, files: list[str], counts: list[int], labels: np.ndarray | None, indices: np.ndarray | None = None
    ) -> None:
        self.files, self.labels, self.indices = files, labels, indices
        self.offsets = np.cumsum([0, *counts])
        self._maps: list[np.memmap] | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None, "_pid": None}

    def __len__(self) -> int:
        return int(self.offsets[-1]) if self.indices is None else len(self.indices)

    def images(self, part: int) -> np.memmap:
        """Memory map of file ``part`` as [N, 3, 96(W), 96(H)] (the file stores each channel column-major)."""
        if self._maps is None or self._pid != os.getpid():
            self._maps = [np.memmap(f, np.uint8, "r").reshape(-1, 3, 96, 96) for f in self.files]
            self._pid = os.getpid()
        return self._maps[part]

    def read(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        i = i if self.indices is None else int(self.indices[i])
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return np.ascontiguousarray(self.images(part)[i - self.offsets[part]].transpose(0, 2, 1))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        out = {"x": torch.from_numpy(self.read(int(i)))}
        if self.labels is not None:
            j = int(i) if self.indices is None else int(self.indices[i])
            out["y"] = torch.tensor(self.labels[j], dtype=torch.int64)
        return out


class STL10DataModule(BaseDataModule):
    """The official test set (8000) is the test split in both modes and never read for training.

    Each part gives train plus val_fraction as val (stratified for the labelled train part, seeded by split_seed),
    the same in both modes. Pretraining fits on every image of ``split`` (unlabeled, train, or both: train + val).
    Labelled mode fits on the label_fraction subset of the train part's train split; ``split`` and
    ``test_fraction`` play no part there.
    """

    def __init__(
        self, name: str, root: str, in_chans: int = 3, split: str = "unlabeled", batch_size: int = 64,
        num_workers: int = 2, seed: int = 0, stats_max_samples: int = 4096, labelled: bool = False,
        test_fraction: float = 0.2, label_fraction: float = 1.0, val_fraction: float = 0.1, split_seed: int = 0,
        bad_samples: str = "error", max_bad_samples: int = 100,
    ) -> None:
        super().__init__(
            name, in_chans, batch_size, num_workers, seed, stats_max_samples, labelled, test_fraction, label_fraction,
            split_seed, bad_samples=bad_samples, max_bad_samples=max_bad_samples,
        )
        if split not in SPLITS:
            raise ConfigError(f"dataset.split={split!r} is not one of {', '.join(SPLITS)}.")
        self.root, self.split, self.val_fraction = root, split, check_fraction(val_fraction)

    def _images(self, part: str) -> tuple[str, int]:
        path = Path(str(self.root)).expanduser() / "stl10_binary" / f"{part}_X.bin"
        if not path.is_file():
            raise DataError(f"{path}: not found; {LAYOUT}.")
        size = path.stat().st_size
        if size == 0 or size % IMAGE_BYTES:
            raise DataError(f"{path}: {size} bytes is not a whole number of 3x96x96 uint8 images; re-download it.")
        return str(path), size // IMAGE_BYTES

    def _labels(self, part: str, n: int) -> np.ndarray:
        path = Path(str(self.root)).expanduser() / "stl10_binary" / f"{part}_y.bin"
        if not path.is_file():
            raise DataError(f"{path}: not found; {LAYOUT}.")
        y = np.fromfile(path, np.uint8)
        if len(y) != n:
            raise DataError(f"{path}: {len(y)} labels for {n} images in {part}_X.bin; re-download the pair.")
        if len(y) and (y.min() < 1 or y.max() > 10):
            raise DataError(f"{path}: labels must be 1..10 as in the official files, found {y.min()}..{y.max()}.")
        return y.astype(np.int64) - 1

    def _setup(self) -> None:
        if self.in_chans != 3:
            raise DataError(f"STL-10 images have 3 channels but dataset.in_chans={self.in_chans}; set in_chans=3.")
        names_file = Path(str(self.root)).expanduser() / "stl10_binary" / "class_names.txt"
        names = names_file.read_text().split() if names_file.is_file() else []
        self.class_names = names if len(names) == 10 else list(CLASS_NAMES)
        self.num_classes, self.image_shape, self.target_names = 10, (96, 96), []
        parts = ["train"] if self.labelled else SPLITS[self.split]
        files, counts = (list(v) for v in zip(*(self._images(p) for p in parts)))
        labels = {p: self._labels(p, n) for p, n in zip(parts, counts) if p == "train"}
        test_file, test_n = self._images("test")
        test_labels = self._labels("test", test_n)
        offsets = np.cumsum([0, *counts])
        train, val, fit = {}, {}, {}
        for part, n in zip(parts, counts):
            y = labels.get(part)  # the official test file is the test split: nothing is drawn from this part
            train[part], val[part], _ = split_rows(np.arange(n), y, self.test_fraction, self.val_fraction,
                                                   self.split_seed, test=np.zeros(0, np.int64))
            fit[part] = self._fit_rows(train[part], val[part], y)
        concat = lambda rows: np.concatenate([rows[p] + offsets[i] for i, p in enumerate(parts)])  # noqa: E731
        all_labels = labels["train"] if parts == ["train"] else None
        self.train_set = STL10Dataset(files, counts, all_labels, concat(fit))
        self.val_set = STL10Dataset(files, counts, all_labels, concat(val))
        self.test_set = STL10Dataset([test_file], [test_n], test_labels) if self.labelled else None
        self._record_splits(train=train, val=val, test={"test": np.arange(test_n)}, fit=fit)
        # image stats: every image of the parts read (label_fraction limits labels, not images)
        self.mean, self.std = self._stats(STL10Dataset(files, counts, all_labels))

    def _split_source(self) -> dict[str, Any]:
        d = Path(str(self.root)).expanduser().resolve() / "stl10_binary"
        sizes = {f.name: f.stat().st_size for f in sorted(d.glob("*_X.bin"))}
        return {"kind": "stl10", "root": str(d.parent), "files": sizes}

    def _split_settings(self) -> dict[str, Any]:
        return {"split": "train" if self.labelled else self.split, "test": "official test set"}

    def _stats(self, ds: STL10Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Stats of x/255 over a seeded random sample of the training images, read in sorted blocks."""
        n = int(ds.offsets[-1])
        rng = np.random.default_rng(self.seed + 1)
        idx = np.sort(rng.choice(n, min(n, self.stats_max_samples), replace=False))
        stats = ChannelStats(3)
        for part in range(len(ds.files)):
            lo, hi = ds.offsets[part], ds.offsets[part + 1]
            rows = idx[(idx >= lo) & (idx < hi)] - lo
            for s in range(0, len(rows), 1024):  # column-major storage does not change per-channel stats
                stats.update(np.asarray(ds.images(part)[rows[s : s + 1024]]), channel_axis=1)
        ds._maps = None  # the main process need not keep the files mapped
        return stats.result(1 / 255)

    def _summary_extra(self) -> dict[str, Any]:
        if self.labelled:
            return {"root": str(self.root), "split": "train", "val": f"{self.val_fraction} of train", "test": "test"}
        return {"root": str(self.root), "split": self.split, "val": f"{self.val_fraction} of {self.split}",
                "test": "test (not read)"}
