"""Peer check: does ssl_lab learn at least as well as lightly, an independent implementation, on the same data?

For each dataset (scikit-learn's digits upsampled to 32 px; ssl_lab's simulated lenses at 64 px) one seeded,
stratified train / test split is written into the HDF5 file as a per-sample `split` tag, so both libraries pretrain
on exactly the same unlabelled train images. Then each method is pretrained twice from the same architecture: by
ssl_lab (`TASKS["pretrain"]`, the method's default config, the dataset's default augmentation) and by lightly (its
heads, loss, momentum and transform, see benchmarks/peer_lightly.py), both with the ssl_lab run's optimiser, lr and
schedule. Every backbone, and a random-initialised one, is then read out by the same probes on frozen features of
the un-augmented images: kNN (k=20, T=0.07) and a linear probe.

    python benchmarks/peer_check.py [--data digits,lens_sim] [--methods simclr,byol,barlow,vicreg,mocov3,dino]
        [--epochs 3] [--batch-size 128] [--backbone resnet18] [--optim adam|sgd] [--seed 0] [--out peer_check.json]
        [--quick] [--ssl-lab-override method.temperature=0.5 ...]

Needs lightly (`pip install -e ".[bench]"`). CPU only; timings are per-epoch seconds at steady state with the same
torch thread count for both libraries, noisy on a shared machine.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import platform
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import h5py
import lightly
import numpy as np
import sklearn
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import peer_lightly  # noqa: E402  (benchmarks/ is the script's own folder, first on sys.path)
from digits_probe import AUGMENT as DIGITS_AUGMENT  # noqa: E402

import ssl_lab  # noqa: E402
from ssl_lab.artifacts import load_backbone_file, write_json  # noqa: E402
from ssl_lab.backbones import backbone_from_meta, build_backbone  # noqa: E402
from ssl_lab.errors import ConfigError, DataError  # noqa: E402
from ssl_lab.data.lens_sim import lens_images  # noqa: E402
from ssl_lab.evaluation.knn import knn_accuracy  # noqa: E402
from ssl_lab.evaluation.linear_probe import FeatureSet, Objective, fit_probe, predict  # noqa: E402
from ssl_lab.methods.dino import LOCAL_FRACTION  # noqa: E402
from ssl_lab.optim import scale_lr  # noqa: E402
from ssl_lab.tasks import TASKS  # noqa: E402
from ssl_lab.resolvers import register  # noqa: E402

register()  # the configs interpolate these (run.py registers them too)

DATASETS = ("digits", "lens_sim")
TEST_FRACTION = 0.25
KNN_K, KNN_T = 20, 0.07
MARGIN = 0.01  # ssl_lab may trail lightly by at most one point
# Lightning's notes on every run that say nothing about this benchmark (no val loop on purpose, few steps)
LIGHTNING_NOISE = (".*val_dataloader.*", ".*LeafSpec.*", ".*smaller than the logging interval.*")
QUICK = {"epochs": 1, "methods": "simclr,byol", "data": "digits", "batch_size": 32, "digits": 128, "lens": 60}


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor) -> float:
    """The linear probe every backbone gets: task=linear's own (standardised features, a grid of heads trained
    together, the best on a stratified 20 % val share of train, the test split scored once)."""
    conf = compose_config([])
    fit_idx, val_idx = train_test_split(np.arange(len(train_y)), test_size=0.2, random_state=0,
                                        stratify=train_y.numpy())
    n_classes = int(train_y.max()) + 1
    fit = fit_probe(FeatureSet(train_x[fit_idx], train_y[fit_idx]), FeatureSet(train_x[val_idx], train_y[val_idx]),
                    Objective(n_classes), conf.task.solver, list(conf.task.lrs), list(conf.task.weight_decays),
                    conf.task.max_epochs, conf.task.batch_size, float(conf.task.momentum))
    probs = predict(fit.head, FeatureSet(test_x, test_y), Objective(n_classes))["probs"]
    return float((probs.argmax(1) == test_y.cpu()).float().mean())


def compose_config(overrides: list[str]):
    """task=linear's defaults, the probe settings every row uses."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf"), job_name="peer_probe"):
        return compose(config_name="config", overrides=["task=linear", *overrides])


