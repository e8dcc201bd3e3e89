"""Inspect an HDF5 file: every dataset's shape, dtype and storage, guessed roles, streamed statistics, a suggestion.

Keys may be far larger than memory (a 30 GB jets file), so each is read in blocks of whole HDF5 chunks along the
sample axis of about ``block_bytes``; with a row limit the blocks are spread evenly over the key, because files are
often sorted by class and the first rows alone would mislead.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ssl_lab.errors import DataError
from ssl_lab.inspect.findings import INFO, WARNING, class_balance, command_line, finding, hydra_value
from ssl_lab.inspect.stats import ChannelStats, ValueCounts

DEFAULT_BLOCK_BYTES = 64 << 20
CHUNK_ROW_LIMIT = 256 << 20  # a read never holds more; chunks spanning more rows are read part by part
SPREAD_BLOCKS = 8  # a row-limited read takes at least this many blocks spread over the key
MAX_CLASSES = 100  # an integer-valued 1-D column with values 0..MAX_CLASSES-1 is read as class labels
MIN_SIDE = 4  # an image's height and width are at least this
LABEL_NAMES = ("labels", "label", "y", "class", "classes", "targets_class")
# attribute names ssl_lab.data.h5 reads (written by python -m ssl_lab.prepare); not imported from there because
# that module loads torch, which would make this command take seconds to start
LAYOUT_ATTR, SCALE_ATTR = "ssl_lab_layout", "ssl_lab_scale"
SPLIT_NAMES = ("train", "val", "test")  # as dataset.split_keys names them; {split} stands for one in a key name
_SEPARATORS = re.compile(r"([_\-/.])")


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def storage(ds: h5py.Dataset) -> dict[str, Any]:
    """Chunk shape and the filter pipeline (every filter by name, also those h5py has no shortcut for)."""
    plist = ds.id.get_create_plist()
    filters = [_text(plist.get_filter(i)[3]) for i in range(plist.get_nfilters())]
    comp = ds.compression
    if comp is not None and ds.compression_opts is not None:
        comp = f"{comp}({ds.compression_opts})"
    return {"chunks": list(ds.chunks) if ds.chunks else None, "compression": comp, "filters": filters}


def guess_layout(shape: tuple[int, ...], declared: str | None = None) -> tuple[str, int, bool]:
    """(layout, channels, ambiguous) of a rank-3/4 image array.

    Rank 3 is (N, H, W), one channel. Rank 4: a layout the file records wins; else the layout whose two spatial
    axes are equal (images are mostly square), else the one with fewer channels than the other would have.
    """
    if len(shape) == 3:
        return "NHW", 1, False
    if declared in ("NCHW", "NHWC"):
        return declared, shape[1] if declared == "NCHW" else shape[3], False
    nchw_square, nhwc_square = shape[2] == shape[3], shape[1] == shape[2]
    if nchw_square != nhwc_square:
        return ("NCHW", shape[1], False) if nchw_square else ("NHWC", shape[3], False)
    ambiguous = shape[1] == shape[3] or nchw_square
    return ("NCHW", shape[1], ambiguous) if shape[1] <= shape[3] else ("NHWC", shape[3], ambiguous)


def _spatial(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    return {"NHW": shape[1:3], "NCHW": shape[2:4], "NHWC": shape[1:3]}[layout]


def row_ranges(ds: h5py.Dataset, limit: int, block_bytes: int) -> list[tuple[int, int]]:
    """[lo, hi) reads of whole chunk rows, about block_bytes each, at most ``limit`` rows, spread over the key."""
    n = int(ds.shape[0])
    limit = min(n, limit)
    row_bytes = max(1, math.prod(ds.shape[1:]) * ds.dtype.itemsize)
    chunk = ds.chunks[0] if ds.chunks else 1
    if chunk * row_bytes > max(4 * block_bytes, CHUNK_ROW_LIMIT):  # chunks split along the other axes instead
        chunk = 1
    rows = max(1, block_bytes // row_bytes)
    if limit < n:
        rows = min(rows, -(-limit // SPREAD_BLOCKS))
    rows = max(chunk, rows // chunk * chunk)
    starts = np.arange(0, n, rows)
    if limit < n:
        k = min(len(starts), -(-limit // rows))
        starts = starts[np.unique(np.linspace(0, len(starts) - 1, k).round().astype(np.int64))]
    out, left = [], limit
    for s in starts.tolist():
        take = min(rows, n - s, left)
        out.append((s, s + take))
        left -= take
        if left <= 0:
            break
    return out


def _is_column(shape: tuple[int, ...]) -> bool:
    return len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)


def describe(key: str, ds: h5py.Dataset, layout: str | None = None, is_image: bool = False) -> dict[str, Any]:
    """Facts that need no data read, plus an image layout guess from the shape (``layout`` given: used instead).

    ``is_image``: the caller knows this key holds the images (a data module that already checked it)."""
    shape = tuple(ds.shape or ())
    info = {"key": key, "shape": list(shape), "dtype": str(ds.dtype), **storage(ds), "role": "other"}
    if ds.dtype.kind in "uif" and len(shape) in (3, 4) and shape[0] > 0:
        declared = layout or ds.attrs.get(LAYOUT_ATTR)
        layout, chans, ambiguous = guess_layout(shape, None if declared is None else _text(declared))
        if is_image or min(_spatial(shape, layout)) >= MIN_SIDE:
            info.update(role="image", layout=layout, channels=int(chans), layout_ambiguous=ambiguous,
                        quantised=SCALE_ATTR in ds.attrs)
    return info


def scan(ds: h5py.Dataset, info: dict[str, Any], limit: int, block_bytes: int) -> None:
    """Stream the key once: per-channel stats for images, one channel plus value counts for other keys."""
    image = info["role"] == "image"
    channel_axis = {"NCHW": 1, "NHWC": 3}.get(info.get("layout")) if image else None
    stats = ChannelStats(info["channels"] if channel_axis is not None else 1)
    values = ValueCounts() if _is_column(tuple(ds.shape)) else None
    ranges = row_ranges(ds, limit, block_bytes)
    for lo, hi in ranges:
        block = ds[lo:hi]
        stats.update(block, channel_axis)
        if values is not None:
            values.update(block)
    info.update(rows=int(ds.shape[0]), rows_examined=stats.rows, blocks_read=len(ranges), stats=stats.result(),
                nan=int(stats.nan.sum()), inf=int(stats.inf.sum()), bad_rows=stats.bad_rows)
    if values is not None:
        info.update(distinct=values.distinct, integral=values.integral)
        if values.integral and values.distinct is not None and values.distinct <= MAX_CLASSES:
            info["classes"] = values.classes()


def _column_role(info: dict[str, Any], n_images: int | None) -> str:
    """label / target / split / other for a 1-D numeric column, from its values."""
    if n_images is not None and info["shape"][0] != n_images:
        return "other"
    if "split" in info["key"].rsplit("/", 1)[-1].lower() and set(info.get("classes", {})) <= {0, 1, 2}:
        return "split" if info.get("classes") else "other"
    classes = info.get("classes")
    # class ids 0..K-1 (the loader's contract), each used about twice or more: not an id or a count column
    if classes and min(classes) >= 0 and max(classes) < MAX_CLASSES and 2 * len(classes) <= info["rows_examined"]:
        return "other" if info["nan"] or info["inf"] else "label"  # the loader refuses non-finite labels
    if info["dtype"].startswith("float") and not info.get("integral", False):
        return "target"
    return "other"


def assign_roles(keys: list[dict[str, Any]], image_key: str | None = None) -> dict[str, Any]:
    """Pick the image key (``image_key``, else the biggest image-like array), its label, target and split columns."""
    images = [k for k in keys if k["role"] == "image"]
    main = next((k for k in images if k["key"] == image_key), None) if image_key else None
    main = main or max(images, key=lambda k: math.prod(k["shape"]), default=None)
    n = main["shape"][0] if main else None
    for k in keys:
        if k["role"] == "other" and "stats" in k and _is_column(tuple(k["shape"])):
            k["role"] = _column_role(k, n)
    labels = sorted((k for k in keys if k["role"] == "label"),
                    key=lambda k: k["key"].rsplit("/", 1)[-1].lower() not in LABEL_NAMES)
    splits = [k for k in keys if k["role"] == "split"]
    return {
        "image": main, "others": [k for k in images if k is not main],
        "label": labels[0] if labels else None, "other_labels": labels[1:],
        "targets": [k for k in keys if k["role"] == "target"], "split": splits[0] if splits else None,
    }


def split_template(key: str) -> tuple[str, str] | None:
    """(split, template) when ``key`` starts or ends with a split name: train_images -> ("train", "{split}_images"),
    X_test -> ("test", "X_{split}"); None otherwise."""
    words = _SEPARATORS.split(key)
    hits = [i for i, w in enumerate(words) if w in SPLIT_NAMES]
    if len(hits) != 1 or hits[0] not in (0, len(words) - 1):
        return None
    split, words[hits[0]] = words[hits[0]], "{split}"
    return split, "".join(words)


def split_layout(keys: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A file that stores its splits as separate keys (train_images / test_images, X_train / X_test): the image key
    of each split, and the label and target key templates whose columns hold one value per image of each split.

    Image keys qualify when a train key and at least one other split share a template and agree in shape (but the
    row count) and dtype; None when no such keys exist."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for info in keys:
        found = split_template(info["key"])
        if found:
            groups.setdefault(found[1], {})[found[0]] = info
    candidates = [
        (math.prod(members["train"]["shape"]), template, members) for template, members in groups.items()
        if "train" in members and len(members) > 1 and all(m["role"] == "image" for m in members.values())
        and len({(tuple(m["shape"][1:]), m["dtype"]) for m in members.values()}) == 1
    ]
    if not candidates:
        return None
    _, image_template, images = max(candidates, key=lambda c: c[0])
    rows = {split: info["shape"][0] for split, info in images.items()}
    labels, targets = [], []
    for template, members in groups.items():
        columns = {split: members.get(split) for split in images}
        if template == image_template or any(
                m is None or "stats" not in m or not _is_column(tuple(m["shape"])) for m in columns.values()):
            continue
        roles = {_column_role(m, rows[split]) for split, m in columns.items()}
        if roles == {"label"}:
            labels.append((template, columns))
        elif roles == {"target"}:
            targets.append((template, columns))
    labels.sort(key=lambda t: for_split_name(t[0]).lower() not in LABEL_NAMES)
    return {"split_keys": {split: images[split]["key"] for split in SPLIT_NAMES if split in images},
            "images": images, "label": labels[0] if labels else None, "targets": targets}


def for_split_name(template: str) -> str:
    """The template's name without its split part ("{split}_labels" -> "labels"), to rank label candidates."""
    return template.replace("{split}", "").strip("_-./")


