"""A Lightning callback that kills its own process with SIGKILL at a moment chosen by the environment, for the
fault-injection test: the run's config stays the same from start to start (so resume=auto accepts it), only
`SSL_LAB_TEST_KILL=<moment>:<n>` changes.

Moments: `step:<n>` (inside optimizer step n, after the backward pass), `ckpt:<n>` (halfway through writing the
n-th checkpoint file), `export:<n>` (halfway through writing the n-th backbone.pt), `enospc:<n>` (the n-th
checkpoint write runs out of disk space halfway: OSError ENOSPC, the process lives on). No variable: nothing happens.
"""
from __future__ import annotations

import errno
import io
import os
import signal

import lightning.pytorch as pl
import torch

ENV = "SSL_LAB_TEST_KILL"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(pl.Callback):
    def __init__(self) -> None:
        spec = os.environ.get(ENV)
        self.moment, self.n = (spec.split(":")[0], int(spec.split(":")[1])) if spec else (None, -1)
        if self.moment in ("ckpt", "export", "enospc"):
            self._patch_save("backbone.pt" if self.moment == "export" else "last.ckpt")

    def _patch_save(self, name: str) -> None:
        original, seen = torch.save, [0]

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and f".{name}." in os.fspath(f):  # atomic_path's temporary
                seen[0] += 1
                if seen[0] == self.n:
                    buf = io.BytesIO()
                    original(obj, buf, *args, **kwargs)
                    with open(f, "wb") as fh:  # half the file on disk, then the process is gone
                        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                        fh.flush()
                        os.fsync(fh.fileno())
                    if self.moment == "enospc":
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(f))
                    _die()
            return original(obj, f, *args, **kwargs)

        torch.save = save

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.moment == "step" and trainer.global_step == self.n:
            _die()


class CorruptFiles(pl.Callback):
    """Truncate ``files`` (to their first 40 bytes) when step ``step`` ends, in the first run that gets there
    (``once``: a marker path): data that goes bad after the start-up checks, as a large folder's does hours in."""

    def __init__(self, files: list[str], step: int, once: str) -> None:
        self.files, self.step, self.once = list(files), int(step), once

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or os.path.exists(self.once):
            return
        open(self.once, "w").close()
        for f in self.files:
            with open(f, "r+b") as fh:
                fh.truncate(40)
