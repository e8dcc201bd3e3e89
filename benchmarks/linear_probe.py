"""Linear probe: today's cached-feature task=linear against the Lightning frozen-backbone probe it replaced, and
against scikit-learn's logistic regression on the same features.

The old probe (task=finetune with the backbone frozen, no augmentation, one linear head at lr 1e-2: what
task=linear ran before) pays the backbone's forward pass in every epoch; the new one computes features once and
trains a grid of heads on them. Both run in this process on the same data, backbone and splits; the script prints
their wall times and the ratio, and the test accuracy of each beside scikit-learn's standardised
LogisticRegression fitted on the new probe's own training features.

    python benchmarks/linear_probe.py [--data digits|lens_sim] [--size 64] [--old-epochs 20] [--backbone resnet18]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from digits_probe import config, write_digits  # noqa: E402
from ssl_lab.evaluation.probe import logistic_probe  # noqa: E402
from ssl_lab.tasks import TASKS  # noqa: E402
from ssl_lab.tasks.features import split_features  # noqa: E402
from ssl_lab.tasks.labelled_run import start_labelled_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["digits", "lens_sim"], default="digits")
    parser.add_argument("--size", type=int, default=64, help="image side (digits are upsampled to it)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--old-epochs", type=int, default=20, help="epochs of the old probe (its default was 20)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="linear_probe_bench.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.data == "digits":
            write_digits(tmp / "digits.h5", size=args.size)
            data = ["dataset=lens_h5", f"dataset.path={tmp / 'digits.h5'}", "dataset.label_key=labels",
                    "dataset.in_memory=true"]
        else:
            data = ["dataset=lens_sim", f"dataset.cache_dir={tmp / 'cache'}", f"dataset.image_size={args.size}"]
        common = [*data, "accelerator=auto", f"backbone={args.backbone}", "backbone.small_stem=false",
                  "pretrained=random", "dataset.num_workers=0", "trainer.enable_progress_bar=false", "seed=0"]

        started = time.time()
        new = TASKS["linear"](config([*common, "task=linear", f"run_dir={tmp / 'new'}"]))
        new_s = time.time() - started
        started = time.time()
        old = TASKS["finetune"](config([*common, "task=finetune", "task.freeze_backbone=true",
                                        "task.train_augment=false", "task.head=linear", "task.backbone_lr=0",
                                        "task.head_lr=1e-2", f"task.max_epochs={args.old_epochs}",
                                        f"run_dir={tmp / 'old'}"]))
        old_s = time.time() - started

        # scikit-learn on exactly the features the new probe trained on (same random-init backbone: same seed)
        run = start_labelled_run(config([*common, "task=linear", f"run_dir={tmp / 'ref'}"]), True, False)
        feats = split_features(run, torch.device("cpu"), None)
        ref = logistic_probe(*(t.cpu().numpy() for t in (feats["train"].x, feats["train"].y, feats["test"].x,
                                                           feats["test"].y)))

    rows = {
        "old (Lightning, frozen backbone, 1 head)": (old_s, old["test"]["accuracy"]),
        "new (cached features, grid of heads)": (new_s, new["test"]["accuracy"]),
    }
    print(f"\n{args.data} {args.size}px, {args.backbone} (random init), {new['data_n_train']} train / "
          f"{new['data_n_test']} test images; old probe {args.old_epochs} epochs, new probe {new['epochs']} epochs x "
          f"{new['probe'].get('heads', 1)} heads")
    print(f"{'probe':<44}{'seconds':>9}{'test acc':>10}")
    for name, (seconds, acc) in rows.items():
        print(f"{name:<44}{seconds:>9.1f}{acc:>10.3f}")
    print(f"{'scikit-learn LogisticRegression (same feats)':<44}{'':>9}{ref['accuracy']:>10.3f}")
    print(f"\nspeed-up old/new: {old_s / new_s:.1f}x   new - sklearn: {new['test']['accuracy'] - ref['accuracy']:+.3f}")
    print(f"new probe chose {new['probe']}")
    Path(args.out).write_text(json.dumps({
        "args": vars(args), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "old_seconds": old_s, "new_seconds": new_s, "speedup": old_s / new_s,
        "old_accuracy": old["test"]["accuracy"], "new_accuracy": new["test"]["accuracy"],
        "sklearn_accuracy": ref["accuracy"], "new_choice": new["probe"], "np_version": np.__version__}, indent=2))


if __name__ == "__main__":
    main()