def _quoted(value: str) -> str:
    """An override value holding {split}: in double quotes, which Hydra reads as a plain string (bare braces would
    start a dict) and the shell leaves alone inside the single quotes command_line puts around the word."""
    return f'"{value}"' if not set(value) & set('"\\\'') else hydra_value(value)


def key_findings(info: dict[str, Any]) -> list[dict[str, str]]:
    """NaN/Inf (per channel for images), constant channels and the value range of one key."""
    key, out = info["key"], []
    if "error" in info:
        return [finding(WARNING, f"'{key}' could not be read: {info['error']}")]
    if "stats" not in info:
        return out
    if info["rows"] == 0:
        return [finding(WARNING, f"'{key}' holds 0 rows")]
    image = info["role"] == "image"
    where = f"'{key}'" + (f" (read {info['rows_examined']} of {info['rows']} rows)"
                          if info["rows_examined"] < info["rows"] else "")
    if info["nan"] or info["inf"]:
        per = "; ".join(f"channel {s['channel']}: {s['nan']} NaN, {s['inf']} Inf"
                        for s in info["stats"] if s["nan"] or s["inf"])
        rows = f"{info['bad_rows']} row{'s' * (info['bad_rows'] != 1)}"
        out.append(finding(WARNING, f"{where}: {info['nan']} NaN and {info['inf']} Inf values in {rows}"
                                    + (f" ({per})" if image else "")))
    for s in info["stats"]:
        if s["finite"] == 0:
            out.append(finding(WARNING, f"{where}: channel {s['channel']} has no finite value"))
        elif s["min"] == s["max"] and (image or info["role"] == "target"):
            what = f"channel {s['channel']}" if image else "every value"
            out.append(finding(WARNING, f"{where}: {what} is constant ({s['min']:.6g}); it carries no information"))
    finite = [s for s in info["stats"] if s["finite"]]
    if image and finite:
        lo, hi = min(s["min"] for s in finite), max(s["max"] for s in finite)
        note = ""
        if info.get("quantised"):
            note = " (uint8 codes of python -m ssl_lab.prepare; the loader decodes them to the original units)"
        elif info["dtype"] == "uint8":
            note = " (the loader divides uint8 by 255)"
        elif hi - lo > 255:
            note = " (not scaled; training normalises each channel by its mean / std)"
        out.append(finding(INFO, f"{where}: {info['dtype']} values in [{lo:.6g}, {hi:.6g}]{note}"))
    return out


