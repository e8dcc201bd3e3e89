"""One call from a run's files to a ready model: the architecture comes from the file's own header, never from a
config the caller has to repeat (the stem, view size, channels and pooling the run used)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ssl_lab.artifacts import load_backbone_file
from ssl_lab.augment import Augment
from ssl_lab.backbones import backbone_from_meta
from ssl_lab.errors import DataError
from ssl_lab.model_file import ExportedModel, load_model_file


class Embedder(nn.Module):
    """Raw images [B, C, H, W] as the data module yields them -> features: the pretraining run's eval view (resize to
    its view size, its normalisation) before the backbone, so a caller cannot feed unnormalised pixels by mistake."""

    def __init__(self, backbone: nn.Module, meta: dict[str, Any]) -> None:
        super().__init__()
        norm = meta.get("norm") or {}
        if not norm.get("mean") or not norm.get("std"):
            raise DataError("backbone file has no normalisation statistics; load it with preprocess=False and "
                            "normalise the images yourself.")
        self.backbone = backbone
        self.header = meta
        self.view = Augment("embedder", {}, n_views=1, size=int(meta["view_size"]))
        self.view.set_stats(norm["mean"], norm["std"])

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(self.view.eval_view(x))


def load_backbone(path: str | Path, preprocess: bool = False) -> nn.Module:
    """The backbone of a pretraining run (its directory or its `backbone.pt`), weights loaded, in eval mode, on the
    CPU. Its header (method, dataset, view size, normalisation, ...) is `model.header`.

    `preprocess=False`: the bare backbone, which expects normalised views of the run's view size;
    `preprocess=True`: an `Embedder` that takes raw images and applies the run's eval view first."""
    payload = load_backbone_file(path)
    meta = dict(payload["meta"])
    backbone = backbone_from_meta(meta)
    try:
        backbone.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise DataError(f"{path}: weights do not fit the {meta.get('name')} architecture its header describes: "
                        f"{str(err).splitlines()[0]}") from None
    backbone.header = meta
    model = Embedder(backbone, meta) if preprocess else backbone
    return model.eval()


def load_model(path: str | Path) -> ExportedModel:
    """A downstream run's trained backbone + heads (its directory or its `model.pt`), in eval mode, on the CPU: raw
    images in, `probs` / `pred` (original units) out."""
    return load_model_file(path)
