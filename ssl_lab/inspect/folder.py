"""Inspect an image folder the way FolderDataModule reads it: flat, class sub-folders, or DeepLense train/val/{class}/.

Every file is counted; a (spread) sample of them is decoded fully, so truncated or corrupt files are found before
a run trips over them mid-epoch.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ssl_lab.errors import DataError
from ssl_lab.inspect.findings import INFO, WARNING, class_balance, command_line, finding, hydra_value

# as in ssl_lab.data.folder, which is not imported: it loads torch, and this command should start at once
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg"})
TIFF_EXTS = frozenset({".tif", ".tiff"})
ARRAY_EXTS = frozenset({".npy"})
KNOWN_EXTS = IMAGE_EXTS | TIFF_EXTS | ARRAY_EXTS
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"})
MAX_LISTED = 20  # unreadable files listed in the text findings (all of them are in the report's list)


def _split_dirs(root: Path) -> dict[str, Path]:
    """The folders FolderDataModule reads: root/{train,val[,test]} when train and val exist, else root itself."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        return {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    return {"all": root}


def _listing(d: Path) -> tuple[list[Path], dict[str, list[Path]], Counter]:
    """Image files directly in ``d``, image files per class sub-folder, and a count of other files by extension."""
    top, classes, ignored = [], {}, Counter()
    for p in sorted(d.iterdir()):
        if p.is_dir():
            files = sorted(q for q in p.iterdir() if q.is_file())
            ignored.update(q.suffix.lower() or "(none)" for q in files if q.suffix.lower() not in KNOWN_EXTS)
            kept = [q for q in files if q.suffix.lower() in KNOWN_EXTS]
            if kept:
                classes[p.name] = kept
        elif p.suffix.lower() in KNOWN_EXTS:
            top.append(p)
        else:
            ignored[p.suffix.lower() or "(none)"] += 1
    return top, classes, ignored


def examine(p: Path) -> dict[str, Any]:
    """Decode one file: PIL mode and size, or .npy / TIFF shape and dtype; ``error`` says why a file cannot be used."""
    if p.suffix.lower() in IMAGE_EXTS:
        try:
            with Image.open(p) as im:
                if im.mode not in GREY_MODES and any(";16" in str(t[3][0] if isinstance(t[3], tuple) else t[3])
                                                     for t in im.tile or []):
                    return {"error": "16-bit colour PNG: Pillow reads only 8 bits of it; the loader refuses it "
                                     "(store TIFF or .npy)"}
                im.load()
                out = {"mode": im.mode, "size": [im.size[1], im.size[0]], "channels": 1 if im.mode in GREY_MODES else 3}
                if im.mode.startswith("I") and int(np.asarray(im).max()) > 255:
                    out["over_255"] = True
                return out
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return {"error": f"{type(e).__name__}: {str(e).replace(f' {str(p)!r}', '')}"}
    if p.suffix.lower() in TIFF_EXTS:
        from ssl_lab.data.folder import _read_tiff  # the loader's own reader (tifffile, else Pillow)

        try:
            a = _read_tiff(p)
        except DataError as e:
            return {"error": str(e).replace(f"{p}: ", "")}
        kind = "tiff"
    else:
        try:
            a = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
        kind = "npy"
    if a.dtype.kind not in "iufb" or a.ndim not in (2, 3):
        return {"error": f"array {a.shape} {a.dtype}: expected numbers as [H, W], [C, H, W] or [H, W, C]"}
    c_axis = None if a.ndim == 2 else 0 if a.shape[0] <= a.shape[2] else 2
    size = list(a.shape) if c_axis is None else [s for i, s in enumerate(a.shape) if i != c_axis]
    out = {"mode": f"{kind} {a.dtype}", "shape": list(a.shape), "size": size,
           "channels": 1 if c_axis is None else int(a.shape[c_axis])}
    if a.dtype.kind == "f":
        out.update(nan=int(np.isnan(a).sum()), inf=int(np.isinf(a).sum()))
    return out


def _spread(files: list[Path], sample: int | None) -> list[Path]:
    if sample is None or sample >= len(files):
        return files
    return [files[i] for i in np.unique(np.linspace(0, len(files) - 1, sample).round().astype(np.int64))]


