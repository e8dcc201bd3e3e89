"""HDF5 images (any channel count, NCHW or NHWC) with optional labels and regression targets.

Files can be far larger than memory (e.g. 30 GB of 8x125x125 float32 jets), so nothing here loads the image
dataset whole unless ``in_memory=True``: setup streams bounded, chunk-aligned blocks, and workers read one sample at
a time through their own lazily opened handle (h5py handles must not cross a fork or a pickle).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ssl_lab.data.base import (
    NAN_POLICIES, BaseDataModule, ChannelStats, check_classes, check_fraction, check_stratifiable, split_rows,
    worker_init,
)
from ssl_lab.data.block_sampler import BlockStream, block_length, stream_loader, window_bytes
from ssl_lab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FULL_SCAN_BLOCK_BYTES = 64 << 20  # drop / in-memory scans read everything: large blocks for throughput
SAMPLE_SCAN_BLOCK_BYTES = 4 << 20  # bounded scans pick random blocks: small ones spread the sample over the file
READ_MODES = ("auto", "sample", "block")
WINDOW_WARN_BYTES = 4 << 30
# attributes `python -m ssl_lab.prepare` writes on the image dataset
LAYOUT_ATTR, SCALE_ATTR, OFFSET_ATTR = "ssl_lab_layout", "ssl_lab_scale", "ssl_lab_offset"


class H5Dataset(Dataset):
    """Reads sample ``indices[i]`` as a dict; opens the file on first use in each process.

    ``scale``/``offset`` (per channel) undo a ``python -m ssl_lab.prepare --dtype uint8`` quantisation on read, so
    everything downstream sees float32 in the original units. ``read_rows``/``make_batch`` serve the block stream.
    """

    def __init__(
        self, path: str, key: str, indices: np.ndarray, layout: str, labels: np.ndarray | None,
        targets: np.ndarray | None, nan_policy: str, array: np.ndarray | None = None, cache_bytes: int = 1 << 20,
        scale: np.ndarray | None = None, offset: np.ndarray | None = None,
    ) -> None:
        self.path, self.key, self.indices, self.layout = path, key, indices, layout
        self.labels, self.targets, self.nan_policy, self.array = labels, targets, nan_policy, array
        self.cache_bytes = cache_bytes
        self.scale = None if scale is None else np.asarray(scale, np.float32)
        self.offset = None if offset is None else np.asarray(offset, np.float32)
        self._file: h5py.File | None = None
        self._ds: h5py.Dataset | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_ds": None, "_pid": None}

    def __len__(self) -> int:
        return len(self.indices)

    def _images(self) -> Any:
        if self.array is not None:
            return self.array
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r", rdcc_nbytes=self.cache_bytes)
            self._ds, self._pid = self._file[self.key], os.getpid()
        return self._ds

    def _clean(self, a: np.ndarray, rows: np.ndarray, batched: bool) -> np.ndarray:
        """Decode quantised data and apply nan_policy to ``a`` (file rows ``rows`` if batched, else one sample)."""
        # never modifies in-memory data in place (the caller may hold a view of it)
        if self.scale is not None:  # quantised uint8: x = code * scale + offset, per channel
            c_axis = {"NCHW": 0, "NHWC": 2, "NHW": 0}[self.layout] + int(batched)
            shape = [1] * a.ndim
            shape[c_axis] = -1
            return a.astype(np.float32) * self.scale.reshape(shape) + self.offset.reshape(shape)
        if a.dtype == np.uint8:
            return a
        if a.dtype != np.float32 or self.array is not None:
            a = a.astype(np.float32)  # a copy: in-place fixes below never touch in-memory data
        # a float64 sum of finite float32 values cannot overflow, so it is finite iff every pixel is
        if self.nan_policy != "drop" and not np.isfinite(a.sum(dtype=np.float64)):
            bad = ~np.isfinite(a)
            if self.nan_policy == "error":
                per_row = bad.reshape(len(rows), -1).sum(axis=1) if batched else np.array([bad.sum()])
                k = int(np.flatnonzero(per_row)[0])
                j = int(rows[k]) if batched else int(rows)
                raise DataError(
                    f"{self.path}: key '{self.key}' sample {j} has {int(per_row[k])} non-finite pixels; "
                    "set dataset.nan_policy=zero or dataset.nan_policy=drop."
                )
            a[bad] = 0.0
        return a

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """x may be a transposed view (NHWC files): the collate's stack makes it contiguous in the same copy."""
        j = int(self.indices[i])
        a = self._clean(self._images()[j], j, batched=False)
        x = torch.from_numpy(a)
        x = x[None] if self.layout == "NHW" else x.permute(2, 0, 1) if self.layout == "NHWC" else x
        out = {"x": x}
        if self.labels is not None:
            out["y"] = torch.tensor(self.labels[j], dtype=torch.int64)
        if self.targets is not None:
            out["targets"] = torch.from_numpy(self.targets[j])
        return out

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """File rows ``rows`` (sorted, inside one block) with ONE contiguous slice read, decoded and cleaned."""
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        a = self._images()[lo:hi]
        if len(rows) != hi - lo:
            a = a[rows - lo]
        return self._clean(a, rows, batched=True)

    def make_batch(self, x: np.ndarray, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The dict the default collate would build from samples ``rows`` (x: their cleaned file-layout rows)."""
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = t[:, None] if self.layout == "NHW" else t.permute(0, 3, 1, 2).contiguous() if self.layout == "NHWC" else t
        out = {"x": t}
        if self.labels is not None:
            out["y"] = torch.from_numpy(np.asarray(self.labels[rows], np.int64))
        if self.targets is not None:
            out["targets"] = torch.from_numpy(np.ascontiguousarray(self.targets[rows]))
        return out


SPLIT_NAMES = ("train", "val", "test")
SPLIT_FIELD = "{split}"  # replaced by the split name in label_key / target_keys when split_keys is set


def check_label_map(label_map: Mapping[Any, Any] | None) -> dict[int, int] | None:
    """dataset.label_map as {file label: class id}; the class ids must be exactly 0..K-1 (several file labels may
    share one id, merging those classes)."""
    if label_map is None:
        return None
    example = "e.g. dataset.label_map='{1: 0, 2: 1, 7: 2}'"
    if not isinstance(label_map, Mapping) or not label_map:
        raise ConfigError(f"dataset.label_map={label_map!r} must map file labels to class ids, {example}.")
    try:
        out = {int(k): int(v) for k, v in label_map.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"dataset.label_map={dict(label_map)!r}: labels and class ids must be integers, "
                          f"{example}.") from None
    ids = sorted(set(out.values()))
    if ids != list(range(len(ids))):
        raise ConfigError(f"dataset.label_map={out}: class ids must be 0..K-1 with none left out, got {ids}.")
    return out


def check_split_keys(split_keys: Mapping[str, str] | None, split_key: str | None) -> dict[str, str] | None:
    """A plain {split: image key} dict with a train key, or None; refused together with split_key."""
    if split_keys is None:
        return None
    if split_key is not None:
        raise ConfigError(
            f"dataset.split_key={split_key!r} and dataset.split_keys are both set; use one: split_key names a "
            "per-sample train/val/test tag column, split_keys one image key per split."
        )
    example = "e.g. dataset.split_keys={train:train_images,val:val_images,test:test_images}"
    if not isinstance(split_keys, Mapping):
        raise ConfigError(f"dataset.split_keys={split_keys!r} must map splits to image keys, {example}.")
    out = {str(k): v for k, v in split_keys.items()}
    unknown = sorted(set(out) - set(SPLIT_NAMES))
    if unknown or "train" not in out:
        what = f"has unknown splits {unknown}" if unknown else "has no train key"
        raise ConfigError(f"dataset.split_keys {what}; its keys are train (required), val and test, {example}.")
    bad = [k for k, v in out.items() if not isinstance(v, str) or not v]
    if bad or len(set(out.values())) < len(out):
        raise ConfigError(f"dataset.split_keys={out} must name a different image key (a string) for each split, "
                          f"{example}.")
    return {s: out[s] for s in SPLIT_NAMES if s in out}


def for_split(key: str, split: str) -> str:
    """``key`` with {split} replaced by the split name (train_labels from {split}_labels)."""
    return key.replace(SPLIT_FIELD, split)


@dataclass
class _Part:
    """One image key this mode reads and what setup learned about it."""

    key: str
    n: int
    layout: str
    dtype: np.dtype
    chunks: tuple[int, ...] | None
    row_bytes: int
    scale: np.ndarray | None
    offset: np.ndarray | None
    labels: np.ndarray | None = None
    label_names: list[str] = field(default_factory=list)
    targets: np.ndarray | None = None
    bad_targets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    row_shape: tuple[int, ...] = ()
    declared: str = ""  # the layout the file records or the config gives, compared across keys
    array: np.ndarray | None = None
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class H5DataModule(BaseDataModule):
    """Images, labels and targets from one HDF5 file; see the module docstring for why it streams.

    ``labelled_path`` names a second file holding the labelled samples (e.g. the CMS E2E unlabelled file for
    pretraining and a smaller labelled one for downstream). When it is set, label_key/target_keys/split_key/
    split_keys refer to that file: pretraining reads only images from ``path`` (no labels, so no test split) and
    labelled mode reads everything from ``labelled_path``. When it is null, both modes read ``path``.

    Splits (the same in both modes, see BaseDataModule): ``split_key`` names a per-sample tag column (train/val/test
    used as given; with only train/val tags the val rows are the test split and val is carved from train);
    ``split_keys`` maps train/val/test to separate image keys (the MedMNIST layout, ``X_train``/``X_test``), with
    ``{split}`` in label_key/target_keys standing for the split name; a missing val is carved from train, a missing
    test leaves the file for pretraining only. Otherwise test_fraction (stratified, when labels are read) and then
    val_fraction are drawn with split_seed. With split_keys, pretraining fits on the train key alone: the block
    reader streams one dataset, and the test key is never read for training.

    ``read`` picks how the training loader reads the file: ``block`` streams chunk-aligned blocks of
    ``block_samples`` consecutive rows (one slice read each; blocks shuffled, then samples within a window of
    ``window_blocks`` blocks; see ssl_lab.data.block_sampler), ``sample`` reads one sample per index of a global
    permutation. ``auto`` (the default) is ``block`` for pretraining from disk, where the file is large and read
    speed decides the step rate, and ``sample`` in labelled mode and with ``in_memory``: labelled sets are small,
    often stored sorted by class (a window of a few blocks would then hold one class per batch), and memory has no
    seek cost to amortise. Validation and test loaders always read per sample in file order.
    """

    def __init__(
        self, name: str, path: str, in_chans: int, image_key: str = "images", label_key: str | None = None,
        target_keys: Sequence[str] = (), layout: str = "NCHW", split_key: str | None = None,
        val_fraction: float = 0.2, nan_policy: str = "zero", in_memory: bool = False,
        labelled_path: str | None = None, batch_size: int = 64, num_workers: int = 2, seed: int = 0,
        stats_max_samples: int = 4096, labelled: bool = False, test_fraction: float = 0.2,
        label_fraction: float = 1.0, read: str = "auto", block_samples: int | None = None, window_blocks: int = 4,
        split_keys: Mapping[str, str] | None = None, split_seed: int = 0, label_map: Mapping[Any, int] | None = None,
        bad_samples: str = "error", max_bad_samples: int = 100,
    ) -> None:
        super().__init__(
            name, in_chans, batch_size, num_workers, seed, stats_max_samples, labelled, test_fraction, label_fraction,
            split_seed, bad_samples=bad_samples, max_bad_samples=max_bad_samples,
        )
        if nan_policy not in NAN_POLICIES:
            raise ConfigError(f"dataset.nan_policy={nan_policy!r} is not one of {', '.join(NAN_POLICIES)}.")
        if str(layout).upper() not in ("NCHW", "NHWC"):
            raise ConfigError(f"dataset.layout={layout!r} must be NCHW or NHWC.")
        self.path = path
        self.image_key, self.label_key, self.target_keys = image_key, label_key, list(target_keys)
        self.layout = str(layout).upper()
        self.split_key, self.val_fraction = split_key, check_fraction(val_fraction)
        self.split_keys = check_split_keys(split_keys, split_key)
        templated = [k for k in [label_key, *self.target_keys] if isinstance(k, str) and SPLIT_FIELD in k]
        if templated and self.split_keys is None:
            raise ConfigError(
                f"dataset key {templated[0]!r} contains {SPLIT_FIELD}, which only dataset.split_keys fills in; set "
                "dataset.split_keys (one image key per split) or name the key itself."
            )
        self.nan_policy, self.in_memory, self.labelled_path = nan_policy, in_memory, labelled_path
        self.label_map = check_label_map(label_map)
        if read not in READ_MODES:
            raise ConfigError(f"dataset.read={read!r} is not one of {', '.join(READ_MODES)}.")
        if block_samples is not None and (not isinstance(block_samples, int) or block_samples < 1):
            raise ConfigError(
                f"dataset.block_samples={block_samples!r} must be a positive integer (rounded up to whole chunks) "
                "or null for one chunk row / 16 MB."
            )
        if not isinstance(window_blocks, int) or window_blocks < 1:
            raise ConfigError(f"dataset.window_blocks={window_blocks!r} must be a positive integer (e.g. 4).")
        self.read, self.block_samples, self.window_blocks = read, block_samples, window_blocks
        self.block = 1
        self._scale: np.ndarray | None = None
        self._offset: np.ndarray | None = None
        self.facts: dict[str, Any] = {}
        self.train_indices = self.val_indices = self.test_indices = np.zeros(0, np.int64)
        self.image_keys: dict[str, str] = {}

    @property
    def read_mode(self) -> str:
        """The training read mode after resolving ``auto`` (see the class docstring for why)."""
        if self.read != "auto":
            return self.read
        return "sample" if self.labelled or self.in_memory else "block"

    @property
    def source(self) -> str:
        """The file this mode reads: labelled_path in labelled mode when set, else path."""
        return str(self.labelled_path if self.labelled and self.labelled_path is not None else self.path)

    @property
    def _reads_labels(self) -> bool:
        """Pretraining skips label/target/split keys when they describe the separate labelled file."""
        return self.labelled or self.labelled_path is None

    def read_keys(self) -> tuple[str, list[str]]:
        """(the training image key, every key this mode reads), for the startup inspection."""
        self._require_setup()
        keys = list(self.image_keys.values())
        if self._reads_labels:
            for split in self.image_keys:
                keys += [for_split(k, split) for k in [self.label_key, *self.target_keys] if k]
        return self.image_keys["train"], list(dict.fromkeys(keys))

    # ---- validation helpers -------------------------------------------------------------------------------
    def _get(self, f: h5py.File, key: str, option: str) -> h5py.Dataset:
        obj = f.get(key)
        if isinstance(obj, h5py.Dataset):
            return obj
        names: list[str] = []
        f.visititems(lambda k, v: names.append(k) if isinstance(v, h5py.Dataset) else None)
        listing = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "") or "(none)"
        hint = ""
        if option in ("dataset.label_key", "dataset.target_keys") and not self.labelled and self.labelled_path is None:
            hint = (
                " If this file is unlabelled, set dataset.label_key=null and dataset.target_keys=[], or set "
                "dataset.labelled_path to the labelled file so that pretraining reads only images from dataset.path."
            )
        raise DataError(
            f"{self.source}: key '{key}' not found; available keys: {listing}. Set {option} to one of them.{hint}"
        )

    def _check_images(self, ds: h5py.Dataset, key: str) -> tuple[str, tuple[int, int]]:
        """Return the read layout ("NCHW", "NHWC" or "NHW") and (H, W), or explain what does not match."""
        where, shape, c_want = f"{self.source}: key '{key}'", tuple(ds.shape), self.in_chans
        if ds.dtype.kind not in "uif":
            raise DataError(f"{where} has dtype {ds.dtype}; store images as uint8 or float numbers.")
        if ds.ndim == 3:
            if c_want != 1:
                raise DataError(
                    f"{where} has 3-D shape {shape}, read as (N, H, W) with one channel, but dataset.in_chans="
                    f"{c_want}; set dataset.in_chans=1, or store the images 4-D as (N, C, H, W)."
                )
            layout, hw = "NHW", shape[1:]
        elif ds.ndim == 4:
            c_axis, other_axis, other = (1, 3, "NHWC") if self.layout == "NCHW" else (3, 1, "NCHW")
            if shape[c_axis] != c_want:
                hint = (
                    f"axis {other_axis} has {c_want}, so the file looks {other}: set dataset.layout={other}."
                    if shape[other_axis] == c_want
                    else f"set dataset.in_chans={shape[c_axis]} if the file is right."
                )
                raise DataError(
                    f"{where} has {shape[c_axis]} channels (shape {shape}, layout {self.layout}) but "
                    f"dataset.in_chans={c_want}; {hint}"
                )
            layout, hw = self.layout, (shape[2:] if self.layout == "NCHW" else shape[1:3])
        else:
            raise DataError(
                f"{where} has {ds.ndim}-D shape {shape}; expected 4-D (N, C, H, W) with dataset.layout=NCHW, "
                "(N, H, W, C) with dataset.layout=NHWC, or 3-D (N, H, W) with dataset.in_chans=1."
            )
        if shape[0] == 0:
            raise DataError(f"{where} holds 0 images (shape {shape}); point dataset.path at a file with data.")
        return layout, (int(hw[0]), int(hw[1]))

    def _column(self, f: h5py.File, key: str, n: int, option: str, image_key: str) -> np.ndarray:
        ds = self._get(f, key, option)
        if tuple(ds.shape) not in ((n,), (n, 1)):
            hint = ""
            if self.split_keys is not None and option != "dataset.split_key":
                hint = (f" With dataset.split_keys each split needs its own key: write {SPLIT_FIELD} where the "
                        f"split name goes, e.g. {option}='{SPLIT_FIELD}_labels' for train_labels, val_labels, ...")
            raise DataError(
                f"{self.source}: key '{key}' has shape {tuple(ds.shape)} but '{image_key}' has {n} images; "
                f"{option} must name an (N,) or (N, 1) dataset with one value per image.{hint}"
            )
        return ds[()].reshape(n)

    def _labels(self, f: h5py.File, key: str, n: int, image_key: str) -> tuple[np.ndarray, list[str]]:
        """Class ids of ``key`` and the class names its attrs (or the file's) list, [] when none."""
        raw = self._column(f, key, n, "dataset.label_key", image_key)
        where = f"{self.source}: key '{key}'"
        if raw.dtype.kind not in "iufb":
            raise DataError(f"{where} has dtype {raw.dtype}; labels must be integer class ids 0..K-1.")
        if raw.dtype.kind == "f" and not (np.isfinite(raw).all() and (raw == np.round(raw)).all()):
            raise DataError(f"{where} holds non-integer or non-finite values; labels must be class ids 0..K-1.")
        labels = raw.astype(np.int64)
        names = f[key].attrs.get("class_names", f.attrs.get("class_names"))
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names] if names is not None else []
        if self.label_map is not None:
            return self._mapped(labels, names, where)
        if labels.min() < 0:
            raise DataError(f"{where} has negative label {labels.min()}; labels must be class ids 0..K-1 (or set "
                            "dataset.label_map={file label: class id}).")
        if names and len(names) <= int(labels.max()):
            raise DataError(f"{where} has label {labels.max()} but attrs class_names lists only {len(names)} classes.")
        return labels, names

    def _tags(self, f: h5py.File, n: int, split_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boolean masks (train, val, test) from the split_key column: 0/1/2 or 'train'/'val'/'test'."""
        tags = self._column(f, split_key, n, "dataset.split_key", self.image_key)
        if tags.dtype.kind in "SUO":
            tags = np.array([t.decode() if isinstance(t, bytes) else str(t) for t in tags]).astype(str)
            tags = np.char.lower(np.char.strip(tags))
            is_train, is_val, is_test = tags == "train", np.isin(tags, ["val", "valid", "validation"]), tags == "test"
        else:
            is_train, is_val, is_test = tags == 0, tags == 1, tags == 2
        if not (is_train | is_val | is_test).all():
            bad = np.unique(tags[~(is_train | is_val | is_test)])[:5].tolist()
            raise DataError(
                f"{self.source}: key '{split_key}' has split tags {bad}; use 0/1/2 or 'train'/'val'/'test' per "
                "image, or unset dataset.split_key to split by dataset.val_fraction (and dataset.test_fraction)."
            )
        return is_train, is_val, is_test

    def _open_part(
        self, f: h5py.File, split: str, key: str, first: _Part | None, label_key: str | None, target_keys: list[str],
        config_layout: str,
    ) -> _Part:
        """Check one image key (and its label / target columns) and describe it; ``first`` is the train key, which
        every other key must match in shape, dtype and layout."""
        keyed = self.split_keys is not None and self._reads_labels
        option = f"dataset.split_keys.{split}" if keyed else "dataset.image_key"
        ds = self._get(f, key, option)
        declared, scale, offset = self._prepared_attrs(ds)
        layout = declared or config_layout
        if first is not None:
            mine = (tuple(ds.shape[1:]), str(ds.dtype), layout)
            theirs = (first.row_shape, str(first.dtype), first.declared)
            if mine != theirs:
                raise DataError(
                    f"{self.source}: key '{key}' holds images of shape {mine[0]} ({mine[1]}, layout {mine[2]}) but "
                    f"'{first.key}' holds {theirs[0]} ({theirs[1]}, layout {theirs[2]}); every key of "
                    "dataset.split_keys must hold images of one shape, channel count, dtype and layout."
                )
        elif declared is not None:
            if declared != self.layout:
                log.info("%s: the file records layout %s; using it instead of %s", self.source, declared, self.layout)
            self.layout = declared
        read_layout, hw = self._check_images(ds, key)
        if first is None:
            self.image_shape = hw
        n = int(ds.shape[0])
        part = _Part(key, n, read_layout, ds.dtype, ds.chunks, math.prod(ds.shape[1:]) * ds.dtype.itemsize,
                     scale, offset, row_shape=tuple(ds.shape[1:]), declared=layout)
        if label_key is not None:
            part.labels, part.label_names = self._labels(f, for_split(label_key, split), n, key)
        if target_keys:
            names = [for_split(k, split) for k in target_keys]
            cols = [self._column(f, k, n, "dataset.target_keys", key) for k in names]
            part.targets = np.stack(cols, axis=1).astype(np.float32)
            part.bad_targets = np.flatnonzero(~np.isfinite(part.targets).all(axis=1))
            if len(part.bad_targets) and self.nan_policy != "drop":
                bad = names[int(np.flatnonzero(~np.isfinite(part.targets[part.bad_targets[0]]))[0])]
                raise DataError(
                    f"{self.source}: key '{bad}' has non-finite targets in {len(part.bad_targets)} samples (first at "
                    f"index {part.bad_targets[0]}); set dataset.nan_policy=drop to remove those samples or fix the "
                    "file."
                )
        if self.in_memory:
            part.array = ds[()]
        return part

    def _mapped(self, labels: np.ndarray, names: list[str], where: str) -> tuple[np.ndarray, list[str]]:
        """The file's labels through dataset.label_map, and one name per class id (merged labels joined by +)."""
        known = np.array(sorted(self.label_map), np.int64)
        unmapped = np.setdiff1d(np.unique(labels), known)
        if len(unmapped):
            raise DataError(f"{where} has label(s) {unmapped[:5].tolist()} that dataset.label_map does not map; "
                            "add them to the map (every file label needs a class id).")
        ids = np.array([self.label_map[int(v)] for v in known], np.int64)
        named = lambda v: names[v] if 0 <= v < len(names) else str(v)  # noqa: E731
        classes = ["+".join(named(int(v)) for v in known[ids == c]) for c in range(int(ids.max()) + 1)]
        return ids[np.searchsorted(known, labels)], classes

    def _class_names(self, parts: dict[str, _Part]) -> list[str] | None:
        """One class list for every key: the train key's attrs names, else 0..K-1 over all keys' labels. Refuses
        class ids that never occur (a head would get outputs no sample ever trains)."""
        train = parts["train"]
        if train.labels is None:
            return None
        k = max(int(p.labels.max()) + 1 for p in parts.values())
        present = np.unique(np.concatenate([p.labels for p in parts.values()]))
        n_classes = max(k, len(train.label_names))
        # pretraining builds no head; a single class is refused with its own message downstream
        if self.labelled and 1 < len(present) < n_classes:
            absent = np.setdiff1d(np.arange(n_classes), present)
            listed = f"class_names lists {n_classes} classes" if train.label_names else f"labels reach {k - 1}"
            suggest = ", ".join(f"{int(v)}: {i}" for i, v in enumerate(present[:6]))
            suggest += ", ..." if len(present) > 6 else ""
            raise DataError(
                f"{self.source}: {listed} but class id(s) {absent[:8].tolist()} never occur, so a head would have "
                f"outputs that no sample trains. Relabel the file as 0..K-1, or set dataset.label_map="
                f"{{{suggest}}} (file label: class id)."
            )
        if train.label_names:
            if len(train.label_names) < k:
                raise DataError(f"{self.source}: a label key has label {k - 1} but the class_names attrs of "
                                f"'{for_split(self.label_key, 'train')}' list only {len(train.label_names)} classes.")
            return train.label_names
        return [str(i) for i in range(k)]

    def _split(self, f: h5py.File, parts: dict[str, _Part], split_key: str | None
               ) -> dict[str, tuple[str | None, np.ndarray]]:
        """split -> (part, rows) for train, val and test: the one split both modes share (part None: nothing held
        out). split_key tags are used as given (with only train/val tags the val rows are the test split and val is
        carved from train); so are split_keys' keys (a missing val is carved from the train key)."""
        train = parts["train"]
        args = (train.labels, self.test_fraction, self.val_fraction, self.split_seed)
        rows, none = np.arange(train.n, dtype=np.int64), np.zeros(0, np.int64)
        if len(parts) > 1 or (self.split_keys is not None and self._reads_labels):
            if "val" in parts:
                tr, val = rows, ("val", np.arange(parts["val"].n, dtype=np.int64))
            else:
                tr, va, _ = split_rows(rows, *args, test=none)
                val = ("train", va)
            test = ("test", np.arange(parts["test"].n, dtype=np.int64)) if "test" in parts else (None, none)
            return {"train": ("train", tr), "val": val, "test": test}
        if split_key is None:
            tr, va, te = split_rows(rows, *args)
        else:
            tagged_train, tagged_val, tagged_test = (np.flatnonzero(m).astype(np.int64)
                                                     for m in self._tags(f, train.n, split_key))
            if len(tagged_test):
                tr, va, te = tagged_train, tagged_val, tagged_test
            else:
                tr, va, te = split_rows(tagged_train, *args, test=tagged_val)
        return {"train": ("train", tr), "val": ("train", va), "test": ("train", te)}

    def _prepared_attrs(self, ds: h5py.Dataset) -> tuple[str | None, np.ndarray | None, np.ndarray | None]:
        """(layout, scale, offset) a file written by ssl_lab.prepare records on its image key (None where not)."""
        declared = ds.attrs.get(LAYOUT_ATTR)
        if declared is not None:
            declared = declared.decode() if isinstance(declared, bytes) else str(declared)
        if SCALE_ATTR not in ds.attrs:
            return declared, None, None
        scale = np.asarray(ds.attrs[SCALE_ATTR], np.float32).reshape(-1)
        return declared, scale, np.asarray(ds.attrs[OFFSET_ATTR], np.float32).reshape(-1)

    # ---- streamed scan ------------------------------------------------------------------------------------
    @staticmethod
    def _block_rows(ds: Any, target_bytes: int, max_rows: int) -> int:
        """Rows per read: about target_bytes, at most max_rows, a whole number of HDF5 chunks."""
        row_bytes = max(1, math.prod(ds.shape[1:]) * ds.dtype.itemsize)
        chunk = ds.chunks[0] if getattr(ds, "chunks", None) else 1
        rows = min(max(1, target_bytes // row_bytes), max_rows)
        return max(chunk, (rows // chunk) * chunk)

    def _scan(
        self, ds: Any, n: int, train_idx: np.ndarray, layout: str, scale: np.ndarray | None = None,
        offset: np.ndarray | None = None,
    ) -> tuple[ChannelStats, np.ndarray, int, int, np.ndarray, int]:
        """One pass over chosen blocks: per-channel stats on up to stats_max_samples train rows, non-finite counts.

        Every block is read when samples must be dropped (all bad ones must be known) or the data is in memory;
        otherwise random blocks are read until they hold enough train rows, so setup time stays bounded.
        Returns (stats, indices of samples with non-finite pixels, non-finite pixel count, samples scanned,
        non-finite pixels per channel, samples with no finite pixel at all).
        """
        rng = np.random.default_rng(self.seed + 1)
        full = self.nan_policy == "drop" or isinstance(ds, np.ndarray)
        if full:
            rows = self._block_rows(ds, FULL_SCAN_BLOCK_BYTES, n)
        else:  # at least ~8 random blocks, so the sample is spread over a file that may be sorted by class
            rows = self._block_rows(ds, SAMPLE_SCAN_BLOCK_BYTES, -(-self.stats_max_samples // 8))
        starts = np.arange(0, n, rows)
        is_train = np.zeros(n, bool)
        is_train[train_idx] = True
        if full:
            chosen = starts
            pool = train_idx
        else:
            covered, picked = 0, []
            for s in starts[rng.permutation(len(starts))]:
                picked.append(s)
                covered += int(is_train[s : s + rows].sum())
                if covered >= self.stats_max_samples:
                    break
            chosen = np.sort(np.array(picked, dtype=np.int64))
            pool = np.concatenate([np.flatnonzero(is_train[s : s + rows]) + s for s in chosen])
        in_stats = np.zeros(n, bool)
        in_stats[rng.choice(pool, min(len(pool), self.stats_max_samples), replace=False)] = True
        c_axis = {"NCHW": 1, "NHWC": 3, "NHW": 1}[layout]
        stats = ChannelStats(self.in_chans)
        bad_samples: list[np.ndarray] = []
        bad_pixels = scanned = blank = 0
        channel_bad = np.zeros(self.in_chans, np.int64)
        for s in chosen:
            blk = ds[s : s + rows]
            if layout == "NHW":
                blk = blk[:, None]
            if scale is not None:  # quantised by ssl_lab.prepare: stats in the original units
                shape = (1, -1, 1, 1) if c_axis == 1 else (1, 1, 1, -1)
                blk = blk.astype(np.float32) * scale.reshape(shape) + offset.reshape(shape)
            sel = in_stats[s : s + len(blk)]
            scanned += len(blk)
            if blk.dtype.kind == "f" and blk.dtype != np.float32:  # read as float32: beyond its range is Inf
                with np.errstate(over="ignore"):
                    blk = blk.astype(np.float32)
            if blk.dtype.kind == "f":
                finite = np.isfinite(blk)
                if not finite.all():
                    row_bad = ~finite.reshape(len(blk), -1).all(axis=1)
                    bad_samples.append(np.flatnonzero(row_bad) + s)
                    bad_pixels += int(finite.size - np.count_nonzero(finite))
                    blank += int((~finite.reshape(len(blk), -1).any(axis=1)).sum())
                    channel_bad += (~finite).sum(axis=tuple(a for a in range(blk.ndim) if a != c_axis))
                    blk = np.where(finite, blk, 0).astype(blk.dtype)
                    if self.nan_policy == "drop":
                        sel = sel & ~row_bad
            if sel.any():
                stats.update(blk[sel], channel_axis=c_axis)
        bad = np.concatenate(bad_samples) if bad_samples else np.zeros(0, np.int64)
        return stats, bad.astype(np.int64), bad_pixels, scanned, channel_bad, blank

    # ---- setup --------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        path = Path(self.source).expanduser()
        option = "dataset.labelled_path" if self.source != str(self.path) else "dataset.path"
        if self.labelled and self.label_key is None:
            raise DataError(
                f"dataset {self.name!r}: task needs labels: set dataset.label_key=<key> (and "
                "dataset.labelled_path=<file> if the labels are in another file)."
            )
        reads_labels = self._reads_labels
        split_keys = self.split_keys if reads_labels else None  # otherwise they describe the labelled file
        if self.labelled and split_keys is not None and "test" not in split_keys:
            raise ConfigError(
                f"dataset.split_keys={split_keys} has no test key, so a downstream task has no test split to report "
                "on; add test: <image key> to dataset.split_keys, or use dataset.split_key (a tag column) or "
                "dataset.test_fraction (split_keys=null) instead."
            )
        if not path.is_file():
            raise DataError(f"{path}: file not found; check {option} (relative paths start at the run directory).")
        if self.labelled_path is not None and not Path(str(self.labelled_path)).expanduser().is_file():
            raise DataError(f"{self.labelled_path}: labelled file not found; check dataset.labelled_path.")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise DataError(f"{path}: cannot be opened as HDF5 ({e}); check {option} points to an HDF5 file.")
        label_key = self.label_key if reads_labels else None
        target_keys = self.target_keys if reads_labels else []
        split_key = self.split_key if reads_labels else None
        self.image_keys = dict(split_keys) if split_keys else {"train": self.image_key}
        if split_keys and self.image_key not in split_keys.values():
            log.info("%s: dataset.image_key=%s is not read: dataset.split_keys names the image keys", path,
                     self.image_key)
        config_layout = self.layout
        with f:
            parts: dict[str, _Part] = {}
            for split, key in self.image_keys.items():
                parts[split] = self._open_part(f, split, key, parts.get("train"), label_key, target_keys,
                                               config_layout)
            train = parts["train"]
            names = self._class_names(parts)
            if self.labelled:
                check_classes(train.labels, f"{path}: key '{for_split(label_key, 'train')}'",
                              "Check dataset.label_key, or add samples of the other classes to the file.")
                if split_key is None and split_keys is None:  # the test split is drawn: one per class at least
                    check_stratifiable(train.labels, names)
            where = self._split(f, parts, split_key)
            same_key_val = where["val"][1] if where["val"][0] == "train" else np.zeros(0, np.int64)
            fit = self._fit_rows(where["train"][1], same_key_val, train.labels)
            total = sum(p.n for p in parts.values())
            self._check_splits(str(path), {"train": len(fit), "test": len(where["test"][1])}, total, {
                "train": "check dataset.split_key, dataset.val_fraction or dataset.test_fraction",
                "test": "tag samples 'test' (2) in dataset.split_key (or 'val' (1): without test tags those are the "
                        "test split), or set dataset.split_key=null to hold out dataset.test_fraction"
                        if split_key else "check dataset.split_keys or dataset.test_fraction"})
            # image stats: every training image of the train key (label_fraction limits labels, not images); rows
            # that drop will remove never enter them. The other keys are scanned for NaN/Inf only.
            stat_rows = where["train"][1] if self.labelled else fit
            scans = {}
            for split, part in parts.items():
                pool = np.setdiff1d(stat_rows if split == "train" else np.arange(part.n), part.bad_targets)
                scans[split] = self._scan(part.array if part.array is not None else f[part.key], part.n, pool,
                                          part.layout, part.scale, part.offset)
        totals = {"bad": 0, "pixels": 0, "scanned": 0, "dropped": 0}
        for split, part in parts.items():
            _, bad, bad_pixels, scanned, channel_bad, blank = scans[split]
            self._refuse_no_finite(path, split, part, bad_pixels, scanned, channel_bad)
            if len(bad) and self.nan_policy == "error":
                raise DataError(
                    f"{path}: key '{part.key}' has non-finite (NaN/Inf) pixels in {len(bad)} of {scanned} samples "
                    f"scanned (first at index {bad[0]}); set dataset.nan_policy=zero to replace them by 0 or "
                    "dataset.nan_policy=drop to remove those samples."
                )
            if self.nan_policy == "drop":
                part.dropped = np.union1d(bad, part.bad_targets).astype(np.int64)
                if len(part.dropped):
                    log.warning("%s: key '%s': dropped %d samples with non-finite pixels or targets", path, part.key,
                                len(part.dropped))
            elif len(bad):
                log.warning(
                    "%s: key '%s': replaced %d non-finite pixels in %d of %d scanned samples by 0 (unscanned samples "
                    "are zeroed at read time too)%s", path, part.key, bad_pixels, len(bad), scanned,
                    f"; {blank} of them have no finite pixel and become blank images" if blank else "",
                )
            for k, v in zip(totals, (len(bad), bad_pixels, scanned, len(part.dropped))):
                totals[k] += v
        kept = lambda name, rows: rows if name is None else np.setdiff1d(rows, parts[name].dropped)  # noqa: E731
        where = {s: (name, kept(name, rows)) for s, (name, rows) in where.items()}
        fit = kept("train", fit)
        fix = ("fix or remove the samples with NaN/Inf in the file, or set dataset.nan_policy=zero to keep them with "
               "those pixels set to 0")
        self._check_splits(str(path), {"train": len(fit), "test": len(where["test"][1])}, total,
                           {"train": fix, "test": fix}, dropped=totals["dropped"])
        stats, self._scale, self._offset = scans["train"][0], train.scale, train.offset
        self.mean, self.std = stats.result(1 / 255 if train.dtype == np.uint8 and train.scale is None else 1.0)
        self.num_classes = len(names) if names is not None else None
        self.class_names = names
        self.target_names = [for_split(k, "").strip("_-./") or k for k in target_keys]
        self.train_indices, self.val_indices, self.test_indices = fit, where["val"][1], where["test"][1]
        self._set_target_stats(None if train.targets is None else train.targets[fit])

        def make(name: str, rows: np.ndarray) -> H5Dataset:
            part = parts[name]
            cache = int(min(512 << 20, max(1 << 20, 2 * (part.chunks and math.prod(part.chunks) * part.dtype.itemsize
                                                          or 0))))
            return H5Dataset(str(path), part.key, rows, part.layout, part.labels, part.targets, self.nan_policy,
                             part.array, cache, part.scale, part.offset)

        self.train_set, self.val_set = make("train", fit), make(*where["val"])
        self.test_set = make(*where["test"]) if self.labelled else None
        group = lambda name, rows: {} if name is None else {parts[name].key: rows}  # noqa: E731
        self._record_splits(**{s: group(*where[s]) for s in SPLIT_NAMES}, fit={train.key: fit})
        resolved = path.resolve()
        self._source = {"kind": "hdf5", "path": str(resolved), "bytes": resolved.stat().st_size,
                        "image_keys": sorted(self.image_keys.values())}
        self._settings = {"label_key": label_key, "target_keys": list(target_keys), "split_key": split_key,
                          "split_keys": split_keys}
        self.block = block_length(train.chunks[0] if train.chunks else None, train.row_bytes, self.block_samples)
        self.facts = {
            "path": str(path), "image_key": train.key, "layout": self.layout, "dtype": str(train.dtype),
            "n_images": sum(p.n for p in parts.values()),
            "split": f"split_key={split_key}" if split_key else "split_keys" if split_keys else "seeded",
            "nan_policy": self.nan_policy, "nan_scanned_samples": totals["scanned"],
            "nan_samples_found": totals["bad"],
            "nan_pixels_replaced": totals["pixels"] if self.nan_policy == "zero" else 0, "dropped": totals["dropped"],
            "stats_samples": stats.samples, "in_memory": self.in_memory, "labelled_path": self.labelled_path,
            "quantised": train.scale is not None, "chunks": list(train.chunks) if train.chunks else None,
            "read": self.read_mode, "block_samples": self.block, "window_blocks": self.window_blocks,
        }
        if split_keys:
            self.facts["split_keys"] = dict(split_keys)
        if self.read_mode == "block":
            # decoded float32 rows; +1 block: the carry and the batch being cut
            held = window_bytes(self.block, self.in_chans * math.prod(self.image_shape) * 4, self.window_blocks + 1,
                                self.num_workers)
            self.facts["window_bytes"] = held
            if held > WINDOW_WARN_BYTES:
                log.warning(
                    "%s: block reading holds about %.1f GB in read windows (%d workers x %d blocks of %d samples); "
                    "lower dataset.window_blocks or dataset.num_workers, or rewrite the file with smaller chunks "
                    "(python -m ssl_lab.prepare --chunk-samples 32)", path, held / 2**30, max(1, self.num_workers),
                    self.window_blocks, self.block,
                )

    def _refuse_no_finite(self, path: Path, split: str, part: _Part, bad_pixels: int, scanned: int,
                          channel_bad: np.ndarray) -> None:
        """Whatever nan_policy says, a key whose scanned pixels are all NaN/Inf is refused: zero would train on
        blank images, drop on nothing. A channel with no finite pixel is named (zero makes it a constant 0)."""
        pixels = scanned * math.prod(part.row_shape)
        if scanned and bad_pixels == pixels:
            option = f"dataset.split_keys.{split}" if self.split_keys is not None and self._reads_labels \
                else "dataset.image_key"
            then = {"zero": "dataset.nan_policy=zero would train on blank (all-zero) images",
                    "drop": "dataset.nan_policy=drop would drop every sample",
                    "error": "there is nothing to train on"}[self.nan_policy]
            of = f" of {part.n}" if scanned < part.n else ""
            raise DataError(
                f"no finite pixel in {path}/{part.key}: all {pixels} pixels of the {scanned}{of} samples scanned "
                f"are NaN/Inf, so {then}; check how the file was written (python -m ssl_lab.inspect {path}) or set "
                f"{option} to the key that holds the images."
            )
        dead = np.flatnonzero(channel_bad * self.in_chans == pixels) if scanned else []
        if len(dead) and self.nan_policy == "zero":
            log.warning(
                "%s: key '%s': channel%s %s %s no finite pixel in the %d samples scanned; dataset.nan_policy=zero "
                "makes %s a constant 0 channel (check the file, or leave the channel out of it)", path, part.key,
                "s" if len(dead) > 1 else "", ", ".join(map(str, dead)), "have" if len(dead) > 1 else "has", scanned,
                "them" if len(dead) > 1 else "it",
            )

    def _split_source(self) -> dict[str, Any]:
        return dict(self._source)

    def _split_settings(self) -> dict[str, Any]:
        return dict(self._settings)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        """Block mode replaces the training loader only (see the class docstring)."""
        if not (train and self.read_mode == "block"):
            return super()._loader(dataset, train)
        if self.bad_samples == "skip":
            raise ConfigError("dataset.bad_samples=skip drops single samples, but dataset.read=block reads whole "
                              "blocks; set dataset.read=sample to skip unreadable samples.")
        rank, world = self._rank_world()
        drop_last = self._drop_last(len(dataset) // world, train=True)
        stream = BlockStream(
            dataset, self.block, self.window_blocks, self.batch_size, drop_last, self.seed, rank, world
        )
        if len(stream) == 0:
            raise DataError(
                f"dataset {self.name!r}: the train split has {len(dataset)} samples, {len(dataset) // world} per "
                f"rank on {world} ranks, fewer than batch_size={self.batch_size}; lower dataset.batch_size."
            )
        epoch = self._start_epoch()
        stream.set_epoch(epoch)
        done = self._resume_batches()
        if 0 < done < len(stream):
            stream.skip(epoch, done)
            log.info("resuming epoch %d after its first %d batches", epoch, done)
        return stream_loader(stream, self.num_workers, pin_memory=torch.cuda.is_available(), worker_init_fn=worker_init)

    def _summary_extra(self) -> dict[str, Any]:
        return dict(self.facts)
