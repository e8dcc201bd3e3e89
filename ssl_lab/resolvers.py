"""OmegaConf resolvers the configs use, registered by `run.py` (and by anything composing conf/ itself).

Cheap at composition time: no torch import unless a value asks for the device, no weights read."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

DOWNSTREAM_SCRATCH = "scratch"  # the run name's method slot for a backbone trained from random initialisation


def or_else(value: Any, default: Any) -> Any:
    return default if value in (None, "") else value


def by_device(accelerator: Any, gpu: Any, cpu: Any) -> Any:
    """`${by_device:${accelerator.accelerator},<on a GPU>,<on the CPU>}`: defaults sized for where the run goes.
    `auto` means the GPU when torch sees one (what Lightning's `auto` picks)."""
    name = str(accelerator)
    if name in ("gpu", "cuda"):
        return gpu
    if name == "auto":
        import torch

        return gpu if torch.cuda.is_available() else cpu
    return cpu


def pretrained_method(pretrained: Any, method: Any, task: Any) -> str:
    """The method slot of a run's name: the method a downstream run's backbone was pretrained with (read from the
    pretraining run's saved config, or the backbone file's header), `scratch` for random initialisation, and the
    configured method for the tasks that train one (pretrain, pipeline). A source that cannot be read names
    itself `pretrained`: the task then refuses it with the reason."""
    if str(task) in ("pretrain", "pipeline"):
        return str(method)
    if pretrained in (None, "", "random"):
        return DOWNSTREAM_SCRATCH
    path = Path(str(pretrained))
    folder = path if path.is_dir() else path.parent
    saved = folder / "config.yaml"
    try:
        if saved.is_file():
            name = OmegaConf.load(saved).get("method", {}).get("name")
            if name:
                return str(name)
        if path.is_file():
            import torch

            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return str(payload.get("meta", {}).get("method") or "pretrained")
    except Exception:  # noqa: BLE001 - a name must never fail a run; loading the source reports what is wrong
        return "pretrained"
    return "pretrained"


RESOLVERS = {"or_else": or_else, "by_device": by_device, "pretrained_method": pretrained_method}


def register() -> None:
    for name, fn in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)
