"""Pretraining throughput three ways, in one run on one device, with the same model, batch, view size and precision.

  (a) ceiling    views made once and kept on the device: model + loss + optimizer step only.
  (b) ssl_lab    its H5DataModule (in memory, and reading an HDF5 file in a temp dir) -> views made on the device
                 by the batched Augment in on_after_batch_transfer -> step. The real pretraining path.
  (c) reference  the same preset as per-sample torchvision.transforms.v2 ops on DataLoader workers (one per CPU
                 core), finished views shipped to the device -> step. The common way to feed SSL.

All three run the real SSLMethod (its training_step, logging and configure_optimizers) in a Lightning Trainer built
by ``trainer_kwargs``, with a real run's guard and preemption callbacks, and ``accelerator.compile`` /
``channels_last`` applied as in ``task=pretrain``; only the source of the views differs. One image = all its views.
The timer synchronises CUDA once after the warm-up steps and once at the end, never in between, so the host may run
ahead as in a real run. Synthetic data (random uint8 RGB, random float jets), nothing downloaded.

    python benchmarks/throughput.py                                  # all cases, GPU sizes
    python benchmarks/throughput.py --case resnet15_jets --compile on --out jets.json
    python benchmarks/throughput.py --quick                          # tiny CPU smoke run

Prints b/a and b/c (targets on a GPU: b/a >= 0.85, b/c >= 2 for the ResNet cases), peak GPU memory, the device and
date, and writes everything to --out (JSON).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import lightning.pytorch as pl
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssl_lab.augment import step_generator
from ssl_lab.guards import build_guard
from ssl_lab.preemption import PreemptionCheckpoint
from ssl_lab.speed import optimizer_impl
from ssl_lab.tasks.common import resolve_precision, trainer_kwargs
from ssl_lab.tasks.pretrain import build_pretraining
from ssl_lab.resolvers import register

register()  # the configs interpolate these (run.py registers them too)


@dataclass(frozen=True)
class Case:
    backbone: str
    method: str
    augment: str
    optim: str
    channels: int
    dtype: str  # uint8 (scaled by 1/255, like photographs) or float32 (raw units, like detector images)
    image_size: int
    batch_size: int


CASES = {
    "resnet18_rgb": Case("resnet18", "simclr", "simclr_rgb", "adam", 3, "uint8", 96, 256),
    "resnet15_jets": Case("resnet15", "simclr", "physics", "adam", 8, "float32", 125, 256),
    "vit_s_mae": Case("vit_small", "mae", "minimal", "adamw", 3, "uint8", 96, 256),
    # a published anchor: stable-pretraining's ViT-S/16 Barlow Twins at 224 px, batch 256, bf16 on one H200
    "vit_s16_barlow": Case("vit_small", "barlow", "simclr_rgb", "adamw", 3, "uint8", 224, 256),
}
# samples/s the anchor reports for its case (same model, views, batch and precision): GPU and CPU augmentation
ANCHORS = {"vit_s16_barlow": {"source": "stable-pretraining, ViT-S/16 Barlow Twins, 224 px, batch 256, bf16, 1x H200",
                              "gpu_augmentation": 871.0, "cpu_augmentation": 342.0}}
QUICK = {"image_size": 32, "batch_size": 4, "steps": 2, "warmup": 1}
QUICK_VIT_DEPTH = 2  # --quick: a 2-block ViT-S, so a CPU smoke run takes seconds
PATHS = ("a_ceiling", "b_memory", "b_h5", "c_reference")
LABELS = {"a_ceiling": "(a) ceiling: views pre-made on the device", "b_memory": "(b) ssl_lab: in-memory DataModule",
          "b_h5": "(b) ssl_lab: HDF5-file DataModule", "c_reference": "(c) reference: torchvision v2 on workers"}


# ------------------------------------------------------------------------------------------------------ data
def write_h5(path: Path, n: int, case: Case, size: int, seed: int = 0) -> None:
    """Random images in blocks (bounded memory): uint8 RGB, or sparse non-negative float jets."""
    rng = np.random.default_rng(seed)
    shape = (n, case.channels, size, size)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("images", shape=shape, dtype=case.dtype)
        block = max(1, (64 << 20) // (math.prod(shape[1:]) * np.dtype(case.dtype).itemsize))
        for i in range(0, n, block):
            m = min(block, n - i)
            if case.dtype == "uint8":
                ds[i:i + m] = rng.integers(0, 256, (m, *shape[1:]), dtype=np.uint8)
            else:
                x = rng.exponential(1.0, (m, *shape[1:])).astype(np.float32)
                ds[i:i + m] = np.where(rng.random(x.shape, dtype=np.float32) < 0.2, x, 0.0)


def n_samples(case: Case, size: int, batch: int, total_steps: int, max_data_mb: float) -> int:
    """Enough images for one pass over all steps, capped in size (then epochs repeat)."""
    per_image = case.channels * size * size * np.dtype(case.dtype).itemsize
    cap = max(batch, int(max_data_mb * 2**20 // per_image) // batch * batch)
    return min(batch * total_steps, cap)


# --------------------------------------------------------------------------------- reference (per-sample) path
class PerChannelIntensity:
    """Our ``intensity`` op per sample. torchvision has no per-channel gain/offset transform."""

    def __init__(self, p: float, scale: tuple[float, float], shift: tuple[float, float], std: torch.Tensor) -> None:
        self.p, self.scale, self.shift, self.std = p, scale, shift, std.view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return x
        c = x.shape[0]
        gain = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(c, 1, 1)
        offset = self.shift[0] + (self.shift[1] - self.shift[0]) * torch.rand(c, 1, 1)
        return x * gain + offset * self.std


class PerChannelGamma:
    """Our ``gamma`` op per sample: torchvision's adjust_gamma assumes a [0, 1] range, ours uses each channel's own."""

    def __init__(self, p: float, gamma: tuple[float, float]) -> None:
        self.p, self.gamma = p, gamma

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return x
        g = self.gamma[0] + (self.gamma[1] - self.gamma[0]) * torch.rand(x.shape[0], 1, 1)
        lo = x.amin(dim=(-2, -1), keepdim=True)
        span = (x.amax(dim=(-2, -1), keepdim=True) - lo).clamp_min(1e-12)
        return lo + span * ((x - lo) / span).clamp(0, 1).pow(g)


class RandomChannelDrop:
    """Our ``channel_drop`` op per sample. torchvision's RandomErasing blanks a box in all channels, not a channel."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 or torch.rand(()) >= self.p:
            return x
        x = x.clone()
        x[int(torch.randint(x.shape[0], ()))] = 0.0
        return x


