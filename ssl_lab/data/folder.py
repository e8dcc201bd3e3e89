"""Image folders: PNG/JPG or .npy files, flat (unlabelled), class sub-folders, or DeepLense train/val/{class}/."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ssl_lab.data.base import (
    BaseDataModule, ChannelStats, check_classes, check_fraction, check_stratifiable, split_rows,
)
from ssl_lab.data.decode_cache import DecodeCache, cache_path, load_or_build
from ssl_lab.errors import ConfigError, DataError

log = logging.getLogger(__name__)


IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg"})
ARRAY_EXTS = frozenset({".npy"})


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS | ARRAY_EXTS)


def load_file(path: str, in_chans: int, image_size: int | None) -> np.ndarray:
    """Decode one file to [C, H, W]: uint8 for PNG/JPG, float32 for .npy; resized when image_size is set."""
    p = Path(path)
    if p.suffix.lower() in IMAGE_EXTS:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if in_chans == 1 else "RGB")
                if image_size and im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                a = np.array(im)  # a writable copy (torch refuses read-only buffers)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{p}: cannot be read as an image ({e}); remove or replace the file.") from None
        return np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    try:
        a = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{p}: cannot be read as a .npy array ({e}); remove or replace the file.") from None
    if a.dtype.kind not in "iufb":
        raise DataError(f"{p}: array dtype {a.dtype} is not numeric; store images as float or integer arrays.")
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[0] != in_chans and a.shape[2] == in_chans:
        a = a.transpose(2, 0, 1)
    elif a.ndim != 3:
        raise DataError(f"{p}: array shape {a.shape} is not [H, W], [C, H, W] or [H, W, C].")
    if a.shape[0] != in_chans:
        raise DataError(
            f"{p}: array shape {a.shape} has no axis of dataset.in_chans={in_chans} channels; "
            "set dataset.in_chans to the file's channel count."
        )
    t = torch.from_numpy(np.array(a, dtype=np.float32, order="C"))
    if image_size and t.shape[1:] != (image_size, image_size):
        t = F.interpolate(t[None], size=(image_size, image_size), mode="bilinear", align_corners=False)[0]
    return t.numpy()


class FolderDataset(Dataset):
    """Reads each file's row of the decode cache, else decodes the file in the worker (no cache, .npy arrays, or a
    file the cache could not decode, whose error then comes on reading it, as without a cache); every sample must
    come out with the shape found in setup."""

    def __init__(
        self, files: list[str], labels: np.ndarray | None, in_chans: int, image_size: int | None,
        shape: tuple[int, ...], cache: DecodeCache | None = None, rows: np.ndarray | None = None,
    ) -> None:
        self.files, self.labels, self.in_chans, self.image_size, self.shape = files, labels, in_chans, image_size, shape
        self.cache, self.rows = cache, rows  # rows[i]: file i's row of the cache, -1 where the cache lacks it

    def __len__(self) -> int:
        return len(self.files)

    def read_many(self, idx: np.ndarray) -> np.ndarray:
        """Samples ``idx`` stacked, in one fancy-indexed read when the cache holds them all."""
        if self.cache is not None and (self.rows[idx] >= 0).all():
            return np.asarray(self.cache.array[self.rows[idx]])
        return np.stack([self.read(int(i)) for i in idx])

    def read(self, i: int) -> np.ndarray:
        if self.cache is not None and self.rows[i] >= 0:
            return np.array(self.cache.array[self.rows[i]])  # a writable copy (torch refuses read-only buffers)
        a = load_file(self.files[i], self.in_chans, self.image_size)
        if a.shape != self.shape:
            raise DataError(
                f"{self.files[i]}: decoded shape {a.shape} differs from {self.shape} of the first file; "
                "set dataset.image_size to resize every file to one size."
            )
        return a

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        out = {"x": torch.from_numpy(self.read(i))}
        if self.labels is not None:
            out["y"] = torch.tensor(self.labels[i], dtype=torch.int64)
        return out


class FolderDataModule(BaseDataModule):
    """Files are listed once in setup, sorted, so the split and sample order are deterministic.

    Both modes split alike (see BaseDataModule): root/{class}/ is split train/val/test by the fractions, test
    first, stratified; a flat root/ has no test split (it cannot be used downstream); root/{train,val}/ (DeepLense)
    gives train -> train + val_fraction as val, val -> test; root/{train,val,test}/ is used as given. Labelled mode
    needs class sub-folders.
    """

    def __init__(
        self, name: str, root: str, in_chans: int, image_size: int | None = None, val_fraction: float = 0.2,
        batch_size: int = 64, num_workers: int = 2, seed: int = 0, stats_max_samples: int = 4096,
        labelled: bool = False, test_fraction: float = 0.2, label_fraction: float = 1.0, split_seed: int = 0,
        cache_dir: str = ".cache/ssl_lab", decode_cache: bool = True,
    ) -> None:
        super().__init__(
            name, in_chans, batch_size, num_workers, seed, stats_max_samples, labelled, test_fraction, label_fraction,
            split_seed,
        )
        self.root, self.image_size, self.val_fraction = root, image_size, check_fraction(val_fraction)
        self.layout = ""
        if not isinstance(decode_cache, bool):
            raise ConfigError(f"dataset.decode_cache={decode_cache!r} must be true or false.")
        self.cache_dir, self.decode_cache = Path(str(cache_dir)).expanduser().absolute(), decode_cache
        self.cache_info: dict[str, Any] = {"used": False}

    def _list(self, d: Path, classes: list[str] | None = None) -> tuple[list[str], np.ndarray | None, list[str]]:
        """Files under ``d`` and their labels (None when flat); ``classes`` fixes the class order (val split)."""
        top = _files(d)
        subdirs = {s.name: _files(s) for s in sorted(d.iterdir()) if s.is_dir()}
        subdirs = {k: v for k, v in subdirs.items() if v}
        if top and subdirs:
            raise DataError(
                f"{d}: holds both image files and class sub-folders ({', '.join(subdirs)}); keep either a flat "
                "folder (unlabelled) or one sub-folder per class."
            )
        if not top and not subdirs:
            exts = ", ".join(sorted(IMAGE_EXTS | ARRAY_EXTS))
            raise DataError(f"{d}: no image files ({exts}) found directly inside or in class sub-folders; "
                            "check dataset.root.")
        if top:
            if classes:
                raise DataError(f"{d}: is flat but the train folder has classes {classes}; use the same layout.")
            return [str(p) for p in top], None, []
        classes = classes or list(subdirs)
        unknown = sorted(set(subdirs) - set(classes))
        if unknown:
            raise DataError(f"{d}: class folders {unknown} do not exist in the train folder (classes {classes}).")
        files = [str(p) for c in classes for p in subdirs.get(c, [])]
        labels = np.array([i for i, c in enumerate(classes) for _ in subdirs.get(c, [])], dtype=np.int64)
        return files, labels, classes

    def _setup(self) -> None:
        root = Path(str(self.root)).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: folder not found; check dataset.root.")
        if (root / "train").is_dir() and (root / "val").is_dir():
            tr_files, tr_labels, classes = self._list(root / "train")
            va_files, va_labels, _ = self._list(root / "val", classes or None)
            if tr_labels is None and va_labels is not None:
                raise DataError(f"{root / 'train'}: is flat but {root / 'val'} has class folders; use one layout.")
            parts = [(tr_files, tr_labels), (va_files, va_labels)]
            if (root / "test").is_dir():
                self.layout = "train/val/test"
                parts.append(self._list(root / "test", classes or None)[:2])
            else:
                self.layout = "train/val"
            files = [f for part, _ in parts for f in part]
            labels = None if tr_labels is None else np.concatenate([y for _, y in parts]).astype(np.int64)
            starts = np.cumsum([0, *(len(part) for part, _ in parts)])
            if self.labelled:
                self._need_classes(root / "train", tr_labels, classes)
            if self.layout == "train/val/test":  # used as given
                train, val, test = (np.arange(starts[i], starts[i + 1]) for i in range(3))
            else:  # DeepLense: the given val folder is held out as the test split; val is carved from train
                train, val, test = split_rows(np.arange(starts[1]), labels, self.test_fraction, self.val_fraction,
                                              self.split_seed, test=np.arange(starts[1], starts[2]))
        else:
            files, labels, classes = self._list(root)
            self.layout = "classes" if labels is not None else "flat"
            if self.labelled:
                self._need_classes(root, labels, classes)
                check_stratifiable(labels, classes)
            train, val, test = split_rows(np.arange(len(files)), labels, self.test_fraction, self.val_fraction,
                                          self.split_seed)
        fit = self._fit_rows(train, val, labels)
        pick = lambda rows: ([files[i] for i in rows], None if labels is None else labels[rows])  # noqa: E731
        (tr_files, tr_labels), (va_files, va_labels), (te_files, te_labels) = pick(fit), pick(val), pick(test)
        kinds = {Path(f).suffix.lower() in ARRAY_EXTS for f in files}
        if len(kinds) > 1:
            raise DataError(f"{root}: mixes .npy arrays and PNG/JPG images; keep one kind of file per dataset.")
        if not kinds.pop() and self.in_chans not in (1, 3):
            raise DataError(
                f"{root}: PNG/JPG images are read as 1 (greyscale) or 3 (RGB) channels but dataset.in_chans="
                f"{self.in_chans}; set dataset.in_chans=1 or 3, or store .npy arrays."
            )
        if not tr_files:
            raise DataError(f"{root}: the train split is empty; lower dataset.val_fraction or add files.")
        make, first = self._dataset_maker(root, files, tr_files[0])
        self.image_shape = (int(first.shape[1]), int(first.shape[2]))
        self.train_set, self.val_set = make(tr_files, tr_labels), make(va_files, va_labels)
        self.test_set = make(te_files, te_labels) if self.labelled else None
        self.class_names = classes or None
        self.num_classes = len(classes) if classes else None
        self.target_names = []
        rel = lambda rows: [Path(files[i]).relative_to(root).as_posix() for i in rows]  # noqa: E731
        self._record_splits(**{k: {"files": rel(v)} for k, v in
                               {"train": train, "val": val, "test": test, "fit": fit}.items()})
        # image stats over every training image: label_fraction limits labels, not images
        pool = self.train_set if not self.labelled else make(pick(train)[0], None)
        self.mean, self.std = self._stats(pool, first.dtype == np.uint8)

    def _split_source(self) -> dict[str, Any]:
        return {"kind": "folder", "root": str(Path(str(self.root)).expanduser().resolve())}

    def _split_settings(self) -> dict[str, Any]:
        return {"layout": self.layout}

    def _dataset_maker(
        self, root: Path, files: list[str], first_file: str,
    ) -> tuple[Callable[[list[str], np.ndarray | None], FolderDataset], np.ndarray]:
        """(how this run's datasets are made, the sample of ``first_file``); ``files``: every file listed under the
        root, all splits.

        PNG/JPG go through one decode cache of all of ``files``, so pretraining and downstream runs share it.
        .npy folders are not cached: they are arrays already, read as they are.
        """
        decode = functools.partial(load_file, in_chans=self.in_chans, image_size=self.image_size)
        arrays = Path(first_file).suffix.lower() in ARRAY_EXTS
        if arrays or not self.decode_cache:
            first = decode(first_file)
            self.cache_info = {"used": False, "why": ".npy arrays are read as they are" if arrays
                               else "dataset.decode_cache=false"}

            def plain(f: list[str], y: np.ndarray | None) -> FolderDataset:
                return FolderDataset(f, y, self.in_chans, self.image_size, first.shape)

            return plain, first
        rel = {f: Path(f).relative_to(root).as_posix() for f in files}
        ordered = sorted(rel, key=rel.__getitem__)
        params = {"in_chans": self.in_chans, "image_size": self.image_size, "decode": f"Pillow {PIL.__version__}"}
        cache = load_or_build(cache_path(self.cache_dir, root, ordered, params), ordered, decode, self.in_chans,
                              self.image_size, self.num_workers)
        row_of = {f: r for r, f in enumerate(ordered) if r not in cache.bad}

        def cached(f: list[str], y: np.ndarray | None) -> FolderDataset:
            rows = np.array([row_of.get(x, -1) for x in f], np.int64)  # -1: decoded when read
            return FolderDataset(f, y, self.in_chans, self.image_size, cache.shape[1:], cache, rows)

        bad = [rel[ordered[r]] for r in sorted(cache.bad)]
        if bad:
            log.warning("%s: %d files could not be decoded into the cache and fail when read (%s%s); remove or "
                        "replace them", root, len(bad), ", ".join(bad[:5]), ", ..." if len(bad) > 5 else "")
        self.cache_info = {"used": True, "path": cache.path, "built": cache.built, "undecodable": len(bad)}
        return cached, cached([first_file], None).read(0)

    def _need_classes(self, d: Path, labels: np.ndarray | None, classes: list[str]) -> None:
        if labels is None:
            raise DataError(
                f"{d}: is a flat folder, but labelled (downstream) mode needs one sub-folder per class "
                "(e.g. root/cat/*.png, root/dog/*.png)."
            )
        check_classes(labels, str(d), "Add a sub-folder of images for each other class.", names=classes)

    def _stats(self, ds: FolderDataset, is_uint8: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Reads a seeded sample of train images (their decode-cache rows once the cache exists), which also
        surfaces unreadable files before training."""
        n = len(ds)
        idx = np.sort(np.random.default_rng(self.seed + 1).choice(n, min(n, self.stats_max_samples), replace=False))
        stats = ChannelStats(self.in_chans)
        for s in range(0, len(idx), 256):
            stats.update(ds.read_many(idx[s : s + 256]), channel_axis=1)
        return stats.result(1 / 255 if is_uint8 else 1.0)

    def _summary_extra(self) -> dict[str, Any]:
        return {"root": str(self.root), "layout": self.layout, "image_size": self.image_size,
                "stats_samples": min(len(self.train_set), self.stats_max_samples), "decode_cache": self.cache_info}
