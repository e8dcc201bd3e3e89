"""Learning check on real images: does SSL pretraining beat a random backbone on scikit-learn's digits?

Pretrains a backbone with each SSL method asked for on the digits' training split without labels, then reads out
every pretrained backbone and a random-initialised one with the same probes (logistic regression, kNN and k-means on
frozen features) and prints them side by side. Real data that ships with scikit-learn: 1797 greyscale 8x8 digits,
upsampled to 32 px.

    python benchmarks/digits_probe.py [--methods simclr,barlow,mae] [--epochs 30] [--out digits_probe.json]
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
from ssl_lab.resolvers import register  # noqa: E402

register()  # the configs interpolate these (run.py registers them too)

# Digits are not flip- or rotation-invariant (6 vs 9): crops, intensity, blur and noise only.
AUGMENT = ["~augment.ops.hflip", "~augment.ops.vflip", "~augment.ops.rot90", "augment.ops.resized_crop.scale=[0.6,1.0]"]
METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))


def method_overrides(method: str, backbone: str) -> list[str]:
    """The backbone for a method and what the method needs beyond the shared settings."""
    if method == "mae":  # a ViT, with 4 px patches on the 32 px digits
        return ["backbone=vit_tiny", "backbone.patch_size=4"]
    extra = [f"backbone={backbone}", "backbone.small_stem=false"]
    if method == "blur":  # blur-level prediction refuses a preset with its own blur
        extra.append("~augment.ops.blur")
    return extra


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
    parser.add_argument("--methods", default="simclr", help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--backbone", default="resnet15", help="for every method but MAE (always vit_tiny)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="digits_probe.json")
    args = parser.parse_args()

    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_digits(tmp / "digits.h5")
        common = ["accelerator=auto", "dataset=lens_h5",
                  f"dataset.path={tmp / 'digits.h5'}", "dataset.label_key=labels", "dataset.num_workers=0",
                  "dataset.in_memory=true", f"dataset.batch_size={args.batch_size}", f"seed={args.seed}",
                  "trainer.enable_progress_bar=false", *AUGMENT]

        def probe(name: str, source: str, extra: list[str]) -> dict:
            m = TASKS["evaluate"](config([*common, *extra, "task=evaluate", "task.embed=[pca]", f"pretrained={source}",
                                          f"run_dir={tmp / ('eval_' + name)}"]))
            return {"logistic_probe_acc": m["probe"]["accuracy"], "knn_acc": m["knn"]["k20"],
                    "kmeans_ari": m["kmeans"]["ari"]}

        random_init = {}
        for method in methods:
            backbone = "vit_tiny" if method == "mae" else args.backbone
            extra = method_overrides(method, backbone)
            if backbone not in random_init:
                random_init[backbone] = probe(f"random_{backbone}", "random", extra)
            started = time.time()
            pre = TASKS["pretrain"](config([*common, *extra, f"method={method}", f"trainer.max_epochs={args.epochs}",
                                            f"run_dir={tmp / ('pretrain_' + method)}"]))
            result = probe(method, str(tmp / ("pretrain_" + method)), extra)
            result.update(method=method, backbone=backbone, pretrain_seconds=round(time.time() - started, 1),
                          final_loss=pre["final_loss"],
                          ratio=result["logistic_probe_acc"] / random_init[backbone]["logistic_probe_acc"])
            rows.append(result)
            print(f"{method}: probe {result['logistic_probe_acc']:.3f} ({result['ratio']:.2f}x random)", flush=True)

    print(f"\ndigits, {args.epochs} epochs, batch {args.batch_size}, seed {args.seed}")
    print(f"{'backbone':<24}{'logistic probe':>16}{'kNN':>8}{'k-means ARI':>14}{'vs random':>11}{'pretrain s':>12}")
    for backbone, r in random_init.items():
        print(f"{'random ' + backbone:<24}{r['logistic_probe_acc']:>16.3f}{r['knn_acc']:>8.3f}{r['kmeans_ari']:>14.3f}"
              f"{1.0:>10.2f}x{'':>12}")
    for r in rows:
        print(f"{r['method'] + ' ' + r['backbone']:<24}{r['logistic_probe_acc']:>16.3f}{r['knn_acc']:>8.3f}"
              f"{r['kmeans_ari']:>14.3f}{r['ratio']:>10.2f}x{r['pretrain_seconds']:>12.0f}")
    Path(args.out).write_text(json.dumps({"args": vars(args), "random_init": random_init, "methods": rows},
                                         indent=2))


if __name__ == "__main__":
    main()