def suggestion(path: Path, roles: dict[str, Any], splits: dict[str, Any] | None = None
               ) -> tuple[str | None, list[str]]:
    """A `python run.py dataset=lens_h5 ...` line that loads this file, and notes on the choices it made.

    ``splits`` (from split_layout): the file keeps its splits in separate keys, and the line sets
    dataset.split_keys with {split} templates for the label and target keys instead of one image key."""
    image = roles["image"]
    if image is None:
        return None, ["no image-like key (a rank 3 or 4 numeric array, N x C x H x W or N x H x W x C)"]
    label, targets = roles["label"], roles["targets"]
    words = ["python", "run.py", "dataset=lens_h5", f"dataset.path={hydra_value(str(path))}"]
    notes = []
    if splits is not None:
        mapping = ",".join(f"{s}:{hydra_value(k)}" for s, k in splits["split_keys"].items())
        words.append(f"dataset.split_keys={{{mapping}}}")
        label_word = _quoted(splits["label"][0]) if splits["label"] else "null"
        target_words = [_quoted(t) for t, _ in splits["targets"]]
        if "val" not in splits["split_keys"]:
            notes.append("no val key: val is carved from the train key by dataset.val_fraction")
        if "test" not in splits["split_keys"]:
            notes.append("no test key: the file serves pretraining only (downstream tasks report on a test split)")
    else:
        words.append(f"dataset.image_key={hydra_value(image['key'])}")
        label_word = hydra_value(label["key"]) if label else "null"
        target_words = [hydra_value(t["key"]) for t in targets]
    words += [f"dataset.in_chans={image['channels']}",
              f"dataset.layout={'NCHW' if image['layout'] == 'NHW' else image['layout']}",
              f"dataset.label_key={label_word}"]
    if target_words:
        words.append(f"dataset.target_keys=[{','.join(target_words)}]")
    if roles["split"] is not None and splits is None:
        words.append(f"dataset.split_key={hydra_value(roles['split']['key'])}")
    if any(t["nan"] or t["inf"] for t in targets):
        words.append("dataset.nan_policy=drop")
        notes.append("regression targets hold NaN/Inf: dataset.nan_policy=drop leaves those samples out (the loader "
                     "refuses non-finite targets otherwise)")
    elif image["nan"] or image["inf"]:
        words.append("dataset.nan_policy=zero")
        notes.append("images hold NaN/Inf: dataset.nan_policy=zero replaces them by 0 (counted in the run log), "
                     "drop leaves those samples out, error stops at the first one")
    if image.get("layout_ambiguous"):
        notes.append(f"layout {image['layout']} is a guess from shape {tuple(image['shape'])}; check it")
    split_images = set(splits["split_keys"].values()) if splits else set()
    for other in roles["others"]:
        if other["key"] not in split_images:
            notes.append(f"'{other['key']}' is image-like too: use dataset.image_key={other['key']} to train on it")
    for other in roles["other_labels"]:
        notes.append(f"'{other['key']}' looks like labels too")
    if label is None:
        notes.append("no label key (a 1-D integer-valued column with few values, one per image): pretraining only")
    return command_line(words), notes


