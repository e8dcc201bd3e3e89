"""Image folders: PNG/JPG or .npy files, flat (unlabelled), class sub-folders, or DeepLense train/val/{class}/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ssl_lab.data.base import (
    BaseDataModule, ChannelStats, check_classes, check_fraction, label_subset, labelled_splits, split_indices,
)
from ssl_lab.errors import DataError


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
    """Decodes files in the worker; every sample must come out with the shape found in setup."""

    def __init__(
        self, files: list[str], labels: np.ndarray | None, in_chans: int, image_size: int | None,
        shape: tuple[int, ...],
    ) -> None:
        self.files, self.labels, self.in_chans, self.image_size, self.shape = files, labels, in_chans, image_size, shape

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> np.ndarray:
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

    Labelled mode needs class sub-folders: root/{class}/ is split train/val/test by the fractions;
    root/{train,val}/{class}/ (DeepLense) gives train -> train + val_fraction as val, val -> test;
    root/{train,val,test}/{class}/ is used as given.
    """

    def __init__(
        self, name: str, root: str, in_chans: int, image_size: int | None = None, val_fraction: float = 0.2,
        batch_size: int = 64, num_workers: int = 2, seed: int = 0, stats_max_samples: int = 4096,
        labelled: bool = False, test_fraction: float = 0.2, label_fraction: float = 1.0,
    ) -> None:
        super().__init__(
            name, in_chans, batch_size, num_workers, seed, stats_max_samples, labelled, test_fraction, label_fraction
        )
        self.root, self.image_size, self.val_fraction = root, image_size, check_fraction(val_fraction)
        self.layout = ""

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
        te_files: list[str] = []
        te_labels = None
        full_train: list[str] | None = None
        if (root / "train").is_dir() and (root / "val").is_dir():
            self.layout = "train/val"
            tr_files, tr_labels, classes = self._list(root / "train")
            va_files, va_labels, _ = self._list(root / "val", classes or None)
            if tr_labels is None and va_labels is not None:
                raise DataError(f"{root / 'train'}: is flat but {root / 'val'} has class folders; use one layout.")
            if self.labelled:
                self._need_classes(root / "train", tr_labels, classes)
                if (root / "test").is_dir():
                    self.layout = "train/val/test"
                    te_files, te_labels, _ = self._list(root / "test", classes)
                    keep = label_subset(np.arange(len(tr_files)), tr_labels, self.label_fraction, self.seed)
                    full_train = tr_files
                else:  # the given val folder is held out as the test split; val is carved from train
                    te_files, te_labels = va_files, va_labels
                    tr, va, _, full = labelled_splits(
                        tr_labels, self.test_fraction, self.val_fraction, self.label_fraction, self.seed, classes,
                        train_pool=np.arange(len(tr_files)),
                    )
                    full_train = [tr_files[i] for i in full]
                    va_files, va_labels = [tr_files[i] for i in va], tr_labels[va]
                    keep = tr
                tr_files, tr_labels = [tr_files[i] for i in keep], tr_labels[keep]
        else:
            files, labels, classes = self._list(root)
            self.layout = "classes" if labels is not None else "flat"
            if self.labelled:
                self._need_classes(root, labels, classes)
                tr_idx, va_idx, te_idx, full = labelled_splits(
                    labels, self.test_fraction, self.val_fraction, self.label_fraction, self.seed, classes
                )
                te_files, te_labels = [files[i] for i in te_idx], labels[te_idx]
                full_train = [files[i] for i in full]
            else:
                tr_idx, va_idx = split_indices(len(files), self.val_fraction, self.seed, labels)
            tr_files, va_files = [files[i] for i in tr_idx], [files[i] for i in va_idx]
            tr_labels, va_labels = (labels[tr_idx], labels[va_idx]) if labels is not None else (None, None)
        kinds = {Path(f).suffix.lower() in ARRAY_EXTS for f in tr_files + va_files + te_files}
        if len(kinds) > 1:
            raise DataError(f"{root}: mixes .npy arrays and PNG/JPG images; keep one kind of file per dataset.")
        if not kinds.pop() and self.in_chans not in (1, 3):
            raise DataError(
                f"{root}: PNG/JPG images are read as 1 (greyscale) or 3 (RGB) channels but dataset.in_chans="
                f"{self.in_chans}; set dataset.in_chans=1 or 3, or store .npy arrays."
            )
        if not tr_files:
            raise DataError(f"{root}: the train split is empty; lower dataset.val_fraction or add files.")
        first = load_file(tr_files[0], self.in_chans, self.image_size)
        self.image_shape = (int(first.shape[1]), int(first.shape[2]))
        make = lambda f, y: FolderDataset(f, y, self.in_chans, self.image_size, first.shape)  # noqa: E731
        self.train_set, self.val_set = make(tr_files, tr_labels), make(va_files, va_labels)
        self.test_set = make(te_files, te_labels) if self.labelled else None
        self.class_names = classes or None
        self.num_classes = len(classes) if classes else None
        self.target_names = []
        # image stats over every training image: label_fraction limits labels, not images
        pool = self.train_set if full_train is None else make(full_train, None)
        self.mean, self.std = self._stats(pool, first.dtype == np.uint8)

    def _need_classes(self, d: Path, labels: np.ndarray | None, classes: list[str]) -> None:
        if labels is None:
            raise DataError(
                f"{d}: is a flat folder, but labelled (downstream) mode needs one sub-folder per class "
                "(e.g. root/cat/*.png, root/dog/*.png)."
            )
        check_classes(labels, str(d), "Add a sub-folder of images for each other class.", names=classes)

    def _stats(self, ds: FolderDataset, is_uint8: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Reads a seeded sample of train files, which also surfaces unreadable files before training."""
        n = len(ds)
        idx = np.sort(np.random.default_rng(self.seed + 1).choice(n, min(n, self.stats_max_samples), replace=False))
        stats = ChannelStats(self.in_chans)
        for s in range(0, len(idx), 256):
            stats.update(np.stack([ds.read(int(i)) for i in idx[s : s + 256]]), channel_axis=1)
        return stats.result(1 / 255 if is_uint8 else 1.0)

    def _summary_extra(self) -> dict[str, Any]:
        return {"root": str(self.root), "layout": self.layout, "image_size": self.image_size,
                "stats_samples": min(len(self.train_set), self.stats_max_samples)}
