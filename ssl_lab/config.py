"""Cross-field checks that no single constructor can see, run once before training, each with the fix."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from ssl_lab.augment import Augment
from ssl_lab.errors import ConfigError


def view_size(cfg: DictConfig, image_shape: tuple[int, int]) -> int:
    """The side of the views the backbone sees: augment.size, or the data's own (smaller) side."""
    size = cfg.augment.get("size")
    if size is None:
        return int(min(image_shape))
    if isinstance(size, bool) or not isinstance(size, int):
        raise ConfigError(f"augment.size={size!r} must be an integer number of pixels, or null for the image size.")
    return size


def validate(cfg: DictConfig, datamodule: Any, augment: Augment, ssl: bool = True) -> None:
    """Refuse combinations that would fail late, train on the wrong thing, or silently change the data.

    `ssl`: the batch-size rules of self-supervised losses apply (pretraining, not downstream heads)."""
    data_name = cfg.dataset.get("name", "dataset")
    chans = int(datamodule.in_chans)
    if int(cfg.backbone.in_chans) != chans:
        raise ConfigError(
            f"backbone.in_chans={cfg.backbone.in_chans} but dataset {data_name} has {chans} channel(s); "
            f"remove the backbone.in_chans override (it follows dataset.in_chans) or set it to {chans}."
        )
    rgb_ops = sorted(augment.rgb_only_ops)  # ops switched off with p=0 are not counted
    if rgb_ops and chans != 3:
        raise ConfigError(
            f"augment={cfg.augment.name} uses {', '.join(rgb_ops)}, which need RGB images, but dataset {data_name} "
            f"has {chans} channel(s); use augment=physics or augment=minimal, or drop the op with "
            + " ".join(f"~augment.ops.{op}" for op in rgb_ops) + "."
        )
    if ssl and not augment.active and _compares_two_views(cfg):
        raise ConfigError(
            f"augment={cfg.augment.name} applies no op (augment.ops is empty or every p is 0), so method="
            f"{cfg.method.get('name')} would compare two identical views of each image and learn nothing from them; "
            "use augment=physics or augment=minimal, or add ops under augment.ops."
        )
    height, width = datamodule.image_shape
    size = view_size(cfg, (height, width))
    if size < 1 or size > min(height, width):
        raise ConfigError(
            f"augment.size={size} does not fit dataset {data_name}'s {height}x{width} images; "
            f"choose a view size from 1 to {min(height, width)} (or null for the image size)."
        )
    batch = int(cfg.dataset.batch_size)
    if batch < 1:
        raise ConfigError(f"dataset.batch_size={batch} must be a positive integer.")
    if ssl:
        _check_ssl_batch(batch, data_name, datamodule)
    acc = cfg.accelerator
    if acc.sync_batchnorm and acc.accelerator == "cpu":
        raise ConfigError("accelerator.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm has no CPU kernel); "
                          "set accelerator.sync_batchnorm=false for DDP on the CPU.")
    if not ssl and cfg.optim.get("lr_scaling", "none") not in (None, "none"):
        raise ConfigError(f"optim.lr_scaling={cfg.optim.lr_scaling} applies to pretraining; downstream tasks take "
                          "their rates as given (task.backbone_lr, task.head_lr): set optim.lr_scaling=none.")
    if float(cfg.optim.lr) <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be positive.")
    resume = cfg.get("resume")
    from ssl_lab.resume import MODES

    if resume not in (None, *MODES) and not str(resume).endswith(".ckpt"):
        raise ConfigError(f"resume={resume}: use resume=auto (continue this run_dir as saved), resume=extend (train "
                          "it longer), resume=force (continue it with a changed config) or a path to a .ckpt file.")


def _compares_two_views(cfg: DictConfig) -> bool:
    """Whether the method trains on the preset's two views as they are (not on its own views: MAE, DINO, pretext)."""
    from hydra.utils import get_class

    from ssl_lab.methods.base import SSLMethod

    try:
        cls = get_class(cfg.method._target_)
    except (ImportError, ValueError):  # instantiate reports a bad _target_ with its own message
        return False
    return issubclass(cls, SSLMethod) and cls.make_views is SSLMethod.make_views


def _check_ssl_batch(batch: int, data_name: str, datamodule: Any) -> None:
    if batch < 2:
        raise ConfigError(f"dataset.batch_size={batch}: self-supervised losses compare samples within a batch; "
                          "use at least 2.")
    n_train = int(datamodule.summary().get("n_train", batch))
    if batch > n_train:
        raise ConfigError(
            f"dataset.batch_size={batch} is larger than the {n_train} training images of {data_name}, so no full "
            f"batch can be formed; set dataset.batch_size to at most {n_train}."
        )