def reference_transform(augment: Any, size: int, image_size: int, uint8: bool) -> tuple[v2.Compose, dict[str, str]]:
    """The preset's active ops as per-sample torchvision v2 transforms, in our pipeline's order; and, per op, what
    stands in for it. uint8 images stay uint8 through geometry and colour (the fast torchvision path)."""
    ops, t, notes = augment.active, [], {}
    if "resized_crop" in ops:
        prm = ops["resized_crop"]
        rrc = v2.RandomResizedCrop(size, scale=prm["scale"], ratio=prm["ratio"], antialias=True)
        t.append(rrc if prm["p"] >= 1 else v2.RandomChoice([rrc, v2.Resize((size, size))], p=[prm["p"], 1 - prm["p"]]))
        notes["resized_crop"] = "v2.RandomResizedCrop (antialiased; ours: bilinear grid_sample, sub-pixel box)"
    elif size != image_size:
        t.append(v2.Resize((size, size)))
    if "hflip" in ops:
        t.append(v2.RandomHorizontalFlip(ops["hflip"]["p"]))
        notes["hflip"] = "v2.RandomHorizontalFlip"
    if "vflip" in ops:
        t.append(v2.RandomVerticalFlip(ops["vflip"]["p"]))
        notes["vflip"] = "v2.RandomVerticalFlip"
    if "rot90" in ops:
        turns = v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)])
        t.append(v2.RandomApply([turns], p=ops["rot90"]["p"]))
        notes["rot90"] = "v2.RandomChoice of v2.RandomRotation by 0/90/180/270 degrees (no random-rot90 op)"
    if "rotate" in ops:
        prm = ops["rotate"]
        t.append(v2.RandomApply([v2.RandomRotation(prm["degrees"], interpolation=v2.InterpolationMode.BILINEAR)],
                                p=prm["p"]))
        notes["rotate"] = "v2.RandomRotation (corners filled with 0; ours: mirrored content)"
    if "color_jitter" in ops:
        prm = ops["color_jitter"]
        jitter = v2.ColorJitter(brightness=prm["brightness"], contrast=prm["contrast"],
                                saturation=prm["saturation"], hue=prm["hue"])
        t.append(v2.RandomApply([jitter], p=prm["p"]))
        notes["color_jitter"] = "v2.ColorJitter (random order of the four; hue in HSV; ours: fixed order, YIQ hue)"
    if "grayscale" in ops:
        t.append(v2.RandomGrayscale(ops["grayscale"]["p"]))
        notes["grayscale"] = "v2.RandomGrayscale"
    if "solarize" in ops:
        prm = ops["solarize"]
        t.append(v2.RandomSolarize(prm["threshold"] * (255 if uint8 else 1), p=prm["p"]))
        notes["solarize"] = "v2.RandomSolarize"
    if uint8:
        t.append(v2.ToDtype(torch.float32, scale=True))
    std = augment.std.detach().cpu() if augment.std.numel() else torch.ones(1)
    if "intensity" in ops:
        prm = ops["intensity"]
        t.append(PerChannelIntensity(prm["p"], prm["scale"], prm["shift"], std))
        notes["intensity"] = "no torchvision op: per-sample per-channel gain/offset written here"
    if "gamma" in ops:
        t.append(PerChannelGamma(ops["gamma"]["p"], ops["gamma"]["gamma"]))
        notes["gamma"] = "no torchvision op for any range: per-sample per-channel min-max gamma written here"
    if "blur" in ops:
        prm = ops["blur"]
        k = prm["kernel_size"] or 2 * math.ceil(3.0 * prm["sigma"][1]) + 1
        t.append(v2.RandomApply([v2.GaussianBlur(k, sigma=prm["sigma"])], p=prm["p"]))
        notes["blur"] = "v2.GaussianBlur (same kernel size and sigma range)"
    if augment.mean.numel():
        t.append(v2.Normalize(augment.mean.tolist(), augment.std.tolist()))
    if "noise" in ops:
        prm = ops["noise"]
        sigma = 0.5 * (prm["std"][0] + prm["std"][1])
        t.append(v2.RandomApply([v2.GaussianNoise(sigma=sigma, clip=False)], p=prm["p"]))
        notes["noise"] = f"v2.GaussianNoise with fixed sigma={sigma:g} (ours: sigma drawn per sample)"
    if "channel_drop" in ops:
        t.append(RandomChannelDrop(ops["channel_drop"]["p"]))
        notes["channel_drop"] = "no torchvision op: per-sample channel zeroing written here"
    return v2.Compose(t), notes


