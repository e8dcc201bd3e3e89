"""Options that change how fast a pretraining step runs, never what it computes: channels_last, torch.compile.

(Fused optimizers live in ``optim.build_optimizer``; cuDNN autotuning in ``tasks.common.trainer_kwargs``.)

Why compile the backbone and not the whole step: the step runs inside Lightning (logging, precision plugin, DDP
hooks) after views are made in ``on_after_batch_transfer`` from a per-step ``torch.Generator``, and losses gather
across ranks; each of these breaks a traced graph or is not traceable, so a whole-step compile would fall back to
eager in pieces, recompile, or refuse. The backbone holds nearly all the FLOPs and has static shapes per view size.
``nn.Module.compile`` compiles it in place, so state-dict keys, ``backbone.pt`` and checkpoints stay unchanged
(``torch.compile(module)`` would prefix every key with ``_orig_mod.``). ViTs compile their transformer blocks, which
both the backbone's forward and MAE's masked encoder run.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ssl_lab.errors import ConfigError

log = logging.getLogger(__name__)

CHANNELS_LAST = ("auto", True, False)


def uses_cuda(accelerator: str) -> bool:
    """Whether the Trainer will run on a CUDA device for ``accelerator.accelerator``."""
    return str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def check_device(accelerator: str, resume: str | None = None) -> None:
    """accelerator=gpu where torch sees no CUDA device: one line before any folder is made (Lightning would stop
    with a traceback, after the run directory exists)."""
    if str(accelerator) not in ("gpu", "cuda") or torch.cuda.is_available():
        return
    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    moved = ("; a run started on a GPU continues on the CPU with resume=force accelerator=cpu"
             if resume in ("auto", "extend") else "")
    raise ConfigError(f"accelerator.accelerator={accelerator}, but torch {torch.__version__} ({build}) sees no CUDA "
                      f"device here: use accelerator=cpu (or accelerator=auto, which takes a GPU when there is one)"
                      f"{moved}.")


def is_conv_net(module: nn.Module) -> bool:
    """A network of convolutions (ResNet, VGG), not a ViT whose only convolution is its patch embedding."""
    return sum(isinstance(m, nn.Conv2d) for m in module.modules()) > 1


def resolve_channels_last(option: Any, backbone: nn.Module, accelerator: str) -> bool:
    """``auto``: on for conv nets on CUDA, where cuDNN's NHWC kernels (tensor cores, bf16) are the fast ones; on
    the CPU and for ViTs it brings nothing and would only add layout conversions."""
    if option == "auto":
        return uses_cuda(accelerator) and is_conv_net(backbone)
    if isinstance(option, bool):
        return option
    raise ConfigError(f"accelerator.channels_last={option!r}: choose auto (on for conv nets on CUDA), true or false.")


def compile_targets(model: nn.Module) -> dict[str, nn.Module]:
    """The modules ``accelerator.compile`` compiles, by their name in ``model``."""
    backbone = model.backbone
    blocks = getattr(getattr(backbone, "model", None), "blocks", None)
    if isinstance(blocks, nn.Module):  # timm ViT: MAE calls the blocks directly, never backbone.__call__
        return {"backbone.model.blocks": blocks}
    features = getattr(backbone, "features", None)
    if isinstance(features, nn.Module):  # VGG: the conv_mlp head calls backbone.forward_features, i.e. features
        return {"backbone.features": features}
    return {"backbone": backbone}


def _compile_error(err: BaseException) -> bool:
    """Errors raised by Dynamo, Inductor or a backend rather than by the model's own code."""
    dynamo_exc = getattr(getattr(torch, "_dynamo", None), "exc", None)
    base = getattr(dynamo_exc, "TorchDynamoException", None)
    return (base is not None and isinstance(err, base)) or type(err).__module__.startswith(
        ("torch._dynamo", "torch._inductor", "torch._subclasses"))


def _guarded(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """Turn a failure inside torch.compile into one ConfigError that says which option to switch off."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if not _compile_error(err):
                raise
            root = err  # Dynamo wraps the backend's own error; that one says what went wrong
            while getattr(root, "inner_exception", None) or root.__cause__:
                root = getattr(root, "inner_exception", None) or root.__cause__
            lines = [line.strip() for line in str(root).splitlines() if line.strip()]
            why = f"{type(root).__name__}: {lines[0][:300] if lines else ''}"
            raise ConfigError(f"accelerator.compile=true: torch.compile failed on {name} ({why}); set "
                              "accelerator.compile=false to train without it.") from err

    return call


def check_compiler(device_type: str, backend: str = "inductor") -> None:
    """Fail before training, not at the first step, when Inductor has no code generator for the device."""
    if backend != "inductor":
        return
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("accelerator.compile=true on CUDA needs triton (shipped with torch's CUDA wheels); "
                              "pip install triton, or set accelerator.compile=false.")
        return
    cxx = os.environ.get("CXX") or "g++"
    if not any(shutil.which(c) for c in (cxx, "g++", "clang++", "c++")):
        raise ConfigError("accelerator.compile=true on the CPU needs a C++ compiler (g++ or clang++) for "
                          "torch.compile's Inductor backend; install one, or set accelerator.compile=false.")


def compile_model(model: nn.Module, device_type: str, backend: str = "inductor", **kwargs: Any) -> list[str]:
    """Compile ``compile_targets(model)`` in place (lazily: the work happens on the first step); their names."""
    check_compiler(device_type, backend)
    names = []
    for name, module in compile_targets(model).items():
        module.compile(backend=backend, **kwargs)
        compiled = getattr(module, "_compiled_call_impl", None)  # where nn.Module.compile keeps the compiled call
        if compiled is not None:
            module._compiled_call_impl = _guarded(compiled, name)
        names.append(name)
    log.info("accelerator.compile: %s compiled with torch.compile (the first steps take longer)", ", ".join(names))
    return names


def apply_speed_options(model: nn.Module, accelerator: Mapping[str, Any]) -> dict[str, Any]:
    """Apply ``accelerator.channels_last`` and ``accelerator.compile`` to a built SSL method; the record of what
    was used (for the run summary). Missing keys mean off/auto, so configs from before these options still work."""
    compile_opt = accelerator.get("compile", False)
    if not isinstance(compile_opt, bool):
        raise ConfigError(f"accelerator.compile={compile_opt!r}: choose true (torch.compile the backbone) or false.")
    acc = str(accelerator.get("accelerator", "auto"))
    channels_last = resolve_channels_last(accelerator.get("channels_last", "auto"), model.backbone, acc)
    if channels_last:
        # Only 4-D tensors change layout; Lightning's later .to(device) keeps it, and cuDNN then runs every
        # convolution in NHWC (the first one converts the views).
        model.to(memory_format=torch.channels_last)
    compiled = compile_model(model, "cuda" if uses_cuda(acc) else "cpu") if compile_opt else []
    return {"compile": compile_opt, "compiled": compiled, "channels_last": channels_last}


def optimizer_impl(optimizer: torch.optim.Optimizer | None) -> str | None:
    """How an optimizer steps: 'fused' (one kernel), 'foreach' (batched over tensors) or 'for-loop'."""
    if optimizer is None:
        return None
    defaults = optimizer.defaults
    return "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "for-loop"