def inspect_h5(
    path: str | Path, sample: int | None = None, max_bytes: int | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES, keys: list[str] | None = None, image_key: str | None = None,
    layout: str | None = None,
) -> dict[str, Any]:
    """Findings for an HDF5 file (json-ready dict).

    ``sample`` caps the rows read per multi-dimensional key, ``max_bytes`` the bytes read per key (1-D columns are
    capped by max_bytes only: the class balance needs every label). ``keys`` restricts the inspection to those
    keys; ``image_key`` / ``layout`` fix what would otherwise be guessed (a data module already knows them).
    """
    p = Path(path).expanduser().absolute()
    if not p.is_file():
        raise DataError(f"{p}: file not found; pass an HDF5 file or an image folder.")
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise DataError(f"{p}: cannot be opened as HDF5 ({e}); the file may be truncated or still being written.")
    with f:
        names: list[str] = []
        f.visititems(lambda k, v: names.append(k) if isinstance(v, h5py.Dataset) else None)
        if keys is not None:
            names = [k for k in keys if isinstance(f.get(k), h5py.Dataset)]
        infos = []
        for key in names:
            ds = f[key]
            info = describe(key, ds, layout if key == image_key else None, key == image_key)
            infos.append(info)
            if ds.dtype.kind not in "uifb" or not info["shape"]:
                continue
            row_bytes = max(1, math.prod(ds.shape[1:]) * ds.dtype.itemsize)
            limit = int(ds.shape[0])
            if sample is not None and not _is_column(tuple(ds.shape)):
                limit = min(limit, sample)
            if max_bytes is not None:
                limit = min(limit, max(1, max_bytes // row_bytes))
            try:
                scan(ds, info, limit, block_bytes)
            except (OSError, ValueError) as e:  # e.g. a compression filter this h5py lacks, a damaged chunk
                info["error"] = str(e)
    roles = assign_roles(infos, image_key)
    splits = split_layout(infos)
    if splits is not None:  # the train key is the image key; its label and target columns are the train split's
        roles["image"] = splits["images"]["train"]
        roles["label"] = splits["label"][1]["train"] if splits["label"] else None
        roles["targets"] = [columns["train"] for _, columns in splits["targets"]]
        for role, found in [("label", [splits["label"]] if splits["label"] else []), ("target", splits["targets"])]:
            for _, columns in found:
                for info in columns.values():
                    info["role"] = role
    findings = [x for info in infos for x in key_findings(info)]
    if roles["label"] is not None:
        findings += class_balance(f"labels '{roles['label']['key']}'", roles["label"]["classes"],
                                  "Check that the file holds every class.")
    for info in infos:
        if info["role"] == "other" and info.get("integral") and info.get("classes") and (info["nan"] or info["inf"]):
            findings.append(finding(WARNING, f"'{info['key']}' looks like class labels but holds NaN/Inf; "
                                             "dataset.label_key cannot use it until they are fixed"))
    line, notes = suggestion(p, roles, splits)
    return {
        "kind": "hdf5", "path": str(p), "bytes": p.stat().st_size, "keys": infos,
        "image_key": roles["image"]["key"] if roles["image"] else None,
        "label_key": roles["label"]["key"] if roles["label"] else None,
        "target_keys": [t["key"] for t in roles["targets"]],
        "split_key": roles["split"]["key"] if roles["split"] and splits is None else None,
        "split_keys": splits["split_keys"] if splits else None,
        "split_label_key": splits["label"][0] if splits and splits["label"] else None,
        "split_target_keys": [t for t, _ in splits["targets"]] if splits else [],
        "findings": findings, "suggestion": line, "suggestion_notes": notes,
    }
