"""Image-folder training-loader throughput: decoding every PNG each epoch vs reading the decode cache.

    python benchmarks/folder_decode.py                      # 2000 PNGs, 256 px grey, resized to 128 as dataset=mri does
    python benchmarks/folder_decode.py --n 20000 --workers 8 --size 512 --image-size 224 --json folder_decode.json

Writes --n smooth synthetic greyscale PNGs (a blurred random field plus noise, so they compress like real scans;
--unique distinct images, cycled, since encoding is slower than decoding) to a temporary folder. Then, with the same
workers and batch size, it times one epoch of FolderDataModule's training loader (a) with dataset.decode_cache=false
and (b) from the cache, after timing the setup that builds it (and the setup of a later run, which finds it). Epoch
rates count from the first batch on, so worker start-up is left out of both. Normalisation statistics are taken from
--stats-samples files (the default 4096 would decode the whole folder in setup (a) too).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_lab.artifacts import write_json
from ssl_lab.data.folder import FolderDataModule


def write_pngs(root: Path, n: int, size: int, unique: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(min(n, unique)):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        a = np.asarray(coarse, np.int16) + rng.integers(-6, 7, (size, size), dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"{i:06d}.png").write_bytes(encoded[i % len(encoded)])


def timed_setup(args: argparse.Namespace, root: Path, **kw) -> tuple[FolderDataModule, float]:
    dm = FolderDataModule("bench", str(root), 1, image_size=args.image_size, batch_size=args.batch_size,
                          num_workers=args.workers, stats_max_samples=args.stats_samples, **kw)
    t0 = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    return dm, time.perf_counter() - t0


def epoch_rate(dm: FolderDataModule) -> float:
    """Images/s of one training epoch, from the first batch to the last."""
    it = iter(dm.train_dataloader())
    next(it)
    t0, images = time.perf_counter(), 0
    for batch in it:
        images += batch["x"].shape[0]
    return images / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="PNG files to write")
    ap.add_argument("--size", type=int, default=256, help="side of the written PNGs (px)")
    ap.add_argument("--unique", type=int, default=200, help="distinct images among them")
    ap.add_argument("--image-size", type=int, default=128, help="dataset.image_size they are resized to")
    ap.add_argument("--workers", type=int, default=2, help="dataset.num_workers, for both loaders and the build")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--stats-samples", type=int, default=256, help="dataset.stats_max_samples")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed after)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    work = args.dir or Path(tempfile.mkdtemp(prefix="folder_decode_"))
    try:
        t0 = time.perf_counter()
        write_pngs(work / "pngs", args.n, args.size, args.unique)
        written = time.perf_counter() - t0
        plain, setup_a = timed_setup(args, work / "pngs", decode_cache=False)
        rate_a = epoch_rate(plain)
        cached, build = timed_setup(args, work / "pngs", cache_dir=str(work / "cache"))
        assert cached.summary()["decode_cache"]["built"], "the cache already existed: use an empty --dir"
        _, later = timed_setup(args, work / "pngs", cache_dir=str(work / "cache"))
        rate_b = epoch_rate(cached)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"folder_decode: {args.n} PNG {args.size}x{args.size} grey -> {args.image_size} px, {args.workers} workers, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(f"  write PNGs                    {written:8.1f} s")
    print(f"  (a) decode every epoch        {rate_a:8.0f} images/s   (setup {setup_a:.1f} s)")
    print(f"  setup that builds the cache   {build:8.1f} s           (a later run's setup: {later:.1f} s)")
    print(f"  (b) from the cache            {rate_b:8.0f} images/s")
    print(f"  b/a                           {rate_b / rate_a:8.1f}x")
    if args.json:
        write_json(args.json, {
            "n": args.n, "size": args.size, "image_size": args.image_size, "workers": args.workers,
            "batch_size": args.batch_size, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "decode_images_per_s": rate_a, "cache_images_per_s": rate_b, "ratio": rate_b / rate_a,
            "setup_decode_s": setup_a, "setup_build_s": build, "setup_later_s": later, "write_s": written,
        })


if __name__ == "__main__":
    main()
