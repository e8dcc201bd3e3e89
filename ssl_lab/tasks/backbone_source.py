"""Where a downstream task's backbone comes from: a pretraining run's `backbone.pt`, or random initialisation."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ssl_lab.artifacts import load_backbone_file
from ssl_lab.backbones import backbone_from_meta
from ssl_lab.config import view_size
from ssl_lab.errors import ConfigError
from ssl_lab.tasks.common import build_cfg_backbone

log = logging.getLogger(__name__)


@dataclass
class BackboneSource:
    backbone: nn.Module
    view_size: int
    mean: torch.Tensor
    std: torch.Tensor
    pretrained: str | None  # the file it came from; None for random initialisation
    meta: dict[str, Any]


def load_backbone(cfg: DictConfig, datamodule: Any, require_pretrained: bool) -> BackboneSource:
    """`pretrained=<run dir or backbone.pt>` loads weights, view size and normalisation from pretraining;
    `pretrained=random` (or task=supervised) builds cfg.backbone from scratch with the data's own statistics."""
    choice = cfg.get("pretrained")
    if choice in (None, "random"):
        if choice is None and require_pretrained:
            raise ConfigError(
                f"task={cfg.task.name} needs a pretrained backbone: pass pretrained=<pretraining run dir or its "
                "backbone.pt>, or pretrained=random for a random-initialised baseline."
            )
        size = view_size(cfg, datamodule.image_shape)
        backbone = build_cfg_backbone(cfg, size)
        return BackboneSource(backbone, size, datamodule.mean, datamodule.std, None, backbone.meta())
    payload = load_backbone_file(choice)
    meta = payload["meta"]
    path = str(Path(choice) / "backbone.pt") if Path(choice).is_dir() else str(choice)
    if meta["name"] != cfg.backbone.name:
        raise ConfigError(f"{path} holds a {meta['name']} backbone but backbone={cfg.backbone.name}; "
                          f"pass backbone={meta['name']} (or another pretrained file).")
    if int(meta["in_chans"]) != int(datamodule.in_chans):
        raise ConfigError(f"{path} was pretrained on {meta['in_chans']}-channel images but dataset "
                          f"{cfg.dataset.name} has {datamodule.in_chans}; use a backbone pretrained on this data "
                          "or set dataset.in_chans to match.")
    requested = _with_requested_pool(meta, cfg.backbone.get("pool"))
    backbone = backbone_from_meta(requested)
    try:
        backbone.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"{path}: weights do not fit the {meta['name']} architecture: {err}") from None
    if requested is not meta:
        pool, before = requested["kwargs"]["pool"], (meta.get("kwargs") or {}).get("pool", "cls")
        log.info("backbone.pool=%s: reading %s with %s pooling (pretrained with pool=%s); weights unchanged",
                 pool, path, pool, before)
        meta = requested
    norm = meta.get("norm") or {}
    mean = torch.tensor(norm.get("mean", datamodule.mean.tolist()), dtype=torch.float32)
    std = torch.tensor(norm.get("std", datamodule.std.tolist()), dtype=torch.float32)
    size = int(meta.get("view_size") or view_size(cfg, datamodule.image_shape))
    log.info("backbone %s from %s (pretrained with %s on %s)", meta["name"], path, meta.get("method"),
             meta.get("dataset"))
    return BackboneSource(backbone, size, mean, std, path, meta)


def _with_requested_pool(meta: dict[str, Any], pool: str | None) -> dict[str, Any]:
    """A ViT's pooling has no weights, so the downstream task's `backbone.pool` may differ from pretraining's:
    e.g. MAE never trains the class token as a readout, and a probe may do better on mean-pooled patch tokens."""
    kwargs = meta.get("kwargs") or {}
    # backbone.pt files written before `pool` existed were read by the class token.
    before = kwargs.get("pool", "cls" if str(meta["name"]).startswith("vit") else None)
    if pool is None or pool == before:
        return meta
    return {**meta, "kwargs": {**kwargs, "pool": pool}}  # a bad value, or a non-ViT, is refused by build_backbone
