"""Rewrite an HDF5 image file as a compact, chunked NCHW copy that block reading streams fast.

    python -m ssl_lab.prepare Dataset_Specific_Unlabelled.h5 jets_f16.h5 --key jet --layout NHWC --dtype float16

Streams the input in chunk-aligned blocks (memory stays bounded by ~``--block-mb`` plus one input chunk row), so
files larger than RAM work. ``float16`` halves the bytes (relative error <= 2^-11, range +-65504; NaN/Inf kept, so
dataset.nan_policy still applies). ``uint8`` quarters them with a per-channel affine code x = code * scale + offset
(max abs error scale/2 per channel, where scale = (max - min) / 255); H5DataModule reads the scale/offset
attributes and decodes to float32, so statistics and everything downstream see the original units. The output is
chunked as ``(chunk_samples, C, H, W)``: whole samples per chunk, so a block read touches only its own chunks.
Label/target datasets are copied unchanged. The copy is written to a temporary file and renamed when complete.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from ssl_lab.data.h5 import LAYOUT_ATTR, OFFSET_ATTR, SCALE_ATTR
from ssl_lab.errors import DataError

FLOAT16_MAX = float(np.finfo(np.float16).max)
CHUNK_TARGET_BYTES = 4 << 20  # output chunk: a few MB of whole samples, 1-2 of them per 16 MB block read


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda k, v: names.append(k) if isinstance(v, h5py.Dataset) else None)
    return names


def _get(f: h5py.File, key: str, path: Path, flag: str) -> h5py.Dataset:
    obj = f.get(key)
    if isinstance(obj, h5py.Dataset):
        return obj
    listing = ", ".join(_datasets(f)) or "(none)"
    raise DataError(f"{path}: key '{key}' not found; available keys: {listing}. Pass one of them as {flag}.")


def _blocks(ds: h5py.Dataset, block_bytes: int, out_chunk: int = 1) -> Iterator[tuple[int, int]]:
    """[lo, hi) row ranges of about block_bytes: whole input chunks along axis 0 (at least one chunk row), and whole
    output chunks too where that stays within 4x block_bytes, so no chunk is read or written twice."""
    n = ds.shape[0]
    chunk = ds.chunks[0] if ds.chunks else 1
    row = max(1, math.prod(ds.shape[1:]) * ds.dtype.itemsize)
    both = math.lcm(chunk, out_chunk)
    if both * row <= 4 * block_bytes:
        chunk = both
    rows = max(chunk, (max(1, block_bytes // row) // chunk) * chunk)
    for lo in range(0, n, rows):
        yield lo, min(n, lo + rows)


def _to_nchw(a: np.ndarray, layout: str) -> np.ndarray:
    if a.ndim == 3:
        return a[:, None]
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if layout == "NHWC" else a


def _channel_range(ds: h5py.Dataset, layout: str, block_bytes: int) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Per-channel finite min/max, the count of non-finite values, and the largest finite |x| (one pass)."""
    lo_c = hi_c = None
    bad = 0
    for lo, hi in _blocks(ds, block_bytes):
        a = _to_nchw(ds[lo:hi], layout)
        finite = np.isfinite(a)
        bad += int(finite.size - np.count_nonzero(finite))
        mn = np.where(finite, a, np.inf).min(axis=(0, 2, 3)).astype(np.float64)
        mx = np.where(finite, a, -np.inf).max(axis=(0, 2, 3)).astype(np.float64)
        lo_c = mn if lo_c is None else np.minimum(lo_c, mn)
        hi_c = mx if hi_c is None else np.maximum(hi_c, mx)
    lo_c = np.where(np.isfinite(lo_c), lo_c, 0.0)
    hi_c = np.where(np.isfinite(hi_c), hi_c, 0.0)
    return lo_c, hi_c, bad, float(max(np.abs(lo_c).max(), np.abs(hi_c).max()))


