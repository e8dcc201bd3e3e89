"""Image folders decoded once into one memory-mapped array, so PNG/JPG/TIFF files are not decoded every epoch.

``<cache_dir>/<root name>-<key>.npy`` holds [N, C, H, W], one row per file in the given (sorted) order, in the dtype
the first decodable file decodes to: uint8 for 8-bit images, float32 for deeper ones (16-bit PNG, TIFF), so no bit
is lost. A file of the other dtype stops the build with one line (a folder mixing bit depths is refused). The
``.json`` sidecar records the dtype and names the rows whose file could not be decoded: those are decoded again,
and fail, when read, exactly as without a cache. The key hashes every file's path relative to the root, its size
and mtime (ns), and the decode parameters, so a changed, added or removed file, or another size or channel count,
names another cache; an old cache is never overwritten or deleted (remove the cache dir to reclaim its space). One
process builds while any other waits on a lock beside the file, and the file appears by an atomic rename, so no one
reads half of one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader, Dataset

from ssl_lab.artifacts import atomic_path, write_json
from ssl_lab.errors import DataError

log = logging.getLogger(__name__)

CACHE_FORMAT = "ssl_lab.decode_cache"
CACHE_VERSION = 1
DTYPES = ("uint8", "float32")  # 8-bit images; deeper ones, in their own units
PROGRESS_SECONDS = 10.0  # a build that takes longer than this logs its progress this often
PARALLEL_FROM = 256  # files; fewer decode faster in the process than worker start-up takes

Decode = Callable[[str], np.ndarray]


class DecodeCache:
    """The cache file, mapped on first use in a process: a memmap pickled into a spawned DataLoader worker would be
    copied whole, so only the path travels (a forked worker shares the parent's read-only mapping)."""

    def __init__(self, path: Path, shape: tuple[int, ...], bad: Mapping[int, str], built: bool,
                 array: np.ndarray | None = None, dtype: str = "uint8") -> None:
        self.path, self.shape, self.built = str(path), tuple(int(s) for s in shape), built
        self.dtype = np.dtype(dtype)
        self.bad = dict(bad)  # row -> why its file could not be decoded
        self._array = array

    @property
    def first(self) -> int:
        """The row of the first file that decoded: the one whose shape and dtype the cache holds."""
        return next(r for r in range(self.shape[0]) if r not in self.bad)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return self._array


def depth_name(dtype: np.dtype) -> str:
    return "8-bit (uint8)" if np.dtype(dtype) == np.uint8 else f"more than 8 bits ({np.dtype(dtype)})"


def mixed_depth_error(first: str, first_dtype: np.dtype, other: str, other_dtype: np.dtype) -> DataError:
    """One folder, two bit depths: the values of an 8-bit and a 16-bit image are on different scales."""
    return DataError(
        f"{other}: decodes as {depth_name(other_dtype)} but {first} as {depth_name(first_dtype)}: the folder mixes "
        "bit depths, whose values are on different scales (0..255 for 8 bits, 0..65535 for 16); convert every file "
        "to one bit depth (e.g. all 16-bit PNG or TIFF, or all 8-bit)."
    )


def cache_path(cache_dir: Path, root: Path, files: Sequence[str], params: Mapping[str, Any]) -> Path:
    """A pure function of the folder's state and the decode parameters, so every process and run agrees on it."""
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **params}, sort_keys=True).encode())
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise DataError(f"{f}: cannot be read ({e.strerror}); check the folder under dataset.root.") from None
        h.update(f"{Path(os.path.relpath(f, root)).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.name)[:40] or "folder"
    return cache_dir / f"{name}-{h.hexdigest()[:16]}.npy"


def load_or_build(
    path: Path, files: Sequence[str], decode: Decode, in_chans: int, image_size: int | None, workers: int,
) -> DecodeCache:
    """The complete cache at ``path`` for ``files``, built here (under the lock) when no usable one exists yet."""
    cache, why = _open(path, len(files), in_chans, image_size)
    if cache is not None:
        log.info("decode cache: reading %s", path)
        return cache
    _check_writable(path.parent)
    with _build_lock(path):
        cache, why = _open(path, len(files), in_chans, image_size)  # another process may have built it meanwhile
        if cache is not None:
            return cache
        if why:
            log.warning("decode cache %s is unusable (%s); rebuilding it", path, why)
        first, shape, dtype = _first(files, decode)
        return _build(path, files, decode, shape, dtype, first, workers)


def _open(path: Path, n: int, in_chans: int, image_size: int | None) -> tuple[DecodeCache | None, str]:
    """(the cache, "") when the file and its sidecar are complete and fit; else (None, why; "" when absent)."""
    if not path.is_file():
        return None, ""
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
        meta = json.loads(path.with_suffix(".json").read_text())
        size = path.stat().st_size
    except (OSError, ValueError, EOFError) as e:  # a torn header, short data, a missing or torn sidecar
        return None, f"unreadable: {e}"
    want = (n, in_chans, image_size, image_size) if image_size else (n, in_chans)
    dtype = meta.get("dtype", "uint8") if isinstance(meta, dict) else None  # caches before float32 had no dtype
    if dtype not in DTYPES:
        return None, f"its sidecar {path.with_suffix('.json').name} names dtype {dtype!r}, not one of {DTYPES}"
    if a.dtype != dtype or a.ndim != 4 or a.shape[: len(want)] != want:
        return None, f"{a.dtype} {a.shape} in its header, expected {dtype} {want}[+ H, W]"
    if not isinstance(a, np.memmap) or a.offset + a.nbytes != size:
        return None, f"{size} bytes on disk for a {a.shape} array"
    bad = _bad_rows(meta, a.shape)
    if bad is None:
        return None, f"its sidecar {path.with_suffix('.json').name} does not describe it"
    return DecodeCache(path, a.shape, bad, built=False, array=a, dtype=dtype), ""


def _bad_rows(meta: Any, shape: tuple[int, ...]) -> dict[int, str] | None:
    """The sidecar's {row: why it could not be decoded}, or None when the sidecar is not the one of this array."""
    if not isinstance(meta, dict) or (meta.get("format"), meta.get("shape")) != (CACHE_FORMAT, list(shape)):
        return None
    bad = meta.get("bad")
    ok = isinstance(bad, list) and all(
        isinstance(b, list) and len(b) == 2 and isinstance(b[0], int) and 0 <= b[0] < shape[0] for b in bad
    )
    return {int(r): str(m) for r, m in bad} if ok else None


def _check_writable(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise DataError(f"{d}: the decode cache cannot be written there ({e.strerror or e}); set dataset.cache_dir "
                        "to a writable folder, or dataset.decode_cache=false to decode every epoch.") from None


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """One builder per cache file across processes (DDP ranks, concurrent runs); the OS drops it if the holder dies."""
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("decode cache: another process is building %s; waiting for it", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _first(files: Sequence[str], decode: Decode) -> tuple[int, tuple[int, ...], str]:
    """(index, shape, dtype) of the first file that decodes: it fixes the cache's shape (without image_size) and
    dtype (the order is the sorted file list, so every run and mode agrees); a folder where none decodes fails with
    the first file's error."""
    first: DataError | None = None
    for i, f in enumerate(files):
        try:
            a = decode(f)
        except DataError as e:
            first = first or e
            continue
        if str(a.dtype) not in DTYPES:
            raise DataError(f"{f}: decodes to {a.dtype}, which the decode cache cannot hold; set "
                            "dataset.decode_cache=false.")
        return i, tuple(a.shape), str(a.dtype)
    raise first if first else DataError("no files to cache")


class _Chunks(Dataset):
    """Consecutive files decoded in a worker; failures come back as messages, so they never abort the build."""

    def __init__(self, files: Sequence[str], decode: Decode, shape: tuple[int, ...], dtype: str, chunk: int) -> None:
        self.files, self.decode, self.shape, self.dtype, self.chunk = files, decode, shape, np.dtype(dtype), chunk

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.chunk)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor, dict[int, str], dict[int, str]]:
        """(first row, decoded rows, {row: why it could not be decoded}, {row: its other dtype})."""
        start = k * self.chunk
        part = self.files[start : start + self.chunk]
        block, bad, mixed = np.zeros((len(part), *self.shape), self.dtype), {}, {}
        for j, f in enumerate(part):
            try:
                a = self.decode(f)
            except DataError as e:
                bad[start + j] = str(e)
                continue
            if a.dtype != self.dtype:
                mixed[start + j] = str(a.dtype)
                continue
            if a.shape != self.shape:
                bad[start + j] = (f"{f}: decoded {a.dtype} {a.shape} differs from {self.dtype} {self.shape} of the "
                                  "first file; set dataset.image_size to resize every file to one size.")
                continue
            block[j] = a
        return start, torch.from_numpy(block), bad, mixed


def _reserve(path: Path, nbytes: int) -> None:
    """Claim the disk space up front: a full disk then fails here, not as a SIGBUS halfway through the memmap."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DataError(f"{path.parent}: no room for the {nbytes / 1e9:.2f} GB decode cache; set "
                            "dataset.cache_dir to a folder with space, or dataset.decode_cache=false.") from None
    finally:
        os.close(fd)


def _build(path: Path, files: Sequence[str], decode: Decode, shape: tuple[int, ...], dtype: str, first: int,
           workers: int) -> DecodeCache:
    """``first``: the index of the file whose ``shape`` and ``dtype`` every row must have (see _first)."""
    n = len(files)
    workers = workers if n >= PARALLEL_FROM else 0
    chunk = max(1, min(64, math.ceil(n / (4 * max(1, workers)))))
    loader = DataLoader(_Chunks(files, decode, shape, dtype, chunk), batch_size=None, num_workers=workers)
    log.info("decode cache: decoding %d files once into %s (%.1f MB of %s, %d workers)", n, path,
             n * math.prod(shape) * np.dtype(dtype).itemsize / 1e6, dtype, loader.num_workers)
    t0 = last = time.monotonic()
    bad: dict[int, str] = {}
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, *shape))
        _reserve(tmp, out.offset + out.nbytes)
        done = 0
        for start, block, errors, mixed in loader:
            if mixed:
                row = min(mixed)
                del out
                raise mixed_depth_error(files[first], np.dtype(dtype), files[row], np.dtype(mixed[row]))
            out[start : start + len(block)] = block.numpy()
            bad.update(errors)
            done += len(block)
            if time.monotonic() - last >= PROGRESS_SECONDS:
                last = time.monotonic()
                log.info("decode cache: %d / %d files (%.0f/s)", done, n, done / (last - t0))
        out.flush()
        del out
        meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "shape": [n, *shape], "dtype": dtype,
                "bad": [[r, m] for r, m in sorted(bad.items())]}
        write_json(path.with_suffix(".json"), meta)  # before the array appears: a reader needs both
    seconds = time.monotonic() - t0
    log.info("decode cache: built %s in %.1f s (%.0f files/s; %d could not be decoded)", path, seconds,
             n / max(seconds, 1e-9), len(bad))
    return DecodeCache(path, (n, *shape), bad, built=True, dtype=dtype)
