"""What a run does, one function per task; objects are built from the config with Hydra's instantiate."""
from __future__ import annotations

import hashlib
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ssl_lab import __version__
from ssl_lab.artifacts import atomic_write, write_json
from ssl_lab.callbacks import BackboneExport, SpeedMeter
from ssl_lab.config import validate, view_size
from ssl_lab.errors import ConfigError

log = logging.getLogger(__name__)

# Views are made in the LightningModule's hook by design (exactly one on_after_batch_transfer); Lightning warns
# whenever a datamodule is passed alongside one.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer` in `LightningModule`.*")

RUN_MARKERS = ("config.yaml", "summary.json", "backbone.pt", "checkpoints")
LAST_CKPT = Path("checkpoints") / "last.ckpt"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the task the config names and return its summary (the metrics a sweep can optimise)."""
    task = TASKS.get(cfg.task.name)
    if task is None:
        raise ConfigError(f"task={cfg.task.name} is not a known task; choose one of: {', '.join(TASKS)}.")
    return task(cfg)


def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ConfigError("run_dir is not set and no Hydra app is running; pass run_dir=<folder>.")


def claim_run_dir(run_dir: Path, resume: str | None) -> str | None:
    """Refuse to write over another run; return the checkpoint to resume from, if any."""
    if resume not in (None, "auto"):
        ckpt = Path(resume)
        if not ckpt.is_file():
            raise ConfigError(f"resume={resume}: no such checkpoint file.")
        return str(ckpt)
    if resume == "auto":
        last = run_dir / LAST_CKPT
        if last.is_file():
            return str(last)
        log.info("resume=auto: no %s yet, starting fresh", last)
        return None
    taken = [m for m in RUN_MARKERS if (run_dir / m).exists()]
    # DDP ranks > 0 re-run this script after rank 0 has claimed the directory.
    if taken and rank_zero_only.rank == 0:
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(taken)}); pass resume=auto to continue it, or a new "
            "run_name (or run_dir) to start another."
        )
    return None


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return str(precision)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def trainer_kwargs(cfg: DictConfig, precision: str) -> dict[str, Any]:
    acc = cfg.accelerator
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None}
    # Pretraining has no validation step; the datamodule's val split serves downstream tasks.
    kwargs.update(limit_val_batches=0, num_sanity_val_steps=0)
    kwargs.update(accelerator=acc.accelerator, devices=acc.devices, num_nodes=acc.num_nodes, strategy=acc.strategy,
                  sync_batchnorm=acc.sync_batchnorm, precision=precision)
    return kwargs


def config_hash(cfg: DictConfig) -> str:
    """Same experiment, same hash: the run's name, folder and resume flag are left out."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in ("run_name", "run_dir", "resume"):
        data.pop(key, None)
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(data)).encode()).hexdigest()[:16]


def _targets(group: DictConfig | None) -> list[DictConfig]:
    return [node for node in (group or {}).values() if node and "_target_" in node]


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    return [instantiate(node, save_dir=str(run_dir)) for node in _targets(cfg.get("logger"))]


def _one_console() -> None:
    """Under Hydra the root logger already prints and files every record; Lightning's own handler would double it."""
    if HydraConfig.initialized():
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).handlers.clear()


def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Self-supervised pretraining; exports `backbone.pt` and `summary.json` into the run directory."""
    started = time.time()
    _one_console()
    run_dir = resolve_run_dir(cfg)
    ckpt_path = claim_run_dir(run_dir, cfg.get("resume"))
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    log.info("data: %s", datamodule.summary())
    size = view_size(cfg, datamodule.image_shape)
    augment = instantiate(cfg.augment, size=size, _convert_="all")
    validate(cfg, datamodule, augment)
    augment.set_stats(datamodule.mean, datamodule.std)
    backbone = instantiate(cfg.backbone, image_size=size)
    model = instantiate(cfg.method, backbone=backbone, augment=augment,
                        optim=OmegaConf.to_container(cfg.optim, resolve=True))

    precision = resolve_precision(cfg.accelerator.precision)
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["accelerator"]["precision"] = precision
    saved["run_dir"] = str(run_dir)
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", lambda tmp: OmegaConf.save(OmegaConf.create(saved), tmp))

    meta = {"method": cfg.method.name, "dataset": cfg.dataset.name, "norm": datamodule.norm_stats(),
            "config_hash": config_hash(cfg), "ssl_lab_version": __version__, "view_size": size}
    speed = SpeedMeter()
    callbacks = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0),
        speed,
        BackboneExport(run_dir / "backbone.pt", meta),
        *(instantiate(node) for node in _targets(cfg.get("callbacks"))),
    ]
    loggers = build_loggers(cfg, run_dir)
    for logger in loggers:
        logger.log_hyperparams(saved)
    trainer = pl.Trainer(default_root_dir=str(run_dir), logger=loggers or False, callbacks=callbacks,
                         **trainer_kwargs(cfg, precision))
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    metrics = trainer.callback_metrics
    final_loss = metrics.get("train/loss_epoch", metrics.get("train/loss"))
    summary = {
        "task": "pretrain", "method": cfg.method.name, "backbone": cfg.backbone.name, "dataset": cfg.dataset.name,
        "final_loss": None if final_loss is None else float(final_loss),
        "epochs": int(trainer.current_epoch), "global_step": int(trainer.global_step),
        "images_per_s": speed.images_per_s, "wall_time_s": round(time.time() - started, 2),
        "resumed_from": ckpt_path, "precision": precision, "run_dir": str(run_dir),
        "backbone_path": str(run_dir / "backbone.pt"), "data": datamodule.summary(),
    }
    if trainer.is_global_zero:
        write_json(run_dir / "summary.json", summary)
        log.info("pretraining done: %s", run_dir)
    return summary


TASKS: dict[str, Callable[[DictConfig], dict[str, Any]]] = {"pretrain": pretrain}
