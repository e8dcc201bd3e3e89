"""MAE: pixel targets and loss by hand, per-sample masks from the step generator, the encoder is the exported
backbone, ViT token pooling, config errors, a tiny learning check, and CLI pretraining + a downstream probe."""
from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import run_cli, tiny_data

from ssl_lab.artifacts import load_backbone_file
from ssl_lab.augment import Augment, step_generator
from ssl_lab.backbones import backbone_from_meta, build_backbone
from ssl_lab.errors import ConfigError
from ssl_lab.losses import mae_loss, patchify
from ssl_lab.methods.mae import MAE, random_masking

OPTIM = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant"}
SMALL_DECODER = {"decoder_dim": 64, "decoder_heads": 2, "decoder_depth": 1}


def tiny_vit(in_chans: int = 1, size: int = 16, patch: int = 4, depth: int = 1, **kw):
    return build_backbone("vit_tiny", in_chans, image_size=size, patch_size=patch, depth=depth, **kw)


def tiny_mae(backbone=None, **kw) -> MAE:
    backbone = tiny_vit() if backbone is None else backbone
    augment = Augment("minimal", {"hflip": {"p": 0.5}}, size=backbone.image_size)
    return MAE("mae", backbone, augment, OPTIM, **{**SMALL_DECODER, **kw})


# ---- (1) patchify and the loss, by hand ---------------------------------------------------------------------------
def test_patchify_orders_patches_row_major_and_pixels_dy_dx_c():
    x = torch.arange(32.0).reshape(1, 2, 4, 4)  # channel 1 = channel 0 + 16
    rows = patchify(x, 2)
    assert rows.shape == (1, 4, 8)
    assert rows[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]  # grid (0, 1): rows 0-1, columns 2-3
    assert rows[0, 2].tolist() == [8, 24, 9, 25, 12, 28, 13, 29]  # grid (1, 0): rows 2-3, columns 0-1


def test_patchify_row_n_is_timm_token_n():
    # timm's patch embedding is a patch-sized conv: token n must be a linear map of patchify row n alone.
    vit = tiny_vit(in_chans=3, size=16, patch=4).model
    x = torch.randn(2, 3, 16, 16)
    w = vit.patch_embed.proj.weight  # [D, C, p, p] -> [D, p * p * C] in (dy, dx, c) order
    expected = patchify(x, 4) @ w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).T + vit.patch_embed.proj.bias
    torch.testing.assert_close(vit.patch_embed(x), expected, rtol=1e-4, atol=1e-5)