class ReferenceViews(Dataset):
    """Image i -> its n_views finished views [V, C, S, S], made on a DataLoader worker."""

    def __init__(self, images: np.ndarray, transform: v2.Compose, n_views: int) -> None:
        self.images, self.transform, self.n_views = images, transform, n_views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(self.images[i])
        return {"views": torch.stack([self.transform(x) for _ in range(self.n_views)])}


# ---------------------------------------------------------------------------------- hooks for paths (a) and (c)
def _premade_hook(self: Any, batch: dict, dataloader_idx: int) -> dict:
    """(a): the views are already in the batch; only the step's generator (MAE's masks) is made."""
    if self._trainer is not None and self.trainer.training:
        self.step_rng = step_generator(self.seed, self.global_step, self.global_rank, batch["x"].device)
    return batch


def _reference_hook(self: Any, batch: dict, dataloader_idx: int) -> dict:
    """(c): the workers' finished views [B, V, C, S, S] become the list of views the method's loss takes."""
    if self._trainer is not None and self.trainer.training:
        views = batch.pop("views")
        self.step_rng = step_generator(self.seed, self.global_step, self.global_rank, views.device)
        batch["views"] = list(views.unbind(1))
        batch["x"] = batch["views"][0]  # training_step reads only its batch size
    return batch


class Repeat:
    """The same batch ``n`` times: a loader with no loading at all."""

    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        return iter([self.batch] * self.n)

    def __len__(self) -> int:
        return self.n