# ------------------------------------------------------------------------------------------------------------ data
def digits_data(limit: int | None, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits, upsampled as digits_probe does: float32 [N, 1, 32, 32] in [0, 1], labels [N]."""
    digits = load_digits()
    x, y = digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    if limit is not None and limit < len(y):
        keep, _ = train_test_split(np.arange(len(y)), train_size=limit, stratify=y, random_state=seed)
        x, y = x[np.sort(keep)], y[np.sort(keep)]
    up = F.interpolate(torch.from_numpy(x)[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return up.numpy(), y


def write_split_h5(path: Path, images: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Images, labels and ONE seeded stratified train/test split as a per-sample 'split' tag column (ssl_lab's
    dataset.split_key): pretraining in both libraries reads the train rows only. Returns the train mask."""
    train_idx, _ = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels,
                                    random_state=seed)
    is_train = np.zeros(len(labels), bool)
    is_train[train_idx] = True
    with h5py.File(path, "w") as f:  # a temporary file of this run only
        f["images"] = images
        f["labels"] = labels
        f["split"] = np.where(is_train, b"train", b"test").astype("S5")
    return is_train


# ---------------------------------------------------------------------------------------------------------- probes
@torch.no_grad()
def features(backbone: torch.nn.Module, images: np.ndarray, mean: float, std: float, batch: int = 256) -> torch.Tensor:
    """Frozen features of the un-augmented images, normalised with the data's mean/std, backbone in eval mode."""
    backbone.eval()
    x = (torch.from_numpy(images) - mean) / std
    return torch.cat([backbone(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def probe(backbone: torch.nn.Module, data: dict[str, Any]) -> dict[str, float]:
    feats = features(backbone, data["images"], data["mean"], data["std"])
    tr, te = data["is_train"], ~data["is_train"]
    y = torch.from_numpy(data["labels"])
    return {"knn": knn_accuracy(feats[tr], y[tr], feats[te], y[te], k=KNN_K, temperature=KNN_T),
            "linear": linear_probe_accuracy(feats[tr], y[tr], feats[te], y[te])}


def fresh_backbone(name: str, size: int, seed: int) -> torch.nn.Module:
    """The shared architecture (standard ResNet stem, as digits_probe uses), initialised from ``seed``."""
    torch.manual_seed(seed)
    return build_backbone(name, in_chans=1, image_size=size, small_stem=False)


# -------------------------------------------------------------------------------------------------------- training
def ssl_lab_config(data: dict[str, Any], method: str, args: argparse.Namespace, run_dir: Path):
    overrides = ["accelerator=cpu", "dataset=lens_h5", f"dataset.path={data['path']}", "dataset.label_key=null",
                 "dataset.split_key=split", "dataset.in_memory=true", "dataset.num_workers=0",
                 f"dataset.batch_size={args.batch_size}", f"seed={args.seed}", f"method={method}",
                 f"backbone={args.backbone}", "backbone.small_stem=false", f"optim={args.optim}",
                 f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false",
                 "+trainer.enable_model_summary=false", f"run_dir={run_dir}",
                 *data["augment"]]
    if method == "dino":
        overrides.append(f"method.n_local_crops={args.dino_local_crops}")
    overrides += args.ssl_lab_override
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf"), job_name="peer_check"):
        return compose(config_name="config", overrides=overrides)


def seconds_per_epoch(images_per_s: float | None, steps_per_epoch: int, batch_size: int) -> float | None:
    return None if not images_per_s else steps_per_epoch * batch_size / images_per_s


def run_ssl_lab(data: dict[str, Any], method: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    run_dir = tmp / f"ssl_lab_{data['name']}_{method}"
    cfg = ssl_lab_config(data, method, args, run_dir)
    summary = TASKS["pretrain"](cfg)
    payload = load_backbone_file(run_dir)
    backbone = backbone_from_meta(payload["meta"])
    backbone.load_state_dict(payload["state_dict"])
    optim, _ = scale_lr(OmegaConf.to_container(cfg.optim, resolve=True), args.batch_size)
    steps = int(data["is_train"].sum()) // args.batch_size
    return {**probe(backbone, data), "final_loss": summary["final_loss"], "optim": optim,
            "method_config": OmegaConf.to_container(cfg.method, resolve=True),
            "augment": OmegaConf.to_container(cfg.augment, resolve=True),
            "s_per_epoch": seconds_per_epoch(summary["images_per_s"], steps, args.batch_size)}


def run_lightly(data: dict[str, Any], method: str, args: argparse.Namespace, optim: dict[str, Any]) -> dict[str, Any]:
    size = data["images"].shape[-1]
    backbone = fresh_backbone(args.backbone, size, args.seed)
    train_u8 = np.round(data["images"][data["is_train"], 0] * 255).clip(0, 255).astype(np.uint8)
    out = peer_lightly.train(method, backbone, train_u8, data["mean"], data["std"], epochs=args.epochs,
                             batch_size=args.batch_size, optim=optim, seed=args.seed, flips=data["flips"],
                             n_local=args.dino_local_crops, local_size=max(1, round(size * LOCAL_FRACTION)))
    return {**probe(backbone, data), "final_loss": out["final_loss"],
            "s_per_epoch": seconds_per_epoch(out["images_per_s"], out["steps_per_epoch"], args.batch_size)}


# --------------------------------------------------------------------------------------------------------- reports
def flags(row: dict[str, Any], random: dict[str, float]) -> list[str]:
    """What misses the targets: ssl_lab below lightly - 1 point, or not above random init."""
    out = []
    for metric in ("knn", "linear"):
        ours = row["ssl_lab"][metric]
        if ours < row["lightly"][metric] - MARGIN:
            out.append(f"{metric} < lightly-1")
        if ours <= random[metric]:
            out.append(f"{metric} <= random")
    return out


def table(name: str, result: dict[str, Any]) -> str:
    pct = lambda v: f"{100 * v:5.1f}"  # noqa: E731
    sec = lambda v: "    -" if v is None else f"{v:5.1f}"  # noqa: E731
    rnd = result["random"]
    lines = [f"\n{name}: {result['n_train']} train / {result['n_test']} test images, {result['size']} px",
             f"{'method':<8} | {'ssl_lab kNN  lin':>16} | {'lightly kNN  lin':>16} | {'Δ kNN   lin':>12} | "
             f"{'random kNN  lin':>15} | {'s/epoch ssl_lab lightly ratio':>29} | flags"]
    for method, row in result["methods"].items():
        s, lt = row["ssl_lab"], row["lightly"]
        ratio = (f"{s['s_per_epoch'] / lt['s_per_epoch']:5.2f}" if s["s_per_epoch"] and lt["s_per_epoch"]
                 else "    -")
        lines.append(
            f"{method:<8} | {pct(s['knn'])} {pct(s['linear']):>10} | {pct(lt['knn'])} {pct(lt['linear']):>10} | "
            f"{100 * (s['knn'] - lt['knn']):+5.1f} {100 * (s['linear'] - lt['linear']):+6.1f} | "
            f"{pct(rnd['knn'])} {pct(rnd['linear']):>9} | {sec(s['s_per_epoch']):>15} {sec(lt['s_per_epoch']):>7} "
            f"{ratio:>5} | {', '.join(row['flags']) or 'ok'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------- cli
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help=f"comma-separated, from: {', '.join(DATASETS)} (default: both)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated, from: {', '.join(peer_lightly.METHODS)} (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="pretraining epochs for every run (default 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128")
    parser.add_argument("--backbone", default="resnet18", help="a ResNet (both libraries use the same one)")
    parser.add_argument("--optim", choices=("adam", "sgd"), default="adam",
                        help="ssl_lab's optim config; lightly gets the same family, lr, weight decay and schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lens-per-class", type=int, default=None, help="simulated lenses per class (default 400)")
    parser.add_argument("--dino-local-crops", type=int, default=6,
                        help="DINO's small crops in both libraries (lightly's DINOTransform default: 6)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both libraries (default: torch's)")
    parser.add_argument("--ssl-lab-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for every ssl_lab run, e.g. method.temperature=0.5 (repeatable)")
    parser.add_argument("--out", default="peer_check.json", help="JSON of settings and every number; never replaced")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK['epochs']} epoch, {QUICK['digits']} digits, methods "
                             f"{QUICK['methods']}, batch {QUICK['batch_size']}")
    args = parser.parse_args(argv)
    args.digits_limit = QUICK["digits"] if args.quick else None
    args.data = args.data or (QUICK["data"] if args.quick else ",".join(DATASETS))
    args.methods = args.methods or (QUICK["methods"] if args.quick else ",".join(peer_lightly.METHODS))
    args.epochs = args.epochs or (QUICK["epochs"] if args.quick else 3)
    args.batch_size = args.batch_size or (QUICK["batch_size"] if args.quick else 128)
    args.lens_per_class = args.lens_per_class or (QUICK["lens"] if args.quick else 400)
    for option, names, known in (("--data", args.data, DATASETS), ("--methods", args.methods, peer_lightly.METHODS)):
        unknown = sorted(set(names.split(",")) - set(known))
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(known)}.")
    if min(args.epochs, args.batch_size, args.lens_per_class) < 1 or args.dino_local_crops < 0:
        parser.error("--epochs, --batch-size and --lens-per-class must be >= 1 and --dino-local-crops >= 0.")
    if not args.backbone.startswith("resnet"):
        parser.error(f"--backbone {args.backbone}: use a ResNet (resnet15, resnet18, resnet50); ViTs need other "
                     "heads and transforms on the lightly side.")
    if Path(args.out).exists():
        parser.error(f"--out {args.out} already exists; pass another path or remove it (results are never replaced).")
    return args


def prepare(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    if name == "digits":
        images, labels = digits_data(args.digits_limit, args.seed)
        augment, flips = list(DIGITS_AUGMENT), False  # digits are not flip- or rotation-invariant
    else:
        images, labels = lens_images(args.lens_per_class, image_size=64, seed=args.seed)
        augment, flips = ["augment=physics"], True  # lens_sim's default preset
    path = tmp / f"{name}.h5"
    is_train = write_split_h5(path, images, labels, args.seed)
    if is_train.sum() < args.batch_size:
        raise DataError(f"{name}: {int(is_train.sum())} training images make no full batch of --batch-size "
                        f"{args.batch_size}; lower --batch-size (or raise --lens-per-class).")
    train = images[is_train].astype(np.float64)
    return {"name": name, "path": path, "images": images, "labels": labels, "is_train": is_train,
            "mean": float(train.mean()), "std": float(train.std()), "augment": augment, "flips": flips}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):  # the table is the output; keep warnings only
        logging.getLogger(name).setLevel(logging.WARNING)
    for noise in LIGHTNING_NOISE:
        warnings.filterwarnings("ignore", message=noise)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"ssl_lab": ssl_lab.__version__, "lightly": lightly.__version__, "torch": torch.__version__,
                     "scikit-learn": sklearn.__version__, "python": platform.python_version()},
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "threads": torch.get_num_threads(),
                     "test_fraction": TEST_FRACTION, "knn": {"k": KNN_K, "temperature": KNN_T},
                     "linear_probe": "task=linear defaults (linear_probe.fit_probe), best of the grid on 20 % val",
                     "lightly_recipe": peer_lightly.__doc__.strip()},
        "datasets": {},
    }
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name in args.data.split(","):
            data = prepare(name, args, tmp)
            size = data["images"].shape[-1]
            result = report["datasets"][name] = {
                "n_train": int(data["is_train"].sum()), "n_test": int((~data["is_train"]).sum()), "size": size,
                "mean": data["mean"], "std": data["std"], "ssl_lab_augment": data["augment"],
                "random": probe(fresh_backbone(args.backbone, size, args.seed), data), "methods": {}}
            for method in args.methods.split(","):
                ours = run_ssl_lab(data, method, args, tmp)
                theirs = run_lightly(data, method, args, ours["optim"])
                row = {"ssl_lab": ours, "lightly": theirs}
                row["flags"] = flags(row, result["random"])
                result["methods"][method] = row
                print(f"{name} {method}: ssl_lab kNN {ours['knn']:.3f} linear {ours['linear']:.3f} | lightly kNN "
                      f"{theirs['knn']:.3f} linear {theirs['linear']:.3f} | {', '.join(row['flags']) or 'ok'}",
                      flush=True)
                write_json(args.out, report)  # after every method: a stopped run keeps what it measured
            print(table(name, result), flush=True)
    write_json(args.out, report)
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as err:  # bad input: one line and exit status 2, as ssl_lab's CLI does
        print(f"peer_check: error: {err}", file=sys.stderr)
        sys.exit(2)