def prepare(
    src: str | Path, dst: str | Path, key: str, layout: str = "NCHW", dtype: str = "float16",
    chunk_samples: int | None = None, labels_keys: list[str] | None = None, overwrite: bool = False,
    compression: str | None = None, block_mb: int = 64,
) -> dict:
    """Write the compact copy; returns a report (sizes, ratio, max abs error per channel). See the module doc."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    layout = layout.upper()
    if layout not in ("NCHW", "NHWC"):
        raise DataError(f"--layout {layout} must be NCHW or NHWC (the input file's layout).")
    if dtype not in ("float16", "uint8", "float32"):
        raise DataError(f"--dtype {dtype} must be float16, uint8 or float32.")
    if not src.is_file():
        raise DataError(f"{src}: file not found.")
    if dst.exists() and not overwrite:
        raise DataError(f"{dst} exists; pass --overwrite to replace it, or choose another output path.")
    if dst.exists() and dst.resolve() == src.resolve():
        raise DataError(f"{dst} is the input file; write the copy to another path.")
    if chunk_samples is not None and chunk_samples < 1:
        raise DataError(f"--chunk-samples {chunk_samples} must be >= 1.")
    block_bytes = max(1, int(block_mb)) << 20
    t0 = time.perf_counter()
    try:
        fin = h5py.File(src, "r")
    except OSError as e:
        raise DataError(f"{src}: cannot be opened as HDF5 ({e}).") from None
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    with fin:
        ds = _get(fin, key, src, "--key")
        if ds.ndim not in (3, 4) or ds.dtype.kind not in "uif":
            raise DataError(
                f"{src}: key '{key}' has shape {ds.shape} and dtype {ds.dtype}; expected numeric images (N, C, H, W), "
                "(N, H, W, C) or (N, H, W)."
            )
        n = ds.shape[0]
        c, h, w = (1, *ds.shape[1:]) if ds.ndim == 3 else (
            (ds.shape[3], ds.shape[1], ds.shape[2]) if layout == "NHWC" else ds.shape[1:]
        )
        others = [k for k in _datasets(fin) if k != key] if labels_keys is None else list(labels_keys)
        for k in others:
            _get(fin, k, src, "--labels-key")
        out_dtype = np.dtype(dtype)
        row_out = c * h * w * out_dtype.itemsize
        chunk = int(chunk_samples or max(1, CHUNK_TARGET_BYTES // row_out))
        chunk = min(chunk, max(1, n))
        scale = offset = None
        if dtype in ("float16", "uint8"):
            lo_c, hi_c, n_bad, amax = _channel_range(ds, layout, block_bytes)
            if dtype == "float16" and amax > FLOAT16_MAX:
                raise DataError(
                    f"{src}: key '{key}' holds values up to {amax:.4g}, beyond float16's range ({FLOAT16_MAX:.0f}); "
                    "use --dtype uint8 (per-channel scale) or float32."
                )
            if dtype == "uint8":
                if n_bad:
                    raise DataError(
                        f"{src}: key '{key}' has {n_bad} non-finite (NaN/Inf) values, which uint8 cannot hold; use "
                        "--dtype float16 (keeps them for dataset.nan_policy) or clean the file first."
                    )
                scale = np.where(hi_c > lo_c, (hi_c - lo_c) / 255.0, 1.0)
                offset = lo_c
        err = np.zeros(c)
        try:
            with h5py.File(tmp, "w") as fout:
                fout.attrs.update(dict(fin.attrs))
                out = fout.create_dataset(
                    key, shape=(n, c, h, w), dtype=out_dtype, chunks=(chunk, c, h, w),
                    compression=compression,
                )
                out.attrs.update(dict(ds.attrs))
                out.attrs[LAYOUT_ATTR] = "NCHW"
                out.attrs["ssl_lab_source"] = str(src)
                if scale is not None:
                    out.attrs[SCALE_ATTR], out.attrs[OFFSET_ATTR] = scale, offset
                for lo, hi in _blocks(ds, block_bytes, chunk):
                    a = _to_nchw(ds[lo:hi], layout)
                    if scale is not None:  # decoded exactly as H5Dataset does: code * scale32 + offset32
                        s4, o4 = (v.astype(np.float32).reshape(1, -1, 1, 1) for v in (scale, offset))
                        enc = np.clip(np.rint((a.astype(np.float32) - o4) / s4), 0, 255).astype(np.uint8)
                        back = enc.astype(np.float32) * s4 + o4
                    else:
                        enc = a.astype(out_dtype)
                        back = enc.astype(np.float32)
                    with np.errstate(invalid="ignore"):
                        diff = np.abs(back - a.astype(np.float32))
                    diff[~np.isfinite(diff)] = 0.0  # NaN/Inf are stored as themselves (float16)
                    err = np.maximum(err, diff.max(axis=(0, 2, 3)))
                    out[lo:hi] = enc
                for k in others:
                    fin.copy(fin[k], fout, name=k)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    size_in, size_out = src.stat().st_size, dst.stat().st_size
    report = {
        "input": str(src), "output": str(dst), "key": key, "n": int(n), "shape": [c, h, w], "dtype": dtype,
        "chunk": [chunk, c, h, w], "copied_keys": others, "bytes_in": size_in, "bytes_out": size_out,
        "size_ratio": size_out / max(1, size_in), "max_abs_error": float(err.max()) if c else 0.0,
        "max_abs_error_per_channel": [float(e) for e in err], "seconds": time.perf_counter() - t0,
    }
    if scale is not None:
        report["scale"], report["offset"] = [float(v) for v in scale], [float(v) for v in offset]
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ssl_lab.prepare", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="HDF5 file to convert")
    p.add_argument("output", help="the compact copy to write (refused if it exists, unless --overwrite)")
    p.add_argument("--key", required=True, help="the image dataset, e.g. jet")
    p.add_argument("--layout", default="NCHW", type=str.upper, choices=["NCHW", "NHWC"], help="input layout")
    p.add_argument("--dtype", default="float16", choices=["float16", "uint8", "float32"])
    p.add_argument("--chunk-samples", type=int, default=None, help="samples per output chunk (default: ~4 MB)")
    p.add_argument("--labels-key", action="extend", nargs="+", default=None, dest="labels_keys",
                   help="label/target datasets to copy (default: every other dataset in the file)")
    p.add_argument("--compression", default=None, choices=["lzf", "gzip"], help="HDF5 filter (default: none)")
    p.add_argument("--block-mb", type=int, default=64, help="read size, bounds memory (default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    a = p.parse_args(argv)
    try:
        r = prepare(a.input, a.output, a.key, a.layout, a.dtype, a.chunk_samples, a.labels_keys, a.overwrite,
                    a.compression, a.block_mb)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    per = ", ".join(f"{v:.3g}" for v in r["max_abs_error_per_channel"])
    print(
        f"wrote {r['output']}: {r['n']} x {r['shape']} {r['dtype']}, chunks {r['chunk']}, copied {r['copied_keys']}\n"
        f"size {r['bytes_in'] / 2**20:.1f} MB -> {r['bytes_out'] / 2**20:.1f} MB (ratio {r['size_ratio']:.3f}); "
        f"max abs error {r['max_abs_error']:.3g} (per channel: {per}); {r['seconds']:.1f} s\n"
        f"read it with dataset.path={r['output']} (layout NCHW and any uint8 scale are recorded in the file)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