class StepTimer(pl.Callback):
    """Images/s over the steps after ``warmup``; CUDA is synchronised only at the two ends of the timed span."""

    def __init__(self, warmup: int, steps: int | None = None) -> None:
        self.warmup, self.steps, self.done, self.images = warmup, steps, 0, 0
        self.t0 = self.t1 = None
        self.host_gaps: list[float] = []
        self._end: float | None = None

    @staticmethod
    def _sync(trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.t0 is not None and self._end is not None:
            self.host_gaps.append(time.perf_counter() - self._end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.done += 1
        if self.done == self.warmup:
            self._sync(trainer)
            self.t0 = time.perf_counter()
        elif self.done > self.warmup and self.t1 is None:
            self.images += int(batch["x"].shape[0])
            if self.steps is not None and self.done == self.warmup + self.steps:
                self._stop(trainer)
        self._end = time.perf_counter()

    def _stop(self, trainer) -> None:
        self._sync(trainer)
        self.t1 = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.t1 is None:
            self._stop(trainer)

    @property
    def images_per_s(self) -> float:
        return self.images / (self.t1 - self.t0)


class ProfileOneStep(pl.Callback):
    """torch.profiler over one whole training step (forward, loss, backward, optimizer), after the timed span: the
    ops that cost the most device time (CPU time on the CPU), top first."""

    def __init__(self, at_step: int, top: int = 10) -> None:
        self.at_step, self.n_top = at_step, top
        self.top: list[dict[str, Any]] = []
        self._prof: Any = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step and self._prof is None:
            kinds = torch.profiler.ProfilerActivity
            activities = [kinds.CPU, *([kinds.CUDA] if trainer.strategy.root_device.type == "cuda" else [])]
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._prof is None or self.top:
            return
        StepTimer._sync(trainer)
        self._prof.__exit__(None, None, None)
        self.top = top_ops(self._prof.key_averages(), trainer.strategy.root_device.type == "cuda", self.n_top)


def top_ops(averages: Any, cuda: bool, n: int) -> list[dict[str, Any]]:
    """The n ops with the most self time (device time on a GPU), with their share of the step's total."""
    def device_us(e: Any) -> float:  # torch renamed self_cuda_time_total to self_device_time_total
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    def cost(e: Any) -> float:
        return device_us(e) if cuda else float(e.self_cpu_time_total)

    total = sum(cost(e) for e in averages) or 1.0
    ranked = sorted(averages, key=cost, reverse=True)[:n]
    return [{"op": e.key, "calls": int(e.count), "self_ms": round(cost(e) / 1e3, 3),
             "share": round(cost(e) / total, 4), "clock": "device" if cuda else "cpu"} for e in ranked]


# --------------------------------------------------------------------------------------------------- one case
@dataclass
class Settings:
    case: str
    device: str
    image_size: int
    view_size: int
    batch_size: int
    steps: int
    warmup: int
    precision: str
    compile: bool
    channels_last: str
    workers: int
    n_samples: int
    seed: int = 0
    overrides: tuple[str, ...] = ()  # extra config overrides (--quick: a shallow ViT)
    profile: bool = False  # (a) ceiling: one more step after the timed ones, under torch.profiler


def compose_cfg(case: Case, s: Settings, h5: Path, in_memory: bool) -> Any:
    accelerator = "gpu" if s.device == "cuda" else "cpu"
    overrides = [
        f"method={case.method}", f"backbone={case.backbone}", f"augment={case.augment}", f"optim={case.optim}",
        "optim.warmup_epochs=0", "dataset=lens_h5", f"dataset.path={h5}", f"dataset.in_chans={case.channels}",
        f"dataset.batch_size={s.batch_size}", f"dataset.num_workers={s.workers}", f"dataset.in_memory={in_memory}",
        "dataset.val_fraction=0.0", f"augment.size={s.view_size}", f"accelerator={accelerator}",
        f"accelerator.precision={s.precision}", f"accelerator.compile={str(s.compile).lower()}",
        f"accelerator.channels_last={s.channels_last}", f"seed={s.seed}", "trainer.log_every_n_steps=50",
        "trainer.enable_progress_bar=false", *s.overrides,
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf"), job_name="throughput"):
        return compose(config_name="config", overrides=overrides)


def build(cfg: Any) -> tuple[Any, Any, dict[str, Any]]:
    """DataModule and method exactly as task=pretrain builds them (speed options included)."""
    dm, model, _, speed_record = build_pretraining(cfg)
    return dm, model, speed_record


def _shutdown(loader: Any) -> None:
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


def run_path(path: str, case: Case, s: Settings, h5: Path, images: np.ndarray) -> dict[str, Any]:
    cfg = compose_cfg(case, s, h5, in_memory=path != "b_h5")
    dm, model, record = build(cfg)
    device = torch.device(s.device)
    profiled = s.profile and path == "a_ceiling"
    total = s.warmup + s.steps + int(profiled)
    if path == "a_ceiling":
        x = torch.from_numpy(images[: s.batch_size]).to(device)
        model.augment.to(device)
        views = [v.contiguous() for v in model.make_views(x, step_generator(s.seed, 0, 0, device))]
        loader: Any = Repeat({"x": x, "views": views}, total)
        model.on_after_batch_transfer = types.MethodType(_premade_hook, model)
    elif path == "c_reference":
        n_views = len(model.make_views(torch.from_numpy(images[:2]), step_generator(s.seed, 0, 0, "cpu")))
        transform, notes = reference_transform(model.augment, s.view_size, s.image_size, case.dtype == "uint8")
        gen = torch.Generator().manual_seed(s.seed)
        loader = DataLoader(ReferenceViews(images, transform, n_views), batch_size=s.batch_size, shuffle=True,
                            generator=gen, drop_last=True, num_workers=s.workers, pin_memory=s.device == "cuda",
                            persistent_workers=s.workers > 0)
        model.on_after_batch_transfer = types.MethodType(_reference_hook, model)
    else:
        loader = dm.train_dataloader()
    if path != "c_reference":
        notes = None
    timer = StepTimer(s.warmup, s.steps)
    profiler = [ProfileOneStep(s.warmup + s.steps)] if profiled else []
    trainer = pl.Trainer(**trainer_kwargs(
        cfg, s.precision, max_steps=total, max_epochs=-1, logger=False,
        # a real run's watchers (checkpoint writing aside): the NaN/collapse guard and the preemption handler
        callbacks=[timer, *profiler, build_guard(cfg.get("guard")), PreemptionCheckpoint(h5.parent / "checkpoints")],
        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0))
    if s.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, train_dataloaders=loader)
    out = {
        "images_per_s": timer.images_per_s, "timed_images": timer.images,
        "host_ms_between_steps": 1e3 * float(np.mean(timer.host_gaps)) if timer.host_gaps else None,
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if s.device == "cuda" else None,
        "speed": {**record, "optimizer": optimizer_impl(trainer.optimizers[0]),
                  "cudnn_benchmark": bool(trainer_kwargs(cfg, s.precision).get("benchmark"))},
    }
    if notes is not None:
        out["reference_ops"] = notes
    if profiled:
        out["profile_top_ops"] = profiler[0].top
    _shutdown(loader)
    del trainer, model, dm, loader
    gc.collect()
    if s.compile:
        torch._dynamo.reset()  # the next path compiles afresh, inside its own warm-up
    return out


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    case = CASES[name]
    quick = QUICK if args.quick else {}
    size = args.image_size or quick.get("image_size") or case.image_size
    batch = args.batch_size or quick.get("batch_size") or case.batch_size
    case = replace(case, image_size=size, batch_size=batch)
    steps = args.steps or quick.get("steps") or 50
    warmup = args.warmup if args.warmup is not None else quick.get("warmup", 10)
    if warmup < 1 or steps < 1:
        raise SystemExit("--warmup and --steps must be >= 1 (the first step pays for start-up and compilation)")
    shallow_vit = (f"backbone.depth={QUICK_VIT_DEPTH}",)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    s = Settings(case=name, device=device, image_size=size, view_size=args.view_size or size, batch_size=batch,
                 steps=steps, warmup=warmup, precision=resolve_precision(args.precision),
                 compile=args.compile == "on", channels_last=args.channels_last,
                 workers=args.workers if args.workers is not None else (os.cpu_count() or 1),
                 n_samples=n_samples(case, size, batch, warmup + steps, args.max_data_mb),
                 overrides=shallow_vit if args.quick and case.backbone.startswith("vit") else (),
                 profile=args.profile)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ssl_lab_throughput_") as tmp:
        h5 = Path(tmp) / f"{name}.h5"
        write_h5(h5, s.n_samples, case, size, s.seed)
        with h5py.File(h5, "r") as f:
            images = f["images"][()]
        for path in PATHS:
            results[path] = run_path(path, case, s, h5, images)
    a, c = results["a_ceiling"]["images_per_s"], results["c_reference"]["images_per_s"]
    ratios = {"b_over_a": results["b_memory"]["images_per_s"] / a, "b_h5_over_a": results["b_h5"]["images_per_s"] / a,
              "b_over_c": results["b_memory"]["images_per_s"] / c, "b_h5_over_c": results["b_h5"]["images_per_s"] / c}
    return {
        "case": name, "model": asdict(case), "settings": asdict(s), "device": device,
        "device_name": device_name(device), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "lightning": pl.__version__, "load_average_1min_at_start": load,
        "torch_threads": torch.get_num_threads(),
        "results": results, "ratios": ratios, "reference_ops": results["c_reference"].pop("reference_ops"),
        "speed": results["b_memory"]["speed"], "anchor": ANCHORS.get(name),
        "profile_top_ops": results["a_ceiling"].pop("profile_top_ops", None),
    }


def report(run: dict[str, Any]) -> str:
    s, m, sp = run["settings"], run["model"], run["speed"]
    lines = [
        (f"{run['case']}: {m['backbone']} + {m['method']} ({m['augment']}), {m['channels']} ch {m['dtype']} "
         f"{s['image_size']} px -> {s['view_size']} px views, batch {s['batch_size']}, {s['precision']}, "
         f"{s['steps']} timed steps after {s['warmup']}"),
        (f"  on {run['device_name']} [{run['device']}], {run['date']}; compile={sp['compile']}, "
         f"channels_last={sp['channels_last']}, optimizer={sp['optimizer']}, workers={s['workers']}"),
    ]
    for path in PATHS:
        r = run["results"][path]
        mem = f"   peak {r['peak_gpu_mem_gb']:.1f} GiB" if r["peak_gpu_mem_gb"] is not None else ""
        lines.append(f"  {LABELS[path]:<44} {r['images_per_s']:>10.1f} images/s{mem}")
    q = run["ratios"]
    lines.append(f"  b/a = {q['b_over_a']:.2f} (HDF5 {q['b_h5_over_a']:.2f})   "
                 f"b/c = {q['b_over_c']:.2f} (HDF5 {q['b_h5_over_c']:.2f})")
    anchor = run.get("anchor")
    if anchor:
        b = run["results"]["b_memory"]["images_per_s"]
        lines.append(f"  published ({anchor['source']}): {anchor['gpu_augmentation']:.0f} samples/s with GPU "
                     f"augmentation, {anchor['cpu_augmentation']:.0f} with CPU augmentation; (b) is "
                     f"{b / anchor['gpu_augmentation']:.2f}x the first")
    for op in run.get("profile_top_ops") or []:
        lines.append(f"  profile: {op['op']:<40} {op['self_ms']:>9.3f} ms ({100 * op['share']:.1f} % of the step)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="all", help=f"comma-separated from {', '.join(CASES)}, or all")
    p.add_argument("--steps", type=int, default=None, help="timed steps per path (default 50; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 10; --quick: 1)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the case's (256; --quick: 4)")
    p.add_argument("--image-size", type=int, default=None, help="stored image side (default: the case's; --quick: 32)")
    p.add_argument("--view-size", type=int, default=None, help="view side (default: the image size)")
    p.add_argument("--precision", default="auto", help="Lightning precision; auto: bf16-mixed on a bf16 GPU, else 32")
    p.add_argument("--compile", choices=("on", "off"), default="off", help="accelerator.compile (torch.compile)")
    p.add_argument("--channels-last", choices=("auto", "true", "false"), default="auto",
                   help="accelerator.channels_last")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers for (b) and (c); default: CPU cores")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads in the main process (default: torch's); 1 on a shared CPU box")
    p.add_argument("--max-data-mb", type=float, default=2048, help="cap on the synthetic data set (then epochs repeat)")
    p.add_argument("--quick", action="store_true", help="tiny CPU sizes: 32 px, batch 4, 2 steps, 2-block ViT")
    p.add_argument("--profile", action="store_true",
                   help="(a) ceiling: profile one more step after the timed ones; its top-10 ops go in the JSON")
    p.add_argument("--out", default="throughput.json", help="JSON file for all results")
    args = p.parse_args(argv)
    names = list(CASES) if args.case == "all" else args.case.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)} or all")
    args.cases = names
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = []
    for name in args.cases:
        run = run_case(name, args)
        print(report(run), flush=True)
        runs.append(run)
    out = {"runs": runs, "argv": sys.argv[1:] if argv is None else list(argv)}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
