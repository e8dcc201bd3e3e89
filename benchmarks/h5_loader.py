"""HDF5 training-loader throughput on this machine: per-sample reads (the old way) vs chunk-aligned block reads.

    python benchmarks/h5_loader.py --gb 3 --json h5_loader.json      # ~3 GB of 8x125x125 float32 (NHWC)
    python benchmarks/h5_loader.py --quick                            # tiny files: checks the script works

Builds, in --dir, an NHWC float32 file shaped like the CMS E2E jets file, chunked as h5py chunks such files when a
writer asks for chunking (chunks=True / compression / a resizable dataset created with ~1000 rows: (128, 16, 16, 1)
tiles, so one sample spans 512 chunks), a contiguous copy, and `ssl_lab.prepare` float16 and uint8 copies (NCHW,
whole samples per chunk). Before every measurement each file is evicted from the page cache (fsync, then
posix_fadvise DONTNEED; reported when unavailable), so reads come from disk as they would for a 30 GB file. Each case
iterates H5DataModule's training loader for --seconds (or one epoch) and reports samples/s, the stored MB/s read,
and the ratio against per-sample reads of the original chunked file with the same worker count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_lab.data.h5 import H5DataModule
from ssl_lab.prepare import prepare

C, HW = 8, 125


def write_source(path: Path, n: int, hw: int, chunks: tuple | None, rng: np.random.Generator) -> None:
    """Sparse positive 'deposits' (most pixels 0), written in chunk-aligned slabs from a reused random slab."""
    slab_n = chunks[0] if chunks else 64
    slab = rng.gamma(0.5, 3.0, size=(slab_n, hw, hw, C)).astype(np.float32)
    slab[rng.random(slab.shape) < 0.7] = 0.0
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("jet", shape=(n, hw, hw, C), dtype=np.float32, chunks=chunks)
        for lo in range(0, n, slab_n):
            hi = min(n, lo + slab_n)
            ds[lo:hi] = np.roll(slab, lo // slab_n, axis=1)[: hi - lo] * (1 + lo / n)


def evict(path: Path) -> bool:
    """Drop the file's pages from the page cache (needs clean pages: fsync first). False if not supported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def measure(path: Path, layout: str, read: str, workers: int, batch: int, seconds: float, block_samples) -> dict:
    dm = H5DataModule(
        "bench", str(path), C, image_key="jet", label_key=None, target_keys=[], layout=layout, val_fraction=0.0,
        batch_size=batch, num_workers=workers, stats_max_samples=batch, read=read, block_samples=block_samples,
    )
    dm.setup("fit")
    evicted = evict(path)
    loader = dm.train_dataloader()
    if read == "block":
        loader.sampler.set_epoch(0)
    row_bytes = os.path.getsize(path) / dm.summary()["n_images"]
    t0 = time.perf_counter()
    n = 0
    for b in loader:
        n += len(b["x"])
        if time.perf_counter() - t0 > seconds:
            break
    dt = time.perf_counter() - t0
    if getattr(loader, "_iterator", None) is not None:  # persistent workers: stop them before the next case
        loader._iterator._shutdown_workers()
    return {"samples": n, "seconds": round(dt, 3), "samples_per_s": n / dt, "mb_per_s": n * row_bytes / dt / 2**20,
            "evicted": evicted, "block_samples": dm.block if read == "block" else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=3.0, help="size of the float32 source files (default 3)")
    p.add_argument("--seconds", type=float, default=12.0, help="time per case (default 12)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dir", default=None, help="where the files go (default: a temporary folder, removed after)")
    p.add_argument("--json", default="h5_loader.json", help="results file")
    p.add_argument("--quick", action="store_true", help="tiny files, a fraction of a second per case: checks the script runs")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    a = p.parse_args(argv)
    hw, chunk, block = (HW, (128, 16, 16, 1), None) if not a.quick else (16, (8, 8, 8, 1), 8)
    batch, seconds = (a.batch_size, a.seconds) if not a.quick else (8, 0.3)
    row = hw * hw * C * 4
    n = max(4 * batch, int(a.gb * 2**30 // row)) if not a.quick else 96
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="h5bench-"))
    work.mkdir(parents=True, exist_ok=True)
    files = {"chunked": work / "bench_chunked.h5", "contiguous": work / "bench_contiguous.h5",
             "float16": work / "bench_f16.h5", "uint8": work / "bench_u8.h5"}
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    print(f"building {n} samples of {C}x{hw}x{hw} float32 ({n * row / 2**30:.2f} GB per source file) in {work}")
    write_source(files["chunked"], n, hw, chunk, rng)
    write_source(files["contiguous"], n, hw, None, rng)
    prep = {}
    for kind in ("float16", "uint8"):
        r = prepare(files["chunked"], files[kind], "jet", layout="NHWC", dtype=kind, overwrite=True,
                    chunk_samples=8 if a.quick else None)
        prep[kind] = {k: r[k] for k in ("size_ratio", "max_abs_error", "chunk", "seconds")}
        print(f"prepared {kind}: size ratio {r['size_ratio']:.3f}, max abs error {r['max_abs_error']:.3g}, "
              f"chunks {r['chunk']}, {r['seconds']:.1f} s")
    build_s = time.perf_counter() - t0
    cases = [("chunked", "NHWC", read, w) for read in ("sample", "block") for w in a.workers]
    cases += [("contiguous", "NHWC", read, w) for read in ("sample", "block") for w in a.workers]
    cases += [(kind, "NCHW", "block", w) for kind in ("float16", "uint8") for w in a.workers]
    cases += [(kind, "NCHW", "sample", max(a.workers)) for kind in ("float16", "uint8")]
    results, base = [], {}
    for name, layout, read, w in cases:
        r = measure(files[name], layout, read, w, batch, seconds, block)
        if name == "chunked" and read == "sample":
            base[w] = r["samples_per_s"]
        ref = base.get(w) or base.get(min(base, key=lambda k: abs(k - w)))
        row_out = {"file": name, "read": read, "workers": w, **r, "vs_sample_reads": r["samples_per_s"] / ref}
        results.append(row_out)
        print(f"{name:>10} {read:>6} workers={w}: {r['samples_per_s']:9.1f} samples/s {r['mb_per_s']:8.1f} MB/s "
              f"({r['samples']} samples in {r['seconds']:.1f} s)  x{row_out['vs_sample_reads']:.1f} vs per-sample "
              f"reads of the chunked file{'' if r['evicted'] else '  [page cache NOT dropped]'}")
    report = {
        "what": "H5DataModule training loader samples/s, page cache dropped before each case",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "n_samples": n, "sample_shape": [C, hw, hw], "source_gb": n * row / 2**30, "chunked_chunks": list(chunk),
        "batch_size": batch, "seconds_per_case": seconds, "build_seconds": build_s, "prepared": prep,
        "results": results,
    }
    Path(a.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {a.json}")
    if not a.keep:
        for f in files.values():
            f.unlink(missing_ok=True)
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
