"""`python -m ssl_lab.inspect` and the startup check, on tiny HDF5 files and image folders written here."""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys

import h5py
import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from conftest import ROOT, TINY, compose_cfg, tiny_data
from ssl_lab.errors import DataError
from ssl_lab.inspect import inspect_folder, inspect_h5, inspect_path, startup_check
from ssl_lab.inspect.h5 import guess_layout


def write_h5(path, chunks=None, **arrays):
    with h5py.File(path, "w") as f:
        for key, a in arrays.items():
            f.create_dataset(key, data=a, chunks=(chunks, *a.shape[1:]) if chunks and a.ndim > 1 else None)
    return path


def key(report, name):
    return next(k for k in report["keys"] if k["key"] == name)


def warnings_of(report):
    return [f["message"] for f in report["findings"] if f["level"] == "warning"]


def loads(line, expect_chans, expect_hw):
    """Compose the real config with the suggested overrides and set the data module up."""
    words = shlex.split(line)
    assert words[:2] == ["python", "run.py"]
    cfg = compose_cfg([*TINY, *words[2:]])
    dm = instantiate(cfg.dataset)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.in_chans == expect_chans and dm.image_shape == expect_hw
    assert tuple(dm.train_set[0]["x"].shape) == (expect_chans, *expect_hw)
    return dm


# ---- HDF5 --------------------------------------------------------------------------------------------------------
def test_keys_in_groups_with_shape_dtype_chunks_and_compression(tmp_path):
    p = tmp_path / "g.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("data/images", data=np.zeros((12, 1, 16, 16), np.uint8), chunks=(4, 1, 16, 16),
                         compression="gzip", compression_opts=4)
        f["data/meta/labels"] = np.arange(12) % 3
        f["name"] = b"run 7"
    r = inspect_h5(p)
    img = key(r, "data/images")
    assert (img["shape"], img["dtype"], img["chunks"]) == ([12, 1, 16, 16], "uint8", [4, 1, 16, 16])
    assert img["compression"] == "gzip(4)" and "deflate" in img["filters"]
    lab = key(r, "data/meta/labels")
    assert lab["chunks"] is None and lab["compression"] is None and lab["role"] == "label"
    assert key(r, "name")["role"] == "other" and "stats" not in key(r, "name")
    assert (r["image_key"], r["label_key"]) == ("data/images", "data/meta/labels")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_nan_inf_per_channel_exact_and_streamed_stats_match_numpy(tmp_path, layout):
    rng = np.random.default_rng(0)
    x = (rng.normal(5.0, 2.0, (200, 3, 8, 8)) * np.array([1, 10, 100])[None, :, None, None]).astype(np.float32)
    x[3, 0, 1, 1] = x[150, 0, 2, 2] = np.nan  # channel 0: 2 NaN
    x[3, 2, 0, 0] = np.inf  # channel 2: 1 Inf, same row 3
    x[77, 2, 5, 5] = -np.inf
    stored = x if layout == "NCHW" else x.transpose(0, 2, 3, 1)
    p = write_h5(tmp_path / "s.h5", chunks=10, images=stored)
    r = inspect_h5(p, block_bytes=1)  # one chunk (10 rows) per read: the streamed merge runs over 20 blocks
    img = key(r, "images")
    assert img["layout"] == layout and img["channels"] == 3
    assert img["blocks_read"] == 20 and img["rows_examined"] == 200
    assert [(s["nan"], s["inf"]) for s in img["stats"]] == [(2, 0), (0, 0), (0, 2)]
    assert (img["nan"], img["inf"], img["bad_rows"]) == (2, 2, 3)
    for c, s in enumerate(img["stats"]):
        v = x[:, c].astype(np.float64)
        v = v[np.isfinite(v)]
        assert s["finite"] == v.size
        np.testing.assert_allclose([s["min"], s["max"]], [v.min(), v.max()])
        np.testing.assert_allclose([s["mean"], s["std"]], [v.mean(), v.std()], rtol=1e-12)
    assert any("channel 0: 2 NaN, 0 Inf; channel 2: 0 NaN, 2 Inf" in m for m in warnings_of(r))
    assert "dataset.nan_policy=zero" in r["suggestion"]


