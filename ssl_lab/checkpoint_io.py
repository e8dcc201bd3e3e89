"""Training checkpoints: written atomically, read with weights_only=True, refused with a reason when they do not fit.

Lightning writes checkpoints through a CheckpointIO plugin; ours replaces its write with ``atomic_path`` (old or
new file after a kill, never a torn one) and its read with one that names the file and what is wrong: corrupt or
truncated, not a Lightning checkpoint, not from ssl_lab, or from another method, backbone or channel count (each
module stamps a header into the checkpoints it writes and checks it on load).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ssl_lab.artifacts import atomic_write, load_failure
from ssl_lab.errors import DataError

HEADER = "ssl_lab"
FORMAT = "ssl_lab.checkpoint"


def read_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint written by ssl_lab, loaded with ``weights_only=True``.

    ``mmap=True`` maps the tensors instead of reading them: a cheap check before a run writes anything."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint file; pass resume=auto or the path of a .ckpt file.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise DataError(f"{path}: cannot be read as a checkpoint (corrupt or truncated?): {load_failure(err)}. "
                        "Resume from another checkpoint, or start a new run.") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "pytorch-lightning_version" not in ckpt:
        raise DataError(f"{path}: not a Lightning training checkpoint (a backbone.pt goes to pretrained=, "
                        "not resume=).")
    header = ckpt.get(HEADER)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DataError(f"{path}: a Lightning checkpoint, but not one written by ssl_lab (no '{HEADER}' header); "
                        "resume only from <run_dir>/checkpoints/*.ckpt of an ssl_lab run.")
    return ckpt


def _describe(header: dict[str, Any]) -> str:
    bb = header.get("backbone") or {}
    what = f"task module {header.get('module')}"
    if header.get("method"):
        what = f"method={header['method']}"
    return f"{what}, backbone {bb.get('name')} with {bb.get('in_chans')} input channel(s)"


def check_fits(ckpt: dict[str, Any], module: torch.nn.Module, header: dict[str, Any], path: Any) -> None:
    """DataError unless the checkpoint holds the same weights (names and shapes) as ``module``."""
    theirs = ckpt["state_dict"]
    ours = module.state_dict()
    missing = [k for k in ours if k not in theirs]
    extra = [k for k in theirs if k not in ours]
    shapes = [k for k in ours if k in theirs and tuple(theirs[k].shape) != tuple(ours[k].shape)]
    saved = ckpt.get(HEADER) or {}
    # Weights of the same shapes can still mean another model (two methods with equal heads): the header decides.
    same = all(saved.get(k) == header.get(k) for k in ("module", "method")) and all(
        (saved.get("backbone") or {}).get(k) == (header.get("backbone") or {}).get(k) for k in ("name", "in_chans"))
    if same and not (missing or extra or shapes):
        return
    details = [] if (missing or extra or shapes) else ["its weights have the same shapes, but not the same model"]
    if shapes:
        k = shapes[0]
        details.append(f"{len(shapes)} tensor(s) differ in shape, e.g. {k}: {tuple(theirs[k].shape)} in the file, "
                       f"{tuple(ours[k].shape)} here")
    if missing:
        details.append(f"{len(missing)} weight(s) of this run are not in the file, e.g. {missing[0]}")
    if extra:
        details.append(f"{len(extra)} weight(s) in the file are not in this run, e.g. {extra[0]}")
    raise DataError(f"{path}: written by {_describe(saved)}; this run builds {_describe(header)}: "
                    f"{'; '.join(details)}. Resume with the same method, backbone and dataset, or start a new run.")


def resume_position(ckpt: dict[str, Any]) -> tuple[int, int]:
    """(epoch, batches of it already trained) where Lightning continues a checkpoint's run.

    A checkpoint written at the end of an epoch has that epoch processed: training continues with the next one
    from its start. One written mid-epoch (a preemption) continues the same epoch after its processed batches."""
    loops = ckpt.get("loops", {}).get("fit_loop", {})
    epoch = loops.get("epoch_progress", {}).get("current", {})
    batches = loops.get("epoch_loop.batch_progress", {}).get("current", {})
    processed = int(epoch.get("processed", ckpt.get("epoch", 0)))
    unfinished = any(int(epoch.get(k, processed)) != processed for k in ("ready", "started"))
    if unfinished:
        return processed, int(batches.get("processed", 0))
    return processed, 0


def prepare_resume(path: str | Path, model: torch.nn.Module, datamodule: Any) -> None:
    """Before anything is written: refuse a checkpoint of another method or backbone, and tell the data module
    where the run continues (mapped, not read: the Trainer loads the checkpoint itself)."""
    ckpt = read_checkpoint(path, mmap=True)
    check_fits(ckpt, model, model.checkpoint_header(), path)
    datamodule.resume_at(*resume_position(ckpt))


class CheckpointHeader:
    """Mixin for ssl_lab's LightningModules: stamp what built the weights into each checkpoint, check it on load."""

    def checkpoint_header(self) -> dict[str, Any]:
        backbone = getattr(self, "backbone", None)
        return {"format": FORMAT, "module": type(self).__name__, "method": getattr(self, "method_name", None),
                "backbone": backbone.meta() if hasattr(backbone, "meta") else None}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[HEADER] = self.checkpoint_header()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = getattr(self, "_trainer", None)
        path = getattr(trainer, "ckpt_path", None) or "the checkpoint"
        check_fits(checkpoint, self, self.checkpoint_header(), path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O with an atomic write and a checked read."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        return read_checkpoint(path, map_location if map_location is not None else "cpu")
