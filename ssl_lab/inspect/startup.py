"""The quick look every run takes at its data, after the data module's own checks passed.

It reads a bounded, spread sample (a few thousand rows / tens of MB of an HDF5 key, a few hundred files of a
folder), so it costs well under a second even on a 30 GB file, and logs what it saw to the run log: facts at INFO,
problems (NaN/Inf, constant channels, unreadable files, a single class or a heavy imbalance) at WARNING. It never
stops a run: the data module raises the errors that must stop one.
"""

from __future__ import annotations

import logging
from typing import Any

from ssl_lab.inspect.findings import INFO, WARNING, finding
from ssl_lab.inspect.folder import inspect_folder
from ssl_lab.inspect.h5 import inspect_h5

log = logging.getLogger("ssl_lab.inspect")

STARTUP_ROWS = 2048  # rows of the image key
STARTUP_BYTES = 32 << 20  # bytes of any one key
STARTUP_FILES = 256  # files of a folder decoded


def _h5_report(dm: Any, max_rows: int, max_bytes: int) -> dict[str, Any]:
    """The file and keys this mode reads: labelled_path's in labelled mode when set (see H5DataModule)."""
    use_labelled = dm.labelled and dm.labelled_path is not None
    image_key, keys = dm.read_keys()  # with split_keys: every split's image, label and target keys
    return inspect_h5(dm.labelled_path if use_labelled else dm.path, sample=max_rows, max_bytes=max_bytes,
                      keys=keys, image_key=image_key, layout=dm.layout)


def _per_channel(stats: list[dict[str, Any]], field: str) -> str:
    return "[" + ", ".join("-" if s[field] is None else f"{s[field]:.4g}" for s in stats) + "]"


def _h5_summary(report: dict[str, Any]) -> list[dict[str, str]]:
    return [
        finding(INFO, f"'{k['key']}': sampled {k['rows_examined']} of {k['rows']} rows ({k['dtype']}, {k['layout']}): "
                      + ", ".join(f"{f} {_per_channel(k['stats'], f)}" for f in ("min", "max", "mean", "std"))
                      + " per channel")
        for k in report["keys"] if k["role"] == "image" and k.get("rows_examined")
    ]


def _folder_extra(dm: Any, report: dict[str, Any]) -> list[dict[str, str]]:
    """What only the data module's settings make a problem: sizes that will not stack, colours turned grey."""
    out = []
    if dm.image_size is None and len(report.get("sizes", {})) > 1:
        out.append(finding(WARNING, f"image sizes differ ({report['sizes']}) and dataset.image_size "
                                    "is null: training stops at the first file whose size differs from the first "
                                    "file's; set dataset.image_size"))
    colour = report.get("channels", {}).get(3, 0)
    if dm.in_chans == 1 and colour:
        out.append(finding(INFO, f"{colour} sampled files are colour images; dataset.in_chans=1 reads them as "
                                   "greyscale"))
    return out


def _findings(dm: Any, max_rows: int, max_bytes: int, max_files: int) -> tuple[str, list[dict[str, str]]]:
    """(the file or folder inspected, its findings); ("", []) for a data module of another kind."""
    from ssl_lab.data.folder import FolderDataModule  # imported here: they load torch, this package does not
    from ssl_lab.data.h5 import H5DataModule

    if isinstance(dm, H5DataModule):  # the simulated data modules too: they read their cached file
        report = _h5_report(dm, max_rows, max_bytes)
        return report["path"], _h5_summary(report) + report["findings"]
    if isinstance(dm, FolderDataModule):
        report = inspect_folder(dm.root, sample=max_files)
        return report["path"], report["findings"] + _folder_extra(dm, report)
    return "", []


def startup_check(
    datamodule: Any, max_rows: int = STARTUP_ROWS, max_bytes: int = STARTUP_BYTES, max_files: int = STARTUP_FILES,
) -> list[str]:
    """Inspect a sample of the data a set-up data module reads, log the findings, and return them as lines."""
    try:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank != 0:  # every rank reads the same data: one report is enough
            return []
        where, found = _findings(datamodule, max_rows, max_bytes, max_files)
    except Exception as e:  # noqa: BLE001 - a look at the data must never be what stops a run
        line = f"inspect: the quick data check failed ({type(e).__name__}: {e}); training goes on"
        log.warning(line)
        return [line]
    lines = []
    for f in found:
        line = f"inspect: {where}: {f['message']}"
        log.log(logging.WARNING if f["level"] == WARNING else logging.INFO, "%s", line)
        lines.append(line)
    return lines