def test_mae_loss_counts_only_masked_patches():
    target = torch.tensor([[[1.0, 3.0], [0.0, 0.0], [2.0, 6.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    pred = torch.zeros(1, 3, 2)
    # Masked patches: mean((1, 9)) = 5 and mean((4, 36)) = 20 -> 12.5; the visible patch does not count.
    assert mae_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(12.5)
    pred[0, 1] = 100.0
    assert mae_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(12.5)


def test_mae_loss_norm_pix_standardises_each_patch():
    target = torch.tensor([[[1.0, 3.0], [0.0, 0.0], [2.0, 6.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    # (1, 3): mean 2, unbiased var 2 -> (-1, 1)/sqrt(2); (2, 6): mean 4, var 8 -> the same standardised patch.
    # The flat visible patch (variance 0) is standardised to 0 by eps and does not count anyway.
    eps = 1e-12
    assert mae_loss(torch.zeros(1, 3, 2), target, mask, eps=eps).item() == pytest.approx(0.5)
    exact = torch.tensor([-1.0, 1.0]) / math.sqrt(2)
    pred = exact.expand(1, 3, 2)
    assert mae_loss(pred, target, mask, eps=eps).item() == pytest.approx(0.0, abs=1e-10)
    assert mae_loss(pred, 10 * target + 7, mask, eps=eps).item() == pytest.approx(0.0, abs=1e-10)
    assert mae_loss(pred, target, mask).item() == pytest.approx(0.0, abs=1e-5)  # default eps 1e-6: close
    with pytest.raises(ValueError, match=r"mask \[B, N\]"):
        mae_loss(pred, target, mask[:, :2])
    with pytest.raises(ValueError, match="eps > 0"):
        mae_loss(pred, target, mask, eps=0.0)


# ---- (2) masks ----------------------------------------------------------------------------------------------------
def test_masks_keep_the_right_count_per_sample_and_repeat_for_the_same_step():
    keep, mask = random_masking(8, 16, 4, step_generator(0, 5, 0, torch.device("cpu")), torch.device("cpu"))
    assert keep.shape == (8, 4) and mask.shape == (8, 16)
    assert (mask.sum(1) == 12).all()  # 12 hidden, 4 visible in every sample
    assert (mask.gather(1, keep) == 0).all() and all(len(set(k.tolist())) == 4 for k in keep)
    assert len({tuple(k.tolist()) for k in keep}) > 1  # each sample draws its own mask
    again, _ = random_masking(8, 16, 4, step_generator(0, 5, 0, torch.device("cpu")), torch.device("cpu"))
    other, _ = random_masking(8, 16, 4, step_generator(0, 6, 0, torch.device("cpu")), torch.device("cpu"))
    assert torch.equal(keep, again) and not torch.equal(keep, other)


def test_loss_draws_masks_from_the_step_generator_not_the_global_rng():
    model = tiny_mae().eval()
    x = torch.randn(4, 1, 16, 16)
    model.step_rng = step_generator(0, 3, 0, x.device)
    state = torch.get_rng_state()
    first = model.loss([x])[0]
    assert torch.equal(torch.get_rng_state(), state)
    model.step_rng = step_generator(0, 3, 0, x.device)
    assert torch.equal(model.loss([x])[0], first)
    assert model.n_keep == 4  # int(16 * (1 - 0.75))


# ---- (3) the encoder is the exported backbone -----------------------------------------------------------------------
def test_encoder_on_all_tokens_is_the_backbones_plain_forward():
    torch.manual_seed(0)
    model = tiny_mae(tiny_vit(in_chans=3, size=32, patch=8, depth=2)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.encode(x)
        assert torch.equal(tokens, model.backbone.forward_features(x))
        assert torch.equal(model.backbone.pool_tokens(tokens), model.backbone(x))
        # On a subset, hidden patches cannot leak into the encoding.
        keep = torch.tensor([[0, 5, 9, 15]] * 3)
        y = x.clone()
        y[:, :, :8, 8:16] = 100.0  # patch 1, hidden
        assert torch.equal(model.encode(x, keep), model.encode(y, keep))
        assert model.encode(x, keep).shape == (3, 1 + 4, 192)
    # The backbone holds no decoder weights: backbone.pt has exactly a plain ViT's keys.
    assert model.backbone.state_dict().keys() == tiny_vit(in_chans=3, size=32, patch=8, depth=2).state_dict().keys()


# ---- (4) ViT pooling ----------------------------------------------------------------------------------------------
def test_vit_pool_cls_or_mean_reads_the_same_weights():
    torch.manual_seed(0)
    cls = tiny_vit(in_chans=2, depth=2).eval()
    mean = tiny_vit(in_chans=2, depth=2, pool="mean").eval()
    assert cls.state_dict().keys() == mean.state_dict().keys()
    mean.load_state_dict(cls.state_dict())
    x = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        tokens = cls.forward_features(x)
        torch.testing.assert_close(cls(x), tokens[:, 0])
        torch.testing.assert_close(mean(x), tokens[:, 1:].mean(1))
    assert not torch.allclose(cls(x), mean(x))
    assert (cls.meta()["kwargs"]["pool"], mean.meta()["kwargs"]["pool"]) == ("cls", "mean")
    assert backbone_from_meta(mean.meta()).pool == "mean" and len(mean.model.blocks) == 2
    with pytest.raises(ConfigError, match="backbone.pool='max'"):
        tiny_vit(pool="max")
    with pytest.raises(ConfigError, match="backbone.depth=0"):
        tiny_vit(depth=0)


# ---- (5) config errors --------------------------------------------------------------------------------------------
def test_mae_refuses_non_vit_backbones_and_bad_options():
    with pytest.raises(ConfigError, match="method=mae needs a ViT backbone: pass backbone=vit_tiny or vit_small"):
        tiny_mae(build_backbone("resnet15", 1, image_size=16))
    for ratio in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ConfigError, match=f"method.mask_ratio={ratio}"):
            tiny_mae(mask_ratio=ratio)
    with pytest.raises(ConfigError, match="keeps 0 of the 16 patches"):
        tiny_mae(mask_ratio=0.99)
    with pytest.raises(ConfigError, match="method.decoder_dim=66"):
        tiny_mae(decoder_dim=66)


# ---- (6) learning -------------------------------------------------------------------------------------------------
def blobs(n: int = 64, size: int = 16) -> torch.Tensor:
    """Gaussian blobs of random place and width: hidden patches are predictable from the visible ones."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    centre = torch.rand(n, 2, 1, 1, generator=g) * size
    width = 2 + 3 * torch.rand(n, 1, 1, generator=g)
    return torch.exp(-((yy - centre[:, 0]) ** 2 + (xx - centre[:, 1]) ** 2) / (2 * width**2)).unsqueeze(1)


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_loss_falls_below_the_flat_patch_baseline():
    pl.seed_everything(0)
    model = tiny_mae()
    loader = torch.utils.data.DataLoader([{"x": x} for x in blobs()], batch_size=32, shuffle=True, drop_last=True)
    recorder = LossRecorder()
    pl.Trainer(accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[recorder]).fit(model, loader)
    first, last = sum(recorder.losses[:5]) / 5, sum(recorder.losses[-5:]) / 5
    assert last < first, recorder.losses
    # Predicting each hidden patch as flat (its own mean) scores (D - 1) / D = 15/16 with norm_pix; below it, the
    # model predicts shapes from the visible patches.
    assert last < 0.9, recorder.losses


# ---- (7) the CLI --------------------------------------------------------------------------------------------------
MAE_TINY = [
    "accelerator=cpu", "method=mae", "backbone=vit_tiny", "backbone.depth=2", "backbone.patch_size=8",
    "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "dataset.batch_size=8", "dataset.num_workers=0",
    "method.decoder_dim=32", "method.decoder_heads=2", "method.decoder_depth=1",
]


@pytest.mark.slow
@pytest.mark.parametrize("dataset,chans", [("lens_sim", 1), ("jets_sim", 8)])
def test_mae_pretrains_through_the_cli_and_a_probe_reads_it(tmp_path, cache_dir, dataset, chans):
    run_dir = tmp_path / "pre"
    out = run_cli([*MAE_TINY, *tiny_data(dataset, cache_dir), f"run_dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    payload = load_backbone_file(run_dir / "backbone.pt")
    meta = payload["meta"]
    assert (meta["name"], meta["in_chans"], meta["method"], meta["dataset"]) == ("vit_tiny", chans, "mae", dataset)
    assert meta["kwargs"] == {"patch_size": 8, "depth": 2, "pool": "cls"} and meta["view_size"] == 32
    assert not any(k.startswith(("decoder", "mask_token")) for k in payload["state_dict"])
    header = (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_step" in header
    if dataset != "lens_sim":
        return
    probe = tmp_path / "linear"
    out = run_cli([*MAE_TINY, *tiny_data(dataset, cache_dir), "task=linear", "task.max_epochs=1",
                   "+trainer.limit_val_batches=1", f"pretrained={run_dir}", "backbone.pool=mean",
                   f"run_dir={probe}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "with mean pooling (pretrained with pool=cls)" in out.stdout + out.stderr  # the switch is logged
    metrics = json.loads((probe / "metrics.json").read_text())
    assert metrics["method"] == "mae" and metrics["pretrained"].endswith("backbone.pt")
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
