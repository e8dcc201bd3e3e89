"""Image folders: PNG/JPG, TIFF or .npy files, flat (unlabelled), class sub-folders, or DeepLense train/val/{class}/.

Bit depth. 8-bit files (every JPG, 8-bit PNG, 8-bit TIFF) decode to uint8 exactly as they always did: normalisation
statistics are those of x / 255 and the decode cache holds uint8. Files of more than 8 bits (16-bit greyscale PNG,
16/32-bit integer or float TIFF) decode to float32 holding their own values (0..65535 for 16 bits: never rescaled
or clipped to 8 bits); their statistics and the augmentation work in those raw units, and the cache holds float32.
A folder that mixes the two is refused (a careful reading of such data cannot guess whether 200 in an 8-bit file
and 200 in a 16-bit file mean the same intensity): convert the files to one bit depth. 16-bit colour PNGs are
refused too, since Pillow reads only their top 8 bits; store them as TIFF or .npy. .npy arrays are float32 as before.
"""

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
from ssl_lab.data.decode_cache import DecodeCache, cache_path, load_or_build, mixed_depth_error
from ssl_lab.errors import ConfigError, DataError

try:  # reads every TIFF (multi-page, multi-channel, float); without it Pillow reads the single-band ones
    import tifffile
except ImportError:  # pragma: no cover - depends on the environment
    tifffile = None

log = logging.getLogger(__name__)


IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg"})  # decoded by Pillow as greyscale or RGB
TIFF_EXTS = frozenset({".tif", ".tiff"})  # arrays of any depth and channel count, read like .npy
ARRAY_EXTS = frozenset({".npy"})
FILE_EXTS = IMAGE_EXTS | TIFF_EXTS | ARRAY_EXTS
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})  # Pillow's single-band modes > 8 bits


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in FILE_EXTS)


def _rawmodes(im: Image.Image) -> list[str]:
    """How Pillow unpacks the file's pixels (e.g. 'RGB;16B' for 16-bit RGB, which it cuts to 8-bit 'RGB')."""
    return [str(t[3][0] if isinstance(t[3], tuple) else t[3]) for t in (im.tile or [])]


