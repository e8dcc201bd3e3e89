"""A trained downstream model as one portable file, `model.pt`: backbone + head + what prediction needs.

A fine-tuned or probed model is only useful outside its run if it can be loaded without the run's config: the file
holds the backbone's meta (architecture, in_chans, view size, normalisation), both state dicts, a head spec the head
is rebuilt from, the class and target names and the target statistics. It loads with ``torch.load(...,
weights_only=True)`` (plain python and tensors only), and `load_model_file` returns a module that maps raw images,
in the units the data module yields, to probabilities and regression predictions in original units.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ssl_lab.artifacts import atomic_write, load_payload, run_file
from ssl_lab.augment import Augment
from ssl_lab.backbones import backbone_from_meta
from ssl_lab.errors import DataError
from ssl_lab.heads import conv_map_mlp, mlp

MODEL_FORMAT = "ssl_lab.model"
MODEL_VERSION = 1
HEAD_KINDS = ("probe", "linear", "mlp", "conv_mlp")


def build_head(spec: Mapping[str, Any]) -> nn.Module:
    """The head a spec describes: `probe` (standardisation without affine + one linear layer, task=linear),
    `linear`/`mlp` (heads.mlp on pooled features), `conv_mlp` (the VGG head on the last conv map)."""
    kind = spec.get("kind")
    if kind == "probe":
        return nn.Sequential(nn.BatchNorm1d(spec["in_features"], affine=False), nn.Linear(spec["in_features"],
                                                                                          spec["n_out"]))
    if kind in ("linear", "mlp"):
        return mlp(spec["in_features"], list(spec.get("hidden_dims") or []), spec["n_out"])
    if kind == "conv_mlp":
        return conv_map_mlp(spec["in_features"], spec["n_out"], dropout=float(spec.get("dropout", 0.0)))
    raise DataError(f"model file: unknown head kind {kind!r}; this ssl_lab reads {', '.join(HEAD_KINDS)}.")


def save_model_file(path: str | Path, backbone: nn.Module, backbone_meta: Mapping[str, Any], head: nn.Module,
                    head_spec: Mapping[str, Any], info: Mapping[str, Any]) -> Path:
    """`info`: objective, class_names, target_names, target_mean/std (lists or None), task, chosen settings."""
    if head_spec.get("kind") not in HEAD_KINDS:
        raise DataError(f"save_model_file: head kind {head_spec.get('kind')!r} is not one of {HEAD_KINDS}.")
    payload = {
        "format": MODEL_FORMAT, "version": MODEL_VERSION,
        "backbone": {"meta": dict(backbone_meta),
                     "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()}},
        "head": {"spec": dict(head_spec), "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}},
        "info": dict(info),
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


class ExportedModel(nn.Module):
    """Raw images [B, C, H, W] (uint8 or float, as the data module yields them) -> a dict with `logits` and
    `probs` (classification) and `pred` (regression, original units). Resizing and normalisation are the eval
    view of the run that trained it."""

    def __init__(self, backbone: nn.Module, head: nn.Module, spec: Mapping[str, Any], info: Mapping[str, Any],
                 view_size: int, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.spec, self.info = dict(spec), dict(info)
        self.view = Augment("model_file", {}, n_views=1, size=int(view_size))
        self.view.set_stats(mean, std)
        self.n_classes = len(info.get("class_names") or []) if info.get("objective") != "regression" else 0
        t_mean, t_std = info.get("target_mean"), info.get("target_std")
        self.register_buffer("target_mean", torch.tensor(t_mean or [], dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(t_std or [], dtype=torch.float32))

    @property
    def class_names(self) -> list[str]:
        return list(self.info.get("class_names") or [])

    @property
    def target_names(self) -> list[str]:
        return list(self.info.get("target_names") or [])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        v = self.view.eval_view(x)
        feats = self.backbone.forward_features(v) if self.spec["kind"] == "conv_mlp" else self.backbone(v)
        out = self.head(feats).float()
        result: dict[str, Tensor] = {}
        if self.n_classes:
            result["logits"] = out[:, : self.n_classes]
            result["probs"] = result["logits"].softmax(1)
        if self.target_mean.numel():
            result["pred"] = out[:, self.n_classes:] * self.target_std + self.target_mean
        return result


def load_model_file(path: str | Path) -> ExportedModel:
    """Read and check a `model.pt` (or the run directory holding one); the model is in eval mode, on the CPU."""
    path = run_file(path, "model.pt", "model file; downstream runs (task=linear, finetune, joint, supervised) "
                                      "write <run_dir>/model.pt")
    payload = load_payload(path, MODEL_FORMAT, MODEL_VERSION, "model file",
                           "a backbone.pt goes to pretrained=, a model.pt comes from a downstream run")
    meta = payload["backbone"]["meta"]
    backbone = backbone_from_meta(meta)
    head = build_head(payload["head"]["spec"])
    try:
        backbone.load_state_dict(payload["backbone"]["state_dict"])
        head.load_state_dict(payload["head"]["state_dict"])
    except RuntimeError as err:
        raise DataError(f"{path}: weights do not fit the architecture the file describes: {err}") from None
    norm = meta.get("norm") or {}
    model = ExportedModel(backbone, head, payload["head"]["spec"], payload["info"], meta["view_size"],
                          norm["mean"], norm["std"])
    return model.eval()