def test_layout_guess_from_shape():
    assert guess_layout((100, 125, 125, 8)) == ("NHWC", 8, False)
    assert guess_layout((100, 8, 125, 125)) == ("NCHW", 8, False)
    assert guess_layout((100, 3, 40, 60))[:2] == ("NCHW", 3)
    assert guess_layout((100, 40, 60, 3))[:2] == ("NHWC", 3)
    assert guess_layout((100, 64, 64)) == ("NHW", 1, False)
    assert guess_layout((10, 4, 4, 4), declared="NHWC") == ("NHWC", 4, False)  # the file's own record wins


def test_jets_like_file_roles_labels_and_targets(tmp_path):
    rng = np.random.default_rng(1)
    y = np.array([0] * 14 + [1] * 10, np.float32)[:, None]  # CMS files store Y as float (N, 1)
    p = write_h5(tmp_path / "j.h5", chunks=8, jet=rng.random((24, 16, 16, 8), np.float32), Y=y,
                 m=rng.normal(size=24).astype(np.float32), pT=rng.normal(size=24), event=np.arange(24) * 1000)
    r = inspect_h5(p)
    assert (key(r, "jet")["layout"], key(r, "jet")["channels"]) == ("NHWC", 8)
    assert key(r, "Y")["classes"] == {0: 14, 1: 10}
    assert (r["label_key"], r["target_keys"]) == ("Y", ["m", "pT"])
    assert key(r, "event")["role"] == "other"  # an id column: integer, but far too many values for classes
    assert not warnings_of(r)


def test_single_class_and_heavy_imbalance_are_flagged(tmp_path):
    imgs = np.zeros((40, 1, 8, 8), np.float32) + np.arange(40, dtype=np.float32)[:, None, None, None]
    one = inspect_h5(write_h5(tmp_path / "one.h5", images=imgs, labels=np.zeros(40, np.int64)))
    assert any("single class" in m for m in warnings_of(one))
    skewed = inspect_h5(write_h5(tmp_path / "skew.h5", images=imgs, labels=np.array([0] * 37 + [1] * 3)))
    assert key(skewed, "labels")["classes"] == {0: 37, 1: 3}
    assert any("imbalance" in m and "12x" in m for m in warnings_of(skewed))
    fine = inspect_h5(write_h5(tmp_path / "fine.h5", images=imgs, labels=np.arange(40) % 2))
    assert not warnings_of(fine)


def test_constant_channel_is_flagged(tmp_path):
    x = np.random.default_rng(2).random((30, 16, 16, 3), np.float32)
    x[..., 1] = 0.25
    r = inspect_h5(write_h5(tmp_path / "c.h5", images=x))
    assert [m for m in warnings_of(r) if "constant" in m] == ["'images': channel 1 is constant (0.25); it carries "
                                                                "no information"]


