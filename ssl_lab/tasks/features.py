"""Frozen-backbone features of the labelled splits, computed once per run on the run's device (task=linear and
task=evaluate read the same features the same way)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from ssl_lab.augment import step_generator
from ssl_lab.data.base import worker_init
from ssl_lab.evaluation.linear_probe import FeatureSet, concat, extract_features
from ssl_lab.speed import uses_cuda

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def ordered_loader(datamodule: Any, dataset: Dataset, device: torch.device) -> DataLoader:
    """Every sample once, in split order: features need no shuffle and must not lose a ragged last batch."""
    return DataLoader(dataset, batch_size=datamodule.batch_size, shuffle=False, num_workers=datamodule.num_workers,
                      pin_memory=device.type == "cuda", worker_init_fn=worker_init)


def probe_device(cfg: DictConfig) -> torch.device:
    return torch.device("cuda") if uses_cuda(cfg.accelerator.accelerator) else torch.device("cpu")


def augmented_view(augment: Any, seed: int, offset: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A seeded training view per batch (batch i of pass p draws from step offset + i), so passes are repeatable."""
    calls = iter(range(offset, 1 << 62))

    def view(x: torch.Tensor) -> torch.Tensor:
        return augment(x, generator=step_generator(seed, next(calls), 0, x.device))[0]

    return view


def split_features(run: Any, device: torch.device, autocast: torch.dtype | None, aug_passes: int = 0
                   ) -> dict[str, FeatureSet]:
    """train (un-augmented, then ``aug_passes`` augmented passes), train_eval (un-augmented only: the kNN bank),
    val and test features, each from one pass of the frozen backbone (a ``LabelledRun``'s)."""
    dm, backbone, augment = run.datamodule, run.source.backbone, run.augment
    augment.to(device)
    eval_view = augment.eval_view
    feats = {name: extract_features(backbone, eval_view, ordered_loader(dm, ds, device), device, autocast)
             for name, ds in (("train_eval", dm.train_set), ("val", dm.val_set), ("test", dm.test_set))}
    passes = int(aug_passes)
    extra = [extract_features(backbone, augmented_view(augment, run.cfg.seed, p * len(dm.train_set)),
                              ordered_loader(dm, dm.train_set, device), device, autocast) for p in range(passes)]
    feats["train"] = concat([feats["train_eval"], *extra]) if extra else feats["train_eval"]
    return feats


def autocast_dtype(precision: str) -> torch.dtype | None:
    return AUTOCAST.get(precision)