def inspect_folder(root: str | Path, sample: int | None = None) -> dict[str, Any]:
    """Findings for an image folder (json-ready dict); ``sample`` caps the files decoded (all are counted)."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DataError(f"{root}: folder not found; pass an HDF5 file or an image folder.")
    findings, splits, files, ignored = [], {}, [], Counter()
    try:
        for split, d in _split_dirs(root).items():
            top, classes, other = _listing(d)
            ignored += other
            if top and classes:
                findings.append(finding(WARNING, f"{d}: holds both image files and class sub-folders "
                                                 f"({', '.join(classes)}); the loader refuses this: keep one layout"))
            splits[split] = {"flat": len(top)} if top else {c: len(v) for c, v in classes.items()}
            files += top + [p for v in classes.values() for p in v]
    except OSError as e:
        raise DataError(f"{root}: cannot be listed ({e}); check the folder's permissions.") from None
    layout = ("flat" if "flat" in splits["all"] else "classes") if "all" in splits else "/".join(splits)
    report: dict[str, Any] = {"kind": "folder", "path": str(root), "layout": layout, "splits": splits,
                              "files": len(files), "ignored": dict(ignored)}
    if not files:
        exts = ", ".join(sorted(KNOWN_EXTS))
        findings.append(finding(WARNING, f"no image files ({exts}) directly inside or in class sub-folders"))
        return {**report, "examined": 0, "findings": findings, "suggestion": None, "suggestion_notes": []}
    examined = {p: examine(p) for p in _spread(files, sample)}
    good = [r for r in examined.values() if "error" not in r]
    report.update(
        examined=len(examined), modes=dict(Counter(r["mode"] for r in good)),
        sizes=dict(Counter("x".join(map(str, r["size"])) for r in good)),
        channels=dict(Counter(r["channels"] for r in good)),
        unreadable=[{"path": str(p), "reason": r["error"]} for p, r in examined.items() if "error" in r],
    )
    findings += _findings(report, examined, ignored)
    line, notes = _suggestion(root, report, good)
    return {**report, "findings": findings, "suggestion": line, "suggestion_notes": notes}


def _findings(report: dict[str, Any], examined: dict[Path, dict[str, Any]], ignored: Counter) -> list[dict]:
    out = [finding(INFO, f"{report['layout']} layout, {report['files']} image files; decoded {report['examined']}: "
                         f"modes {report['modes']}, sizes (H x W) {report['sizes']}")]
    for split, counts in report["splits"].items():
        if "flat" not in counts:
            where = "classes" if split == "all" else f"{split} classes"
            out += class_balance(where, counts, "Add a sub-folder for every class.")
    bad = report["unreadable"]
    if bad:
        listing = "; ".join(f"{b['path']} ({b['reason']})" for b in bad[:MAX_LISTED])
        more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        out.append(finding(WARNING, f"{len(bad)} of {report['examined']} files cannot be used: {listing}{more}; "
                                    "remove or replace them"))
    if ignored:
        out.append(finding(INFO, f"files the loader ignores (not PNG/JPG/TIFF/.npy): {dict(ignored)}"))
    kinds = {"npy" if k.startswith("npy") else "image" for k in report["modes"]}
    if len(kinds) > 1:
        out.append(finding(WARNING, "mixes .npy arrays and PNG/JPG/TIFF images; the loader refuses this: keep one "
                                    "kind"))
    depths = {"8-bit" if r["mode"] in EIGHT_BIT_MODES or r["mode"].endswith(" uint8") else "deeper"
              for r in examined.values() if "error" not in r and not r["mode"].startswith("npy")}
    if len(depths) > 1:
        out.append(finding(WARNING, "mixes 8-bit and 16-bit (or float) images, whose values are on different "
                                    "scales; the loader refuses this: convert every file to one bit depth"))
    if len(report["sizes"]) > 1:
        out.append(finding(INFO, f"image sizes differ ({len(report['sizes'])} sizes): set dataset.image_size to "
                                 "resize every file to one size"))
    if len(report["channels"]) > 1:
        if "npy" in kinds:
            out.append(finding(WARNING, f".npy channel counts differ between files: {report['channels']}"))
        else:
            out.append(finding(INFO, "mixes greyscale and colour images: dataset.in_chans=1 reads all as grey, 3 as "
                                     "RGB (grey ones with three equal channels)"))
    deep = [str(p) for p, r in examined.items() if r.get("over_255")]
    if deep:
        out.append(finding(INFO, f"{len(deep)} 16-bit images hold values above 255 (e.g. {deep[0]}); the loader "
                                 "reads them at full depth as float32, normalised in their own units"))
    nonfinite = [(p, r) for p, r in examined.items() if r.get("nan") or r.get("inf")]
    if nonfinite:
        out.append(finding(WARNING, f"{len(nonfinite)} .npy/TIFF files hold NaN/Inf (e.g. {nonfinite[0][0]}: "
                                    f"{nonfinite[0][1]['nan']} NaN, {nonfinite[0][1]['inf']} Inf); folders have no "
                                    "dataset.nan_policy: the loader refuses those its stats pass reads and passes "
                                    "the others to training as they are; replace them (numpy.nan_to_num)"))
    return out


def _suggestion(root: Path, report: dict[str, Any], good: list[dict[str, Any]]) -> tuple[str | None, list[str]]:
    """`python run.py dataset=mri ...` with the channel count and one image size every file is resized to."""
    if not good:
        return None, ["no file could be decoded"]
    chans = Counter(r["channels"] for r in good).most_common(1)[0][0]
    h, w = Counter(tuple(r["size"]) for r in good).most_common(1)[0][0]
    words = ["python", "run.py", "dataset=mri", f"dataset.root={hydra_value(str(root))}", f"dataset.in_chans={chans}",
             f"dataset.image_size={min(h, w)}"]
    notes = []
    if h != w or len(report["sizes"]) > 1:
        notes.append(f"dataset.image_size={min(h, w)} resizes every image to {min(h, w)} x {min(h, w)}")
    if any(r["mode"] in ("RGBA", "LA", "PA") for r in good):
        notes.append("the alpha channel of RGBA / LA images is dropped")
    return command_line(words), notes
