"""What every task shares: its run directory, seeding, the Trainer's arguments, loggers and saved config."""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ssl_lab.artifacts import atomic_write
from ssl_lab.callbacks import RunPlan, SpeedMeter, StepProgressBar
from ssl_lab.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from ssl_lab.data.summary_table import data_table
from ssl_lab.errors import ConfigError
from ssl_lab.inspect import startup_check
from ssl_lab.preemption import read_marker
from ssl_lab.run_log import start_writing
from ssl_lab.segments import save_segment_config, start_segment

log = logging.getLogger(__name__)

# Views are made in the LightningModule's hook by design (exactly one on_after_batch_transfer); Lightning warns
# whenever a datamodule is passed alongside one.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer` in `LightningModule`.*")
# A resumed run writes into its own checkpoints folder by design; claim_run_dir has already refused another run's.
warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
# Pretraining has no validation loop by design (the val split serves the downstream tasks).
warnings.filterwarnings("ignore", message=r".*You passed in a `val_dataloader` but have no `validation_step`.*")


def _not_an_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in str(record.msg).lower()  # Lightning's tip to install a cloud logger, every run

RUN_MARKERS = ("config.yaml", "summary.json", "metrics.json", "pipeline.json", "backbone.pt", "checkpoints")
# what a run writes only once it has finished: a resume=auto start without a checkpoint would overwrite them
FINISHED_MARKERS = ("summary.json", "metrics.json", "pipeline.json", "backbone.pt", "model.pt")
LAST_CKPT = Path("checkpoints") / "last.ckpt"


def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun starts every rank itself: each would stamp its own time into the run name.
        raise ConfigError("under torchrun every process names its own run directory from the clock; pass one "
                          "shared run_dir=<folder> (e.g. run_dir=runs/$SLURM_JOB_ID).")
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ConfigError("run_dir is not set and no Hydra app is running; pass run_dir=<folder>.")


def claim_run_dir(run_dir: Path, resume: str | None, config_hash: str | None = None) -> str | None:
    """Refuse to write over another run; return the checkpoint to resume from, if any (checked, not yet loaded).

    A run stopped by a preemption signal left a marker beside its checkpoint: started again with the same config
    (a requeued job repeats its original arguments), it continues without resume=auto."""
    from ssl_lab.resume import MODES

    if resume not in (None, *MODES):
        read_checkpoint(resume, mmap=True)
        return str(resume)
    last = run_dir / LAST_CKPT
    if resume in MODES:
        if last.is_file():
            read_checkpoint(last, mmap=True)
            return str(last)
        finished = [m for m in FINISHED_MARKERS if (run_dir / m).exists()]
        if finished and rank_zero_only.rank == 0:
            raise ConfigError(f"resume={resume}: {run_dir} holds a finished run ({', '.join(finished)}) but no "
                              f"{LAST_CKPT} to continue from (deleted? a downstream run removes it at a clean end "
                              "unless keep_last=true); starting it again would overwrite its outputs, so nothing "
                              "was written. Pass a new run_name (or run_dir), or put the checkpoint back.")
        log.info("resume=%s: no %s yet, starting fresh", resume, last)
        return None
    marker = read_marker(last.parent)
    if marker is not None and last.is_file() and marker.get("config_hash") in (None, config_hash):
        read_checkpoint(last, mmap=True)
        log.warning("%s was stopped by %s at step %s; continuing it from %s", run_dir, marker.get("signal"),
                    marker.get("global_step"), last)
        return str(last)
    taken = [m for m in RUN_MARKERS if (run_dir / m).exists()]
    # DDP ranks > 0 re-run this script after rank 0 has claimed the directory.
    if taken and rank_zero_only.rank == 0:
        hint = (f" It was stopped by a signal and saved another config; continue it as saved with run_dir={run_dir} "
                "resume=auto"
                if marker is not None else "")
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(taken)}); pass resume=auto to continue it, or a new "
            f"run_name (or run_dir) to start another.{hint}"
        )
    return None


def last_checkpoint(run_dir: Path) -> ModelCheckpoint:
    """Keeps <run_dir>/checkpoints/last.ckpt, the file resume=auto reads, rewritten at the end of every epoch.

    Not Lightning's save_last: with no top-k checkpoint to copy it writes last.ckpt only when training ends, so a
    run killed by SIGKILL (or the OOM killer, or a node failure) had nothing to resume from. One checkpoint kept,
    named `last` (no version counter: by default Lightning writes last-v1.ckpt beside a last.ckpt it did not write
    itself, one saved on a preemption signal, and resume=auto would then continue from the older file)."""
    return ModelCheckpoint(dirpath=run_dir / "checkpoints", filename=LAST_CKPT.stem, monitor=None, save_top_k=1,
                           save_last=False, enable_version_counter=False, auto_insert_metric_name=False)


def build_cfg_backbone(cfg: DictConfig, size: int) -> Any:
    """cfg.backbone at view size `size`, with `small_stem: auto` decided for the device this run uses (not the one
    the machine has), logged with its reason."""
    from ssl_lab.backbones import choose_small_stem
    from ssl_lab.speed import uses_cuda

    if cfg.backbone.get("small_stem") != "auto" or not str(cfg.backbone.name).startswith("resnet"):
        return instantiate(cfg.backbone, image_size=size)
    stem, why = choose_small_stem(cfg.backbone.name, int(cfg.backbone.in_chans), size,
                                  on_gpu=uses_cuda(cfg.accelerator.accelerator))
    log.info("backbone.small_stem=auto -> %s: %s", str(stem).lower(), why)
    return instantiate(cfg.backbone, image_size=size, small_stem=stem)


