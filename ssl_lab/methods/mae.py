"""MAE (He et al. 2022): hide most patches of one view, encode the rest, and reconstruct the hidden pixels.

The encoder is the backbone's own timm ViT run on the visible tokens only, so the exported backbone is the encoder
alone and reads full, unmasked images downstream. The decoder is small and thrown away after pretraining.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ssl_lab.augment import Augment
from ssl_lab.errors import ConfigError
from ssl_lab.losses import mae_loss, patchify
from ssl_lab.methods.base import SSLMethod


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position codes [grid_h * grid_w, dim], row-major like the patch tokens: a quarter
    of the channels each for sin(row), cos(row), sin(col), cos(col) at geometric frequencies 1 .. 1/10000."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                                indexing="ij")
    y, x = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1).float()


def random_masking(batch: int, n: int, n_keep: int, generator: torch.Generator, device: torch.device
                   ) -> tuple[Tensor, Tensor]:
    """An independent random subset of ``n_keep`` of the ``n`` patches per sample (argsort of uniform noise).

    Returns the kept indices [B, n_keep] in ascending order, and the mask [B, n] with 1 = hidden, 0 = visible.
    Sorting changes nothing for the encoder (positions are added before tokens are dropped; attention does not
    care about order) and lets the decoder put tokens back with one scatter."""
    noise = torch.rand(batch, n, generator=generator, device=generator.device)
    keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values.to(device)
    mask = torch.ones(batch, n, device=device).scatter(1, keep, 0.0)
    return keep, mask


def _vit_of(backbone: nn.Module) -> VisionTransformer:
    vit = getattr(backbone, "model", None)
    if not isinstance(vit, VisionTransformer):
        name = getattr(backbone, "name", type(backbone).__name__)
        raise ConfigError(f"method=mae needs a ViT backbone: pass backbone=vit_tiny or vit_small (got {name}); "
                          "it drops patch tokens, which a convolutional network has no notion of.")
    if vit.pos_embed is None:
        raise ConfigError("method=mae needs a ViT with absolute position embeddings (the encoder must know where "
                          "each visible patch sits).")
    if not isinstance(vit.patch_drop, nn.Identity):
        raise ConfigError("method=mae masks patches itself; build the ViT without patch dropout.")
    return vit


def _positive_int(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"method.{option}={value!r} must be a positive integer.")
    return value


class MAE(SSLMethod):
    def __init__(self, name: str, backbone: nn.Module, augment: Augment, optim: Mapping[str, Any],
                 mask_ratio: float = 0.75, decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4,
                 norm_pix_loss: bool = True, seed: int = 0):
        super().__init__(name, backbone, augment, optim, seed)
        vit = _vit_of(backbone)
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 < mask_ratio < 1:
            raise ConfigError(f"method.mask_ratio={mask_ratio!r} must lie strictly between 0 and 1 (the fraction of "
                              "patches hidden; the paper uses 0.75).")
        decoder_dim = _positive_int(decoder_dim, "decoder_dim")
        decoder_heads = _positive_int(decoder_heads, "decoder_heads")
        decoder_depth = _positive_int(decoder_depth, "decoder_depth")
        if decoder_dim % 4 or decoder_dim % decoder_heads:
            raise ConfigError(f"method.decoder_dim={decoder_dim} must be a multiple of 4 (2-D sine-cosine positions) "
                              f"and of method.decoder_heads={decoder_heads}.")
        ph, pw = vit.patch_embed.patch_size
        if ph != pw:
            raise ConfigError(f"method=mae needs square patches, got {ph}x{pw}.")
        self.patch = int(ph)
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.n_patches = self.grid[0] * self.grid[1]
        self.n_keep = int(self.n_patches * (1 - float(mask_ratio)))
        if not 0 < self.n_keep < self.n_patches:
            raise ConfigError(f"method.mask_ratio={mask_ratio} keeps {self.n_keep} of the {self.n_patches} patches; "
                              "choose a ratio that keeps at least one patch and hides at least one.")
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)

        dim, chans = int(vit.embed_dim), int(vit.patch_embed.proj.in_channels)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed sine-cosine decoder positions (the paper's choice): the decoder must place every hidden patch
        # from the first step, and fixed codes need no learning and no weights in the checkpoint. The encoder keeps
        # the timm ViT's learned position embedding, which the exported backbone needs downstream anyway.
        self.register_buffer("decoder_pos", sincos_2d(*self.grid, decoder_dim).unsqueeze(0), persistent=False)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_pred):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def make_views(self, x: Tensor, generator: torch.Generator) -> list[Tensor]:
        return self.augment(x, generator=generator, n_views=1)

    # ---- encoder: the backbone's own modules, on the visible tokens ---------------------------------------------
    def encode(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """[B, C, H, W] -> tokens [B, prefix + K, D] for the patches ``keep`` [B, K] (None: all, in order).

        The same steps as timm's ``forward_features``, with patches dropped after their positions are added; with
        ``keep=None`` it is exactly ``backbone.forward_features``."""
        vit = self.backbone.model
        tokens = vit.patch_embed(x)
        if tokens.ndim == 4:  # dynamic_img_size: patch_embed leaves [B, h, w, D]
            tokens = tokens.flatten(1, 2)
        b, n, d = tokens.shape
        pos = vit.pos_embed
        n_pos_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens  # prefix tokens with their own position
        if pos.shape[1] - n_pos_prefix != n:
            raise ValueError(f"MAE.encode: {n} patch tokens but {pos.shape[1] - n_pos_prefix} positions; feed views "
                             "of the size the backbone was built for.")
        tokens = tokens + pos[:, n_pos_prefix:]
        if keep is not None:
            tokens = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, d))
        prefix = [t.expand(b, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if prefix:
            first = torch.cat(prefix, dim=1)
            if n_pos_prefix:
                first = first + pos[:, :n_pos_prefix]
            tokens = torch.cat([first, tokens], dim=1)
        tokens = vit.norm_pre(vit.pos_drop(tokens))
        return vit.norm(vit.blocks(tokens))

    # ---- decoder: visible tokens + mask tokens at every position -> pixels of each patch -------------------------
    def decode(self, latent: Tensor, keep: Tensor) -> Tensor:
        """Encoder tokens [B, prefix + K, D] -> predicted pixels [B, N, patch * patch * C] (``patchify`` layout)."""
        n_prefix = self.backbone.model.num_prefix_tokens
        z = self.decoder_embed(latent)
        b, _, d = z.shape
        prefix, visible = z[:, :n_prefix], z[:, n_prefix:]
        full = self.mask_token.to(z.dtype).expand(b, self.n_patches, d)
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), visible) + self.decoder_pos.to(z.dtype)
        z = self.decoder_norm(self.decoder_blocks(torch.cat([prefix, full], dim=1)))
        return self.decoder_pred(z[:, n_prefix:])

    def loss(self, views):
        if self.step_rng is None:
            raise RuntimeError("MAE.loss draws its masks from self.step_rng, which on_after_batch_transfer sets; "
                               "set it (ssl_lab.augment.step_generator) when calling loss directly.")
        x = views[0]
        keep, mask = random_masking(x.shape[0], self.n_patches, self.n_keep, self.step_rng, x.device)
        pred = self.decode(self.encode(x, keep), keep)
        return mae_loss(pred, patchify(x, self.patch), mask, norm_pix=self.norm_pix_loss), {}
