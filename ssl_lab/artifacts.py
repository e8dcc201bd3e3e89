"""Run artefacts that outlive the run: atomic writes and the portable `backbone.pt` format."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ssl_lab.errors import DataError, DiskFull

BACKBONE_FORMAT = "ssl_lab.backbone"
BACKBONE_VERSION = 1


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`, renamed into place only if the block succeeds: a kill at any moment
    leaves the old file or the new one, never a torn one.

    The data are flushed to disk before the rename (a crash of the machine, not only of the process, must not
    leave a renamed but empty file). One writer per file: a temporary left by a writer that was killed is removed
    by the next write of the same file, so repeated kills do not fill the disk with half checkpoints."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the file should get what open() would give it
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except (OSError, RuntimeError) as err:
        if not _out_of_space(err, path.parent):
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"no partial {path.name} was left"
        raise DiskFull(f"{path}: no space left on the disk while writing it; {kept}. Free space there (or move "
                       "run_dir to another disk), then continue with resume=auto.") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _out_of_space(err: BaseException, folder: Path) -> bool:
    """ENOSPC or EDQUOT, as an OSError, or as the RuntimeError torch's zip writer raises instead ("unexpected pos",
    "file write failed"), told apart by the disk being (nearly) full while the partial temporary still holds it."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return "inline_container" in str(err) and shutil.disk_usage(folder).free < (64 << 20)


def _fsync(path: str | Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories on platforms that cannot open them
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    with atomic_path(path) as tmp:
        write(str(tmp))
    return Path(path)


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")

    return atomic_write(path, _write)


def save_backbone(path: str | Path, backbone: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Encoder weights plus a plain-python header, loadable with `torch.load(weights_only=True)`."""
    payload = {"format": BACKBONE_FORMAT, "version": BACKBONE_VERSION, "meta": dict(meta),
               "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()}}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_failure(err: BaseException) -> str:
    """Why torch.load refused a file, in one line and without torch's advice to retry with weights_only=False:
    ssl_lab never unpickles arbitrary objects, so that advice would only point at the unsafe way."""
    text = str(err).strip()
    if "weights only load failed" in text.lower() or "weights_only" in text:
        return ("it holds Python objects beyond tensors and plain values, which ssl_lab refuses to unpickle "
                "(weights_only=True): not a file ssl_lab wrote, or one that was altered")
    return text.splitlines()[0][:200] if text else type(err).__name__


def load_payload(path: Path, fmt: str, version: int, what: str, not_ours: str) -> dict[str, Any]:
    """A file of ssl_lab's own format ``fmt`` (a dict with "format" and "version"), loaded with weights_only=True;
    every failure names the file and what is wrong with it (``not_ours``: what to do with a file of another kind)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise DataError(f"{path}: cannot be read as a {what} (corrupt or truncated?): {load_failure(err)}.") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise DataError(f"{path}: not an ssl_lab {what} (no '{fmt}' header); {not_ours}.")
    if payload.get("version") != version:
        raise DataError(f"{path}: {what} format version {payload.get('version')} is not supported "
                        f"(this ssl_lab reads version {version}).")
    return payload


def run_file(path: str | Path, name: str, missing: str) -> Path:
    """`path` itself, or `<path>/<name>` when it is a run directory; DataError (``missing``: where such a file
    comes from) when there is no such file."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise DataError(f"{path}: no such {missing}.")
    return path


def load_backbone_file(path: str | Path) -> dict[str, Any]:
    """Read and check a `backbone.pt`; every failure names the file and what is wrong with it."""
    path = run_file(path, "backbone.pt", "backbone file; pass pretrained=<a pretraining run directory or its "
                                         "backbone.pt>")
    return load_payload(path, BACKBONE_FORMAT, BACKBONE_VERSION, "backbone file", "export one with task=pretrain")