def auto_choices(cfg: DictConfig, backbone: Any) -> dict[str, Any]:
    """What `auto` options resolved to in the built backbone, by dotted key, for the saved config: a resumed run
    then rebuilds the same architecture on any machine (ssl_lab.resume.RESOLVED_AUTO lists these keys)."""
    if cfg.backbone.get("small_stem") == "auto" and hasattr(backbone, "small_stem"):
        return {"backbone.small_stem": bool(backbone.small_stem)}
    return {}


def describe(cfg: DictConfig) -> str:
    """What a run is, for its first line: task | method (pretrained with, or scratch) | backbone | dataset."""
    slot = cfg.get("method_slot") or cfg.method.name
    return f"{cfg.task.name} | {slot} | {cfg.backbone.name} | {cfg.dataset.name}"


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return str(precision)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def trainer_kwargs(cfg: DictConfig, precision: str, **overrides: Any) -> dict[str, Any]:
    from ssl_lab.speed import uses_cuda

    acc = cfg.accelerator
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None}
    kwargs.update(accelerator=acc.accelerator, devices=acc.devices, num_nodes=acc.num_nodes, strategy=acc.strategy,
                  sync_batchnorm=acc.sync_batchnorm, precision=precision,
                  # the data modules shard per rank themselves (ssl_lab.data.base.EpochSeededSampler)
                  use_distributed_sampler=False, plugins=[AtomicCheckpointIO()])
    # cuDNN autotuning picks the fastest convolution for the fixed view shapes; left to torch's default on the CPU
    # and in deterministic runs (autotuned algorithms may differ run to run). accelerator.compile/channels_last act
    # on the model (ssl_lab.speed), not the Trainer.
    if uses_cuda(acc.accelerator) and not kwargs.get("deterministic"):
        kwargs["benchmark"] = True
    callbacks = [*(overrides.pop("callbacks", None) or []), RunPlan(describe(cfg))]
    if not any(isinstance(c, SpeedMeter) for c in callbacks):
        callbacks.append(SpeedMeter())  # train/images_per_s on every logging step, in every task
    monitored = any(isinstance(c, LearningRateMonitor) for c in callbacks)
    if not monitored and overrides.get("logger", True) is not False and targets(cfg.get("logger")):
        # the lr of every parameter group (named: backbone / head downstream) on every logging step; Lightning's
        # monitor refuses a Trainer without a logger
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    kwargs.update(overrides)
    if kwargs.get("enable_progress_bar", True):
        # The bar reads the loss (a host sync) every time it redraws: on a GPU, redraw only when metrics are
        # logged, so the host keeps queueing kernels in between. On the CPU there is nothing to overlap.
        every = max(int(kwargs.get("log_every_n_steps", 50)), 1) if uses_cuda(acc.accelerator) else 1
        callbacks.append(StepProgressBar(refresh_rate=every))
    kwargs["callbacks"] = callbacks
    return kwargs


def save_config(cfg: DictConfig, run_dir: Path, precision: str, scale: dict[str, Any] | None = None,
                resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved config, with what `auto` resolved to, as the run actually used it (rank zero writes it).

    `scale`: the world size, global batch and learning-rate rule of a pretraining run, with the lr it gave;
    `resolved`: other `auto` choices by dotted key (backbone.small_stem)."""
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["accelerator"]["precision"] = precision
    for key, value in (resolved or {}).items():
        node = saved
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    if scale is not None:
        saved["scale"] = dict(scale)
    saved["run_dir"] = str(run_dir)
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        from ssl_lab.resume import CHANGING_MODES, config_diff, read_saved

        mode = cfg.get("resume")
        if mode in CHANGING_MODES:
            previous = read_saved(run_dir)
            changed = config_diff(previous, saved, None) if previous is not None else []
            if changed:
                start_segment(run_dir, mode, changed)
        atomic_write(run_dir / "config.yaml", lambda tmp: OmegaConf.save(OmegaConf.create(saved), tmp))
        save_segment_config(run_dir, saved)
        start_writing(run_dir)  # the run has passed its checks: its log goes to run.log from here
    return saved


def config_hash(cfg: DictConfig) -> str:
    """Same experiment, same hash: the run's name, folder and resume flag are left out."""
    from ssl_lab.resume import NOT_COMPARED

    data = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_COMPARED:
        data.pop(key, None)
    if "accelerator" in data:  # `auto` and what it resolved to (the saved config's value) are the same run
        data["accelerator"]["precision"] = resolve_precision(str(data["accelerator"].get("precision", "auto")))
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(data)).encode()).hexdigest()[:16]


def targets(group: DictConfig | None) -> list[DictConfig]:
    return [node for node in (group or {}).values() if node and "_target_" in node]


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """The configured loggers, each started now (a W&B login that fails stops the run here, in one line)."""
    from ssl_lab.loggers import start_online

    loggers = [instantiate(node, save_dir=str(run_dir)) for node in targets(cfg.get("logger"))]
    for logger in loggers:
        start_online(logger)
    return loggers


def one_console() -> None:
    """Under Hydra the root logger already prints and files every record; Lightning's own handlers (on `lightning`
    itself, which still propagates, and on its subpackages) would print each of them a second time."""
    if HydraConfig.initialized():
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).handlers.clear()
        rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        if _not_an_advert not in rank_zero.filters:
            rank_zero.addFilter(_not_an_advert)


def labelled_datamodule(cfg: DictConfig) -> Any:
    """The dataset in its downstream mode: labelled train / val / test splits, set up and ready."""
    datamodule = instantiate(cfg.dataset, labelled=True)
    datamodule.prepare_data()
    datamodule.setup("fit")
    log.info("labelled data:\n%s", data_table(datamodule.summary()))
    startup_check(datamodule)
    return datamodule