def load_file(path: str, in_chans: int, image_size: int | None) -> np.ndarray:
    """Decode one file to [C, H, W]: uint8 for 8-bit PNG/JPG/TIFF, float32 for images of more bits (their own
    values, not rescaled) and for .npy; resized when image_size is set (see the module docstring)."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext in TIFF_EXTS:
        return _from_array(p, _read_tiff(p), in_chans, image_size, "TIFF image", keep_uint8=True)
    if ext in IMAGE_EXTS:
        try:
            with Image.open(p) as im:
                if im.mode in HIGH_DEPTH_MODES:  # 16-bit greyscale PNG: every bit kept, as float32
                    a = np.asarray(im)
                else:
                    if any(";16" in m for m in _rawmodes(im)):
                        raise DataError(
                            f"{p}: is a 16-bit colour PNG, which Pillow reads only as 8 bits per channel; save it as "
                            "a 16-bit TIFF (e.g. tifffile.imwrite) or a .npy array to keep every bit, or as 8-bit."
                        )
                    im = im.convert("L" if in_chans == 1 else "RGB")
                    if image_size and im.size != (image_size, image_size):
                        im = im.resize((image_size, image_size), Image.BILINEAR)
                    a = np.array(im)  # a writable copy (torch refuses read-only buffers)
                    return np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{p}: cannot be read as an image ({e}); remove or replace the file.") from None
        if in_chans != 1:
            raise DataError(f"{p}: is a greyscale image of more than 8 bits (Pillow mode {im.mode}) but "
                            f"dataset.in_chans={in_chans} would read it as colour; set dataset.in_chans=1.")
        return _from_array(p, a, in_chans, image_size, "image")
    try:
        a = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{p}: cannot be read as a .npy array ({e}); remove or replace the file.") from None
    return _from_array(p, a, in_chans, image_size, "array")


def _read_tiff(p: Path) -> np.ndarray:
    """The TIFF's pixels as stored: tifffile reads every page (stacked as channels) and sample; without it, or for
    a compression it cannot decode, Pillow reads single-page greyscale (8/16/32-bit, float) and 8-bit RGB."""
    first: Exception | None = None
    if tifffile is not None:
        try:
            a = np.asarray(tifffile.imread(p))
            while a.ndim > 3 and a.shape[0] == 1:
                a = a[0]
            return a
        except Exception as e:  # noqa: BLE001 - tifffile raises many kinds for damaged or unsupported files
            first = e
    try:
        with Image.open(p) as im:
            modes = _rawmodes(im)
            frames = getattr(im, "n_frames", 1)
            if frames == 1 and (im.mode in HIGH_DEPTH_MODES or (im.mode in ("L", "RGB")
                                                               and not any(";16" in m for m in modes))):
                return np.array(im)
            what = f"{frames} pages" if frames > 1 else f"Pillow mode {im.mode} ({', '.join(modes) or '?'})"
            first = first or ValueError(f"{what}: Pillow cannot read it at full depth; pip install tifffile")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        first = first or e
    raise DataError(f"{p}: cannot be read as a TIFF image ({first}); remove or replace the file.")


def _from_array(p: Path, a: np.ndarray, in_chans: int, image_size: int | None, what: str,
                keep_uint8: bool = False) -> np.ndarray:
    """[H, W], [C, H, W] or [H, W, C] -> [C, H, W] with C == in_chans: uint8 when ``keep_uint8`` and the data is
    8-bit (resized by Pillow, as PNG/JPG are), else float32 (resized bilinearly by torch)."""
    if a.dtype.kind not in "iufb":
        raise DataError(f"{p}: {what} dtype {a.dtype} is not numeric; store images as float or integer arrays.")
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[0] != in_chans and a.shape[2] == in_chans:
        a = a.transpose(2, 0, 1)
    elif a.ndim != 3:
        raise DataError(f"{p}: {what} shape {a.shape} is not [H, W], [C, H, W] or [H, W, C].")
    if a.shape[0] != in_chans:
        raise DataError(
            f"{p}: {what} shape {a.shape} has no axis of dataset.in_chans={in_chans} channels; "
            "set dataset.in_chans to the file's channel count."
        )
    if keep_uint8 and a.dtype == np.uint8:
        if image_size and a.shape[1:] != (image_size, image_size):
            a = np.stack([np.array(Image.fromarray(np.ascontiguousarray(c)).resize((image_size, image_size),
                                                                                   Image.BILINEAR)) for c in a])
        return np.array(a, dtype=np.uint8, order="C")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes Inf, which the stats pass names
        t = torch.from_numpy(np.array(a, dtype=np.float32, order="C"))
    if image_size and t.shape[1:] != (image_size, image_size):
        t = F.interpolate(t[None], size=(image_size, image_size), mode="bilinear", align_corners=False)[0]
    return t.numpy()


class FolderDataset(Dataset):
    """Reads each file's row of the decode cache, else decodes the file in the worker (no cache, .npy arrays, or a
    file the cache could not decode, whose error then comes on reading it, as without a cache); every sample must
    come out with the shape and dtype (bit depth) of ``first``, the first file, found in setup."""

    def __init__(
        self, files: list[str], labels: np.ndarray | None, in_chans: int, image_size: int | None,
        first: tuple[str, tuple[int, ...], np.dtype], cache: DecodeCache | None = None,
        rows: np.ndarray | None = None,
    ) -> None:
        self.files, self.labels, self.in_chans, self.image_size = files, labels, in_chans, image_size
        self.first_file, self.shape, self.dtype = first[0], tuple(first[1]), np.dtype(first[2])
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
        if a.dtype != self.dtype:
            raise mixed_depth_error(self.first_file, self.dtype, self.files[i], a.dtype)
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

    PNG/JPG/TIFF files of 8 bits decode to uint8, deeper ones to float32 in their own units; a folder mixing the
    two is refused (see the module docstring). Float data must be finite: folders have no dataset.nan_policy, so a
    NaN/Inf pixel in the files the stats pass reads is refused with the file's name.

    Both modes split alike (see BaseDataModule): root/{class}/ is split train/val/test by the fractions, test
    first, stratified; a flat root/ has no test split (it cannot be used downstream); root/{train,val}/ (DeepLense)
    gives train -> train + val_fraction as val, val -> test; root/{train,val,test}/ is used as given. Labelled mode
    needs class sub-folders.
    """

    def __init__(
        self, name: str, root: str, in_chans: int, image_size: int | None = None, val_fraction: float = 0.2,
        batch_size: int = 64, num_workers: int = 2, seed: int = 0, stats_max_samples: int = 4096,
        labelled: bool = False, test_fraction: float = 0.2, label_fraction: float = 1.0, split_seed: int = 0,
        cache_dir: str = ".cache/ssl_lab", decode_cache: bool = True, bad_samples: str = "error",
        max_bad_samples: int = 100,
    ) -> None:
        super().__init__(
            name, in_chans, batch_size, num_workers, seed, stats_max_samples, labelled, test_fraction, label_fraction,
            split_seed, bad_samples=bad_samples, max_bad_samples=max_bad_samples,
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
            exts = ", ".join(sorted(FILE_EXTS))
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
        exts = {Path(f).suffix.lower() for f in files}
        if exts & ARRAY_EXTS and exts - ARRAY_EXTS:
            raise DataError(f"{root}: mixes .npy arrays and PNG/JPG/TIFF images; keep one kind of file per dataset.")
        if exts & IMAGE_EXTS and self.in_chans not in (1, 3):
            raise DataError(
                f"{root}: PNG/JPG images are read as 1 (greyscale) or 3 (RGB) channels but dataset.in_chans="
                f"{self.in_chans}; set dataset.in_chans=1 or 3, or store TIFF or .npy arrays."
            )
        self._check_splits(str(root), {"train": len(tr_files), "val": len(va_files), "test": len(te_files)},
                           len(files), {"train": "lower dataset.val_fraction or add files",
                                        "test": "add files to the test folder or lower dataset.test_fraction"})
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
        self.mean, self.std = self._stats(pool, root)

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
                return FolderDataset(f, y, self.in_chans, self.image_size, (first_file, first.shape, first.dtype))

            return plain, first
        rel = {f: Path(f).relative_to(root).as_posix() for f in files}
        ordered = sorted(rel, key=rel.__getitem__)
        params = {"in_chans": self.in_chans, "image_size": self.image_size, "decode": f"Pillow {PIL.__version__}"}
        exts = {Path(f).suffix.lower() for f in files}
        if exts & (TIFF_EXTS | {".png"}):
            # files that may hold more than 8 bits: their caches before full-depth decoding held them clipped to
            # uint8, so these keys differ from those (JPG, always 8-bit, keeps its caches)
            params["depth"] = "full"
        if exts & TIFF_EXTS:
            params["decode"] += f", tifffile {getattr(tifffile, '__version__', 'absent')}"
        cache = load_or_build(cache_path(self.cache_dir, root, ordered, params), ordered, decode, self.in_chans,
                              self.image_size, self.num_workers)
        row_of = {f: r for r, f in enumerate(ordered) if r not in cache.bad}
        first_cached = ordered[cache.first]

        def cached(f: list[str], y: np.ndarray | None) -> FolderDataset:
            rows = np.array([row_of.get(x, -1) for x in f], np.int64)  # -1: decoded when read
            return FolderDataset(f, y, self.in_chans, self.image_size, (first_cached, cache.shape[1:], cache.dtype),
                                 cache, rows)

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

    def _stats(self, ds: FolderDataset, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """Reads a seeded sample of train images (their decode-cache rows once the cache exists), which also
        surfaces unreadable files, mixed bit depths and NaN/Inf pixels before training. uint8 data: stats of x/255;
        float data (deeper images, arrays): of x in its own units."""
        n = len(ds)
        idx = np.sort(np.random.default_rng(self.seed + 1).choice(n, min(n, self.stats_max_samples), replace=False))
        stats = ChannelStats(self.in_chans)
        bad: list[tuple[str, int]] = []  # (file, non-finite pixels) of the sampled files that have some
        finite = 0
        for s in range(0, len(idx), 256):
            block = ds.read_many(idx[s : s + 256])
            if block.dtype.kind == "f":
                ok = np.isfinite(block)
                if not ok.all():
                    per_file = (~ok).reshape(len(block), -1).sum(axis=1)
                    bad += [(ds.files[idx[s + j]], int(per_file[j])) for j in np.flatnonzero(per_file)]
                    finite += int(np.count_nonzero(ok))
                    continue
                finite += block.size
            stats.update(block, channel_axis=1)
        if bad and not finite:
            raise DataError(
                f"no finite pixel in {root}: every pixel of the {len(idx)} files sampled (e.g. {bad[0][0]}) is "
                "NaN/Inf; check how the files were written (python -m ssl_lab.inspect <folder>) or set dataset.root."
            )
        if bad:
            file, count = bad[0]
            raise DataError(
                f"{file}: holds {count} non-finite (NaN/Inf) pixels ({len(bad)} of the {len(idx)} files sampled have "
                "some); image folders have no dataset.nan_policy: replace them in the files (e.g. numpy.nan_to_num) "
                "or store the data as HDF5 and set dataset.nan_policy."
            )
        return stats.result(1 / 255 if ds.dtype == np.uint8 else 1.0)

    def _summary_extra(self) -> dict[str, Any]:
        return {"root": str(self.root), "layout": self.layout, "image_size": self.image_size,
                "stats_samples": min(len(self.train_set), self.stats_max_samples), "decode_cache": self.cache_info}
