"""Look at data before training on it: keys, layouts, NaN/Inf, per-channel statistics, class balance, and a
command line that loads it. `python -m ssl_lab.inspect <file or folder>`; `startup_check` runs a bounded version
at the start of every run, so problems show up in the run log before they show up as a NaN loss hours later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from ssl_lab.errors import DataError
from ssl_lab.inspect.folder import inspect_folder
from ssl_lab.inspect.h5 import DEFAULT_BLOCK_BYTES, inspect_h5
from ssl_lab.inspect.report import format_report
from ssl_lab.inspect.startup import startup_check

__all__ = ["inspect_path", "inspect_h5", "inspect_folder", "format_report", "startup_check"]


def inspect_path(path: str | Path, sample: int | None = None, block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict[str, Any]:
    """Inspect an HDF5 file or an image folder; ``sample`` caps the rows (HDF5 images) or files decoded (folder)."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        return inspect_folder(p, sample)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder; pass an HDF5 file or an image folder.")
    try:
        is_h5 = p.is_file() and h5py.is_hdf5(p)
    except OSError as e:
        raise DataError(f"{p}: cannot be read ({e}); check the file's permissions.") from None
    if not is_h5:
        raise DataError(f"{p}: is neither an HDF5 file (no HDF5 signature) nor a folder; pass an .h5 file or an "
                        "image folder.")
    return inspect_h5(p, sample, block_bytes=block_bytes)
