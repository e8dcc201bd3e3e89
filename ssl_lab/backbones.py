"""Encoders that take any channel count and return one feature vector per image.

Every backbone carries ``name``, ``in_chans``, ``num_features`` and ``meta()`` so an exported ``backbone.pt`` can be
rebuilt with :func:`backbone_from_meta` without the run's config. Nothing is ever downloaded (random init only).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models import vgg as tv_vgg

from ssl_lab.errors import ConfigError

log = logging.getLogger(__name__)

BACKBONES: tuple[str, ...] = ("resnet15", "resnet18", "resnet50", "vgg11", "vit_tiny", "vit_small")

_RESNET_LAYOUT: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet15": (tv_resnet.BasicBlock, [2, 2, 2, 1]),
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
}
_VIT_TIMM_NAME = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224"}

# Extra keyword arguments each family understands; anything else is a typo we refuse rather than drop.
_ALLOWED_KWARGS: dict[str, frozenset[str]] = {
    "resnet": frozenset({"zero_init_residual"}),
    "vgg": frozenset({"batch_norm"}),
    "vit": frozenset({"patch_size", "drop_path_rate", "drop_rate", "dynamic_img_size", "pool", "depth"}),
}
# How a ViT turns its tokens into one vector: the class token, or the mean of the patch tokens (both after the
# final norm). Pooling has no weights, so a downstream task may read a pretrained ViT either way.
VIT_POOLS: tuple[str, ...] = ("cls", "mean")
VGG_MIN_SIZE = 32  # five 2x2 max-pools
# backbone.small_stem=auto: the 3x3 stride-1 stem keeps 16x more pixels through the network than the 7x7/2 +
# max-pool stem, so it costs ~16x the compute. It is chosen for views of at most SMALL_STEM_MAX_SIZE px (where the
# standard stem would leave a final map of 2x2 or less) when one forward of one view costs at most this many GFLOPs
# on the device the run uses: on a GPU up to about the cost of a ResNet-50 at 224 px, on a CPU a fraction of it.
SMALL_STEM_MAX_SIZE = 64
SMALL_STEM_BUDGET_GFLOPS = {"gpu": 12.0, "cpu": 0.5}


class BackboneMixin:
    """Metadata shared by all backbones, so export and downstream code never special-case a family."""

    name: str
    in_chans: int
    num_features: int
    small_stem: bool
    image_size: int | None
    build_kwargs: dict[str, Any]

    def _set_meta(
        self, name: str, in_chans: int, num_features: int, small_stem: bool, image_size: int | None,
        build_kwargs: Mapping[str, Any],
    ) -> None:
        self.name = name
        self.in_chans = in_chans
        self.num_features = num_features
        self.small_stem = small_stem
        self.image_size = image_size
        self.build_kwargs = dict(build_kwargs)

    def meta(self) -> dict[str, Any]:
        """Plain-python description stored in backbone.pt; ``backbone_from_meta`` rebuilds the same architecture."""
        return {
            "name": self.name,
            "in_chans": int(self.in_chans),
            "num_features": int(self.num_features),
            "small_stem": bool(self.small_stem),
            "image_size": None if self.image_size is None else int(self.image_size),
            "kwargs": dict(self.build_kwargs),
        }


def _init_conv(conv: nn.Conv2d) -> None:
    """Match torchvision's own init so a replaced stem starts like the rest of the network."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ResNetBackbone(BackboneMixin, tv_resnet.ResNet):
    """torchvision ResNet with an ``in_chans`` stem and no classifier: state-dict keys stay torchvision's."""

    def __init__(self, name: str, in_chans: int, small_stem: bool, image_size: int | None,
                 zero_init_residual: bool = False) -> None:
        block, layers = _RESNET_LAYOUT[name]
        super().__init__(block, layers, zero_init_residual=zero_init_residual)
        if small_stem:
            # Small images (<= 64 px) lose too much resolution to a 7x7/2 conv plus max-pool.
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        _init_conv(self.conv1)
        num_features = self.fc.in_features
        self.fc = nn.Identity()
        kwargs = {"zero_init_residual": zero_init_residual} if zero_init_residual else {}
        self._set_meta(name, in_chans, num_features, small_stem, image_size, kwargs)

    def forward_features(self, x: Tensor) -> Tensor:
        """Last spatial feature map [B, F, h, w], for feature-map inspection."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class VGGBackbone(BackboneMixin, nn.Module):
    """VGG-11 conv trunk (``.features``) + global average pool: keeps the spatial map reachable for big heads."""

    def __init__(self, in_chans: int, image_size: int | None, batch_norm: bool = False) -> None:
        super().__init__()
        self.features = tv_vgg.make_layers(tv_vgg.cfgs["A"], batch_norm=batch_norm)
        first = self.features[0]
        self.features[0] = nn.Conv2d(in_chans, first.out_channels, kernel_size=3, padding=1)
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.pool = nn.AdaptiveAvgPool2d(1)
        kwargs = {"batch_norm": True} if batch_norm else {}
        self._set_meta("vgg11", in_chans, 512, False, image_size, kwargs)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class TimmBackbone(BackboneMixin, nn.Module):
    """A timm VisionTransformer with ``num_classes=0``, wrapped to carry our metadata and pool its tokens itself.

    timm's own ``global_pool='avg'`` would replace ``norm`` by ``fc_norm`` and so change the state-dict keys; we keep
    timm's token-pool layout (final ``norm`` on every token) and pick cls or mean here, so one set of weights serves
    both poolings.
    """

    def __init__(self, name: str, in_chans: int, image_size: int, pool: str = "cls", **timm_kwargs: Any) -> None:
        super().__init__()
        import timm  # local: timm import is slow and only ViTs need it

        self.model = timm.create_model(
            _VIT_TIMM_NAME[name], pretrained=False, num_classes=0, in_chans=in_chans, img_size=image_size,
            **timm_kwargs,
        )
        self.pool = pool
        self._set_meta(name, in_chans, int(self.model.num_features), False, image_size,
                       {**timm_kwargs, "pool": pool})

    def no_weight_decay(self) -> set[str]:
        """Position embeddings and class tokens are not decayed (timm's own list)."""
        return set(self.model.no_weight_decay())

    def forward_features(self, x: Tensor) -> Tensor:
        """All tokens after the final norm, [B, prefix + patches, D] (prefix: the class token)."""
        return self.model.forward_features(x)

    def pool_tokens(self, tokens: Tensor) -> Tensor:
        """[B, T, D] tokens -> [B, D] with this backbone's pooling ('mean' skips the class token)."""
        pooled = self.model.pool(tokens, pool_type="token" if self.pool == "cls" else "avg")
        return self.model.head_drop(self.model.fc_norm(pooled))  # fc_norm is Identity in token-pool layout

    def forward(self, x: Tensor) -> Tensor:
        return self.pool_tokens(self.model.forward_features(x))


def _family(name: str) -> str:
    return "resnet" if name.startswith("resnet") else "vgg" if name.startswith("vgg") else "vit"


def _check_common(name: str, in_chans: Any, small_stem: Any, image_size: Any) -> None:
    if name not in BACKBONES:
        raise ConfigError(f"Unknown backbone '{name}'; choose one of: {', '.join(BACKBONES)} (backbone.name).")
    if in_chans is None or isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ConfigError(
            f"Backbone '{name}' needs a positive integer in_chans, got {in_chans!r}; "
            "set dataset.in_chans to the number of image channels (e.g. dataset.in_chans=1)."
        )
    if not (isinstance(small_stem, bool) or small_stem == "auto"):
        raise ConfigError(f"backbone.small_stem must be true, false or 'auto', got {small_stem!r}.")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size must be a positive integer or null, got {image_size!r}.")


def build_backbone(name: str, in_chans: int, small_stem: bool | str = "auto", image_size: int | None = None,
                   **kwargs: Any) -> nn.Module:
    """Build a randomly initialised encoder mapping [B, in_chans, H, W] to [B, num_features].

    ``small_stem="auto"`` picks the 3x3 stride-1 stem without max-pool by its cost (`choose_small_stem`, for the
    GPU when there is one; the tasks pass the device the run uses). ResNets only. Every bad argument raises
    ConfigError before any weights are allocated.
    """
    _check_common(name, in_chans, small_stem, image_size)
    family = _family(name)
    unknown = sorted(set(kwargs) - _ALLOWED_KWARGS[family])
    if unknown:
        allowed = ", ".join(sorted(_ALLOWED_KWARGS[family])) or "none"
        raise ConfigError(
            f"Backbone '{name}' does not accept option(s) {', '.join(unknown)}; accepted extra options: {allowed}. "
            "Remove them from the backbone config."
        )
    if family != "resnet" and small_stem is True:
        raise ConfigError(f"backbone.small_stem=true only applies to ResNets, not '{name}'; set it to auto or false.")

    if family == "resnet":
        if not isinstance(small_stem, bool):
            small_stem, why = choose_small_stem(name, in_chans, image_size, on_gpu=torch.cuda.is_available())
            log.info("backbone.small_stem=auto -> %s: %s", str(small_stem).lower(), why)
        return ResNetBackbone(name, in_chans, small_stem, image_size, **kwargs)

    if family == "vgg":
        if image_size is not None and image_size < VGG_MIN_SIZE:
            raise ConfigError(
                f"vgg11 needs images of at least {VGG_MIN_SIZE} px (five 2x2 max-pools), got image_size={image_size}; "
                "use a ResNet backbone or larger images."
            )
        return VGGBackbone(in_chans, image_size, **kwargs)

    size = 224 if image_size is None else image_size
    patch = kwargs.pop("patch_size", None)
    if patch is None:  # config default: pick by view size
        patch = 16 if size >= 96 else 8
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 or size % patch != 0:
        divisors = [p for p in (4, 8, 14, 16, 32) if size % p == 0]
        hint = f"e.g. backbone.patch_size={divisors[-1]}" if divisors else "or resize images to a multiple of 8"
        raise ConfigError(
            f"{name}: image_size={size} is not divisible by patch_size={patch!r}; set backbone.patch_size to a "
            f"divisor of the image size ({hint})."
        )
    pool = kwargs.pop("pool", None) or "cls"
    if pool not in VIT_POOLS:
        raise ConfigError(f"backbone.pool={pool!r} is not a ViT pooling; choose one of: {', '.join(VIT_POOLS)} "
                          "(cls: the class token, mean: the mean of the patch tokens).")
    depth = kwargs.get("depth")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ConfigError(f"backbone.depth={depth!r}: the number of transformer blocks must be a positive integer "
                          "(or leave it out for the model's own depth).")
    if depth is None:
        kwargs.pop("depth", None)
    return TimmBackbone(name, in_chans, size, pool=pool, patch_size=patch, **kwargs)


def forward_gflops(name: str, in_chans: int, small_stem: bool, image_size: int) -> float:
    """GFLOPs of one forward pass of one image, counted by torch's FlopCounterMode on the meta device (no memory,
    no compute: milliseconds)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = ResNetBackbone(name, in_chans, small_stem, image_size).eval()
        x = torch.empty(1, in_chans, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops() / 1e9


def choose_small_stem(name: str, in_chans: int, image_size: int | None, on_gpu: bool) -> tuple[bool, str]:
    """Whether a ResNet gets the small-image stem, and why in words: by what it costs on this device, not by the
    image size alone (on a laptop CPU the small stem at 64 px turns a 2-minute run into a 30-minute one)."""
    if image_size is None or image_size > SMALL_STEM_MAX_SIZE:
        return False, (f"views of {image_size or 'unknown'} px (> {SMALL_STEM_MAX_SIZE}) keep enough resolution "
                       "through the standard 7x7/2 stem")
    device = "gpu" if on_gpu else "cpu"
    budget = SMALL_STEM_BUDGET_GFLOPS[device]
    small = forward_gflops(name, in_chans, True, image_size)
    standard = forward_gflops(name, in_chans, False, image_size)
    cost = (f"the 3x3/1 stem costs {small:.2f} GFLOPs per {image_size} px view ({small / standard:.0f}x the "
            f"standard stem's {standard:.2f}), budget on the {device.upper()} {budget:g}")
    if small <= budget:
        return True, cost
    return False, f"{cost}: standard 7x7/2 stem (backbone.small_stem=true forces the small one)"


def backbone_from_meta(meta: Mapping[str, Any]) -> nn.Module:
    """Rebuild the architecture described by ``Backbone.meta()`` (weights are loaded separately)."""
    try:
        return build_backbone(meta["name"], meta["in_chans"], small_stem=meta["small_stem"],
                              image_size=meta["image_size"], **meta.get("kwargs", {}))
    except KeyError as err:
        raise ConfigError(f"Backbone metadata lacks key {err}; it was not written by ssl_lab's export.") from None