def test_sample_reads_spread_blocks_and_at_most_n_rows(tmp_path):
    x = np.repeat(np.arange(1000, dtype=np.float32), 64).reshape(1000, 1, 8, 8)  # row i holds the value i
    r = inspect_h5(write_h5(tmp_path / "big.h5", chunks=10, images=x, labels=np.arange(1000) // 500), sample=64)
    img = key(r, "images")
    assert img["rows_examined"] == 64 and img["blocks_read"] >= 4
    assert img["stats"][0]["max"] > 900  # spread over the key, not its first 64 rows
    assert key(r, "labels")["rows_examined"] == 1000  # a 1-D column is read whole: the balance needs every label


@pytest.mark.parametrize("case", ["nchw_1_channel", "nhwc_8_channels_labels"])
def test_the_suggested_line_loads_the_file(tmp_path, case):
    rng = np.random.default_rng(3)
    if case == "nchw_1_channel":
        x = rng.random((40, 1, 32, 32), np.float32)
        x[5, 0, 3, 3] = np.nan
        p = write_h5(tmp_path / "lens.h5", chunks=8, images=x)
        chans, classes = 1, None
    else:
        p = write_h5(tmp_path / "jets.h5", chunks=8, X_jets=rng.random((40, 24, 24, 8), np.float32),
                     y=np.arange(40) % 2, mass=rng.normal(size=40).astype(np.float32))
        chans, classes = 8, 2
    r = inspect_path(p)
    assert "dataset=lens_h5" in r["suggestion"]
    hw = (32, 32) if chans == 1 else (24, 24)
    dm = loads(r["suggestion"], chans, hw)
    assert dm.num_classes == classes
    if classes:
        assert dm.target_names == ["mass"] and "dataset.label_key=y" in r["suggestion"]
    else:
        assert "dataset.label_key=null" in r["suggestion"]


def test_truncated_file_is_a_data_error_naming_it(tmp_path):
    p = write_h5(tmp_path / "t.h5", images=np.zeros((50, 1, 16, 16), np.float32))
    p.write_bytes(p.read_bytes()[:3000])
    with pytest.raises(DataError, match="t.h5: cannot be opened as HDF5"):
        inspect_path(p)


def test_constants_agree_with_the_loaders():
    from ssl_lab.data import folder as data_folder
    from ssl_lab.data import h5 as data_h5
    from ssl_lab.inspect import folder, h5

    assert (h5.LAYOUT_ATTR, h5.SCALE_ATTR) == (data_h5.LAYOUT_ATTR, data_h5.SCALE_ATTR)
    assert (folder.IMAGE_EXTS, folder.ARRAY_EXTS) == (data_folder.IMAGE_EXTS, data_folder.ARRAY_EXTS)


# ---- folders ------------------------------------------------------------------------------------------------------
def png(path, a):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "imgs"
    for c, n in [("cat", 5), ("dog", 3)]:
        for k in range(n):
            png(root / c / f"{k}.png", np.full((16, 20, 3), 30 * k, np.uint8))
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_folder_classes_sizes_modes_and_unreadable_files(class_folder):
    r = inspect_folder(class_folder)
    assert r["layout"] == "classes" and r["splits"] == {"all": {"cat": 5, "dog": 4}}
    assert r["modes"] == {"RGB": 8} and r["sizes"] == {"16x20": 8} and r["ignored"] == {".txt": 1}
    assert [u["path"] for u in r["unreadable"]] == [str(class_folder / "dog" / "broken.png")]
    assert any("broken.png" in m and "1 of 9 files" in m for m in warnings_of(r))


def test_folder_suggestion_loads(class_folder):
    (class_folder / "dog" / "broken.png").unlink()
    r = inspect_path(class_folder)
    assert "dataset.in_chans=3" in r["suggestion"] and "dataset.image_size=16" in r["suggestion"]
    dm = loads(r["suggestion"], 3, (16, 16))
    assert dm.class_names == ["cat", "dog"]


def test_deeplense_npy_folder_and_its_suggestion(tmp_path):
    root = tmp_path / "lens"
    rng = np.random.default_rng(4)
    for split, n in [("train", 6), ("val", 2)]:
        for c in ("no_sub", "vortex"):
            (root / split / c).mkdir(parents=True)
            for k in range(n):
                np.save(root / split / c / f"{k}.npy", rng.random((1, 24, 24)).astype(np.float32))
    r = inspect_folder(root)
    assert r["layout"] == "train/val" and r["splits"]["val"] == {"no_sub": 2, "vortex": 2}
    assert r["modes"] == {"npy float32": 16} and r["channels"] == {1: 16}
    loads(r["suggestion"], 1, (24, 24))


# ---- the command ---------------------------------------------------------------------------------------------------
def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ssl_lab.inspect", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_text_and_json(tmp_path):
    p = write_h5(tmp_path / "x.h5", images=np.random.default_rng(5).random((20, 1, 16, 16), np.float32),
                 labels=np.arange(20) % 4)
    text = cli(p)
    assert text.returncode == 0, text.stderr
    assert "images" in text.stdout and "label, 4 classes" in text.stdout
    assert f"python run.py dataset=lens_h5 dataset.path={p}" in text.stdout
    js = cli(p, "--json", "--sample", 5)
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert data["label_key"] == "labels" and key(data, "images")["rows_examined"] == 5


@pytest.mark.parametrize("what", ["missing", "not_hdf5", "truncated"])
def test_cli_bad_path_is_one_line_and_exit_2(tmp_path, what):
    p = tmp_path / "in.h5"
    if what == "not_hdf5":
        p.write_text("a,b\n1,2\n")
    elif what == "truncated":
        write_h5(p, images=np.zeros((50, 1, 16, 16), np.float32))
        p.write_bytes(p.read_bytes()[:3000])
    out = cli(p)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssl_lab: error: ") and str(p) in lines[0]
    assert "Traceback" not in out.stderr


# ---- the check at the start of a run ------------------------------------------------------------------------------
def test_pretraining_logs_a_warning_naming_nan_pixels(tmp_path, caplog):
    from ssl_lab.tasks.pretrain import build_pretraining

    x = np.random.default_rng(6).random((40, 1, 32, 32), np.float32)
    x[7, 0, 4, 4] = x[9, 0, 1, 2] = np.nan
    p = write_h5(tmp_path / "nan.h5", chunks=8, images=x)
    with caplog.at_level(logging.INFO, logger="ssl_lab.inspect"):
        build_pretraining(compose_cfg([*TINY, "dataset=lens_h5", f"dataset.path={p}"]))
    ours = [r for r in caplog.records if r.name == "ssl_lab.inspect"]
    warned = [r.getMessage() for r in ours if r.levelno == logging.WARNING]
    assert any("2 NaN" in m and "channel 0" in m for m in warned), warned
    assert any(r.levelno == logging.INFO and "sampled 40 of 40 rows" in r.getMessage() for r in ours)


def test_startup_check_reads_a_bounded_sample(tmp_path, monkeypatch):
    from ssl_lab.data.h5 import H5DataModule

    x = np.random.default_rng(7).random((1000, 1, 16, 16), np.float32)
    p = write_h5(tmp_path / "big.h5", chunks=10, images=x, labels=np.arange(1000) % 3)
    dm = H5DataModule("t", str(p), 1, label_key="labels", batch_size=8, num_workers=0, stats_max_samples=16)
    dm.prepare_data()
    dm.setup("fit")
    rows_read = {}
    real = h5py.Dataset.__getitem__

    def counting(self, idx):
        out = real(self, idx)
        rows_read[self.name] = rows_read.get(self.name, 0) + (len(out) if np.ndim(out) else 1)
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    lines = startup_check(dm, max_rows=64)
    assert 0 < rows_read["/images"] <= 64 and any("sampled 64 of 1000 rows" in line for line in lines)
    assert any("3 classes" in line for line in lines)
    rows_read.clear()
    startup_check(dm, max_rows=10_000, max_bytes=100 * 16 * 16 * 4)  # the byte budget: 100 rows
    assert 0 < rows_read["/images"] <= 100


def test_startup_check_finds_an_unreadable_file_setup_did_not_decode(tmp_path, caplog):
    from ssl_lab.data.folder import FolderDataModule

    root = tmp_path / "dl"
    for split, n in [("train", 4), ("val", 2)]:
        for c in ("a", "b"):
            for k in range(n):
                png(root / split / c / f"{k}.png", np.full((16, 16), 40 * k, np.uint8))
    (root / "val" / "b" / "zz.png").write_bytes(b"garbage")  # val files are not read by setup
    dm = FolderDataModule("f", str(root), 1, batch_size=2, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    with caplog.at_level(logging.INFO, logger="ssl_lab.inspect"):
        lines = startup_check(dm)
    warned = [r.getMessage() for r in caplog.records if r.name == "ssl_lab.inspect" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "zz.png" in warned[0] and warned[0] in lines


def test_startup_check_never_fails_the_run(tmp_path, caplog):
    from ssl_lab.data.h5 import H5DataModule

    p = write_h5(tmp_path / "gone.h5", images=np.random.default_rng(8).random((20, 1, 16, 16), np.float32))
    dm = H5DataModule("t", str(p), 1, batch_size=4, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    p.unlink()
    with caplog.at_level(logging.WARNING, logger="ssl_lab.inspect"):
        lines = startup_check(dm)
    assert len(lines) == 1 and "quick data check failed" in lines[0] and "gone.h5" in lines[0]
    assert startup_check(object()) == []  # a data module it does not know: nothing to do


def test_startup_check_reads_the_file_the_mode_reads(tmp_path, cache_dir):
    from ssl_lab.data.h5 import H5DataModule

    rng = np.random.default_rng(9)
    unlab = write_h5(tmp_path / "unlab.h5", jet=rng.random((24, 16, 16, 8), np.float32))
    lab = write_h5(tmp_path / "lab.h5", jet=rng.random((24, 16, 16, 8), np.float32), Y=np.arange(24) % 2)
    for labelled, source in [(False, unlab), (True, lab)]:
        dm = H5DataModule("j", str(unlab), 8, image_key="jet", label_key="Y", layout="NHWC", labelled_path=str(lab),
                          labelled=labelled, batch_size=4, num_workers=0)
        dm.prepare_data()
        dm.setup("fit")
        lines = startup_check(dm)
        assert lines and all(f"inspect: {source}:" in line for line in lines)
        assert any("2 classes" in line for line in lines) == labelled  # pretraining reads no labels from path
    sim = instantiate(compose_cfg([*TINY, *tiny_data("lens_sim", cache_dir)]).dataset)
    sim.prepare_data()
    sim.setup("fit")
    lines = startup_check(sim)  # a simulated data set: its cached file is inspected
    assert any(f"{sim.path}:" in line and "3 classes" in line for line in lines)
