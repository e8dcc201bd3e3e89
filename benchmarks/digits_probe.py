"""Learning check on real images: does SSL pretraining beat a random backbone on scikit-learn's digits?

Pretrains a backbone (SimCLR or Barlow Twins) on the digits' training split without labels, then reads out the
pretrained and a random-initialised backbone with the same probes (logistic regression and kNN on frozen features)
and prints them side by side. Real data that ships with scikit-learn: 1797 greyscale 8x8 digits, upsampled to 32 px.

    python benchmarks/digits_probe.py [--method barlow] [--epochs 30] [--out digits_probe.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssl_lab.tasks import TASKS  # noqa: E402

# Digits are not flip- or rotation-invariant (6 vs 9): crops, intensity, blur and noise only.
AUGMENT = ["~augment.ops.hflip", "~augment.ops.vflip", "~augment.ops.rot90", "augment.ops.resized_crop.scale=[0.6,1.0]"]


def write_digits(path: Path, size: int = 32) -> None:
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    with h5py.File(path, "w") as f:
        f["images"] = x.numpy()
        f["labels"] = digits.target.astype(np.int64)


def config(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf"), job_name="digits"):
        return compose(config_name="config", overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="simclr", choices=["simclr", "barlow"])
    parser.add_argument("--backbone", default="resnet15")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="digits_probe.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_digits(tmp / "digits.h5")
        common = ["accelerator=auto", f"backbone={args.backbone}", "backbone.small_stem=false", "dataset=lens_h5",
                  f"dataset.path={tmp / 'digits.h5'}", "dataset.label_key=labels", "dataset.num_workers=0",
                  "dataset.in_memory=true", f"dataset.batch_size={args.batch_size}", f"seed={args.seed}",
                  "trainer.enable_progress_bar=false", *AUGMENT]
        started = time.time()
        pre = TASKS["pretrain"](config([*common, f"method={args.method}", f"trainer.max_epochs={args.epochs}",
                                        f"run_dir={tmp / 'pretrain'}"]))
        pretrain_s = time.time() - started
        results = {}
        for name, source in (("pretrained", str(tmp / "pretrain")), ("random init", "random")):
            m = TASKS["evaluate"](config([*common, "task=evaluate", "task.embed=[pca]", f"pretrained={source}",
                                          f"run_dir={tmp / name.replace(' ', '_')}"]))
            results[name] = {"logistic_probe_acc": m["probe"]["accuracy"], "knn_acc": m["knn_accuracy"],
                             "kmeans_ari": m["kmeans"]["ari"]}

    print(f"\ndigits ({args.backbone}, {args.method}, {args.epochs} epochs, pretraining {pretrain_s:.0f} s, "
          f"final loss {pre['final_loss']:.3f})")
    print(f"{'backbone':<14}{'logistic probe':>16}{'kNN':>8}{'k-means ARI':>14}")
    for name, r in results.items():
        print(f"{name:<14}{r['logistic_probe_acc']:>16.3f}{r['knn_acc']:>8.3f}{r['kmeans_ari']:>14.3f}")
    gain = results["pretrained"]["logistic_probe_acc"] / results["random init"]["logistic_probe_acc"]
    print(f"pretrained / random (logistic probe accuracy): {gain:.2f}x")
    Path(args.out).write_text(json.dumps({"args": vars(args), "pretrain_seconds": pretrain_s, "results": results,
                                         "ratio": gain}, indent=2))


if __name__ == "__main__":
    main()
