"""One split for both modes: every data module draws (train, val, test) by one code path seeded by split_seed, so
pretraining never fits on a downstream test image; splits.json records it, check_no_leak refuses what leaks, and
HDF5 files that keep their splits in separate keys (split_keys) load with their own test split."""

import itertools
import json
import logging
import shlex

import h5py
import numpy as np
import pytest
from conftest import TINY, compose_cfg
from hydra.utils import instantiate

from ssl_lab.data.folder import FolderDataModule
from ssl_lab.data.h5 import H5DataModule
from ssl_lab.data.jets_sim import JetsSimDataModule
from ssl_lab.data.lens_sim import LensSimDataModule
from ssl_lab.data.splits import check_no_leak, overlap, read_splits, same_source, write_splits
from ssl_lab.data.stl10 import STL10DataModule
from ssl_lab.errors import ConfigError, DataError
from ssl_lab.inspect import inspect_path

VAL_FRACTIONS, TEST_FRACTIONS, LABEL_FRACTIONS = (0.1, 0.3), (0.1, 0.25, 0.4), (0.3, 1.0)
SPLITS = ("train", "val", "test")


def write_h5(path, **arrays):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v, chunks=(4, *v.shape[1:]) if v.ndim > 1 else None)
    return str(path)


def images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 2, 4, 4)).astype(np.float32)


def labels(n, k=3):
    return np.random.default_rng(n).permutation(np.arange(n) % k)


def setup(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


def h5_builder(path, **fixed):
    def build(labelled, **kw):
        kw = {"batch_size": 4, "num_workers": 0, "label_key": "labels", **fixed, **kw}
        return setup(H5DataModule("t", path, 2, labelled=labelled, **kw))
    return build


# ---- the sources: every data module and split layout, on tiny data --------------------------------------------
def src_h5_seeded(d):
    return h5_builder(write_h5(d / "s.h5", images=images(45), labels=labels(45)))


def src_h5_tags_with_test(d):
    tags = np.array([0, 0, 0, 1, 2] * 9)
    return h5_builder(write_h5(d / "t3.h5", images=images(45), labels=labels(45), split=tags), split_key="split")


def src_h5_tags_train_val(d):
    tags = np.array([b"train", b"train", b"val"] * 15)
    return h5_builder(write_h5(d / "t2.h5", images=images(45), labels=labels(45), split=tags), split_key="split")


def _split_keys_file(d, name, parts):
    arrays = {}
    for i, (split, n) in enumerate(parts):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images(n, seed=i), labels(n)
    return write_h5(d / name, **arrays)


def src_h5_split_keys(d):
    path = _split_keys_file(d, "k3.h5", [("train", 30), ("val", 9), ("test", 12)])
    return h5_builder(path, split_keys={"train": "train_images", "val": "val_images", "test": "test_images"},
                      label_key="{split}_labels")


def src_h5_split_keys_no_val(d):
    path = _split_keys_file(d, "k2.h5", [("train", 30), ("test", 12)])
    return h5_builder(path, split_keys={"train": "train_images", "test": "test_images"}, label_key="{split}_labels")


def src_h5_labelled_path(d):
    lab = write_h5(d / "lab.h5", images=images(45), labels=labels(45))
    return h5_builder(write_h5(d / "unlab.h5", images=images(30, seed=5)), labelled_path=lab)


def _sim(cls, **sizes):
    def make(d):
        def build(labelled, **kw):
            kw = {"cache_dir": str(d), "batch_size": 4, "num_workers": 0, **sizes, **kw}
            return setup(cls(labelled=labelled, **kw))
        return build
    return make


def _npy_tree(root, layout):
    rng = np.random.default_rng(1)
    for split, per_class in layout:
        for c, n in zip(("a", "b", "c"), per_class):
            (root / split / c).mkdir(parents=True)
            for k in range(n):
                np.save(root / split / c / f"{k}.npy", rng.random((1, 4, 4)).astype(np.float32))
    return root


def _folder(layout):
    def make(d):
        root = _npy_tree(d / "f", layout)

        def build(labelled, **kw):
            return setup(FolderDataModule("f", str(root), 1, batch_size=2, num_workers=0, labelled=labelled, **kw))
        return build
    return make


def write_stl10(root, n_train=12, n_test=6, n_unlabeled=8):
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for part, n in [("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)]:
        rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(d / f"{part}_X.bin")
        if part != "unlabeled":
            (np.arange(n) % 3 + 1).astype(np.uint8).tofile(d / f"{part}_y.bin")
    return root


def src_stl10(d):
    root = write_stl10(d)

    def build(labelled, **kw):
        return setup(STL10DataModule("stl10", str(root), split="unlabeled+train", batch_size=2, num_workers=0,
                                     labelled=labelled, **kw))
    return build


SOURCES = {
    "lens_sim": _sim(LensSimDataModule, n_per_class=12, image_size=8),
    "jets_sim": _sim(JetsSimDataModule, n=36, image_size=8),
    "h5_seeded": src_h5_seeded,
    "h5_split_key_with_test": src_h5_tags_with_test,
    "h5_split_key_train_val": src_h5_tags_train_val,
    "h5_split_keys": src_h5_split_keys,
    "h5_split_keys_no_val": src_h5_split_keys_no_val,
    "h5_labelled_path": src_h5_labelled_path,
    "folder_classes": _folder([("", (10, 8, 6))]),
    "folder_train_val": _folder([("train", (6, 5, 4)), ("val", (2, 2, 2))]),
    "folder_train_val_test": _folder([("train", (6, 5, 4)), ("val", (2, 2, 2)), ("test", (2, 2, 2))]),
    "stl10": src_stl10,
}


def ids(record, split):
    return {(g, i) for g, v in record["splits"][split].items() for i in v}


def leaked(pre, down):
    return overlap(pre["splits"]["fit"], down["splits"]["test"]) if same_source(pre["source"], down["source"]) else 0


@pytest.mark.parametrize("name", SOURCES)
def test_pretraining_never_fits_on_the_downstream_test_split(name, tmp_path):
    build = SOURCES[name](tmp_path)
    for tf in TEST_FRACTIONS:
        pre = [build(False, val_fraction=vf, test_fraction=tf).split_record() for vf in VAL_FRACTIONS]
        down = {(vf, lf): build(True, val_fraction=vf, test_fraction=tf, label_fraction=lf).split_record()
                for vf, lf in itertools.product(VAL_FRACTIONS, LABEL_FRACTIONS)}
        first = next(iter(down.values()))
        assert ids(first, "test"), f"{name}: the downstream test split is empty"
        for (vf, lf), rec in down.items():
            assert rec["splits"]["test"] == first["splits"]["test"], (name, tf, vf, lf)  # fixed by tf and split_seed
            train, val, test, fit = (ids(rec, s) for s in (*SPLITS, "fit"))
            assert not (train & val or train & test or val & test), (name, tf, vf, lf)
            assert fit <= train and (lf < 1 or fit == train)
            assert rec["settings"]["mode"] == "downstream" and rec["settings"]["label_fraction"] == lf
            for p in pre:
                assert leaked(p, rec) == 0, (name, tf, vf, lf)  # any val_fraction against any other
        for p in pre:
            assert p["settings"]["mode"] == "pretrain"
            if same_source(p["source"], first["source"]):  # one split, both modes
                assert p["splits"]["test"] == first["splits"]["test"]
                assert ids(p, "fit") == ids(p, "train") | ids(p, "val") or name.startswith("h5_split_keys")
            else:
                assert name == "h5_labelled_path"  # pretraining reads the unlabelled file: nothing to hold out
                assert ids(p, "test") == set() and len(ids(p, "fit")) == 30
    again = build(True, seed=3, val_fraction=0.3, test_fraction=0.4).split_record()  # the run's seed moves nothing
    assert again["splits"] == down[(0.3, 1.0)]["splits"]
    dm = build(True, val_fraction=0.3, test_fraction=0.25)
    assert read_splits(write_splits(tmp_path / "run", dm)) == json.loads(json.dumps(dm.split_record()))


@pytest.mark.parametrize("name", ["h5_seeded", "folder_classes", "lens_sim"])
def test_split_seed_moves_the_test_split(name, tmp_path):
    build = SOURCES[name](tmp_path)
    a, b = (build(True, split_seed=s).split_record()["splits"]["test"] for s in (0, 1))
    assert a != b


def test_fit_is_what_the_training_loader_reads(tmp_path):
    x = images(40)
    x[[3, 17, 30], 0, 1, 1] = np.nan
    path = write_h5(tmp_path / "n.h5", images=x, labels=labels(40), row=np.arange(40.0))
    for labelled in (False, True):
        dm = h5_builder(path, nan_policy="drop", target_keys=["row"])(labelled, label_fraction=0.5)
        rec = dm.split_record()
        fit = set(rec["splits"]["fit"]["images"])
        assert not {3, 17, 30} & set().union(*(ids(rec, s) for s in (*SPLITS, "fit")))  # dropped everywhere
        read = [int(r) for b in dm.train_dataloader() for r in b["targets"][:, 0]]
        assert len(read) == len(set(read)) and set(read) <= fit
        assert len(read) == (len(fit) if labelled else len(fit) // 4 * 4)  # pretraining drops the ragged batch
    folder = SOURCES["folder_train_val"](tmp_path)(False)
    assert folder.split_record()["splits"]["fit"]["files"] == [
        f.split("/f/", 1)[1] for f in sorted(folder.train_set.files)]
    stl = SOURCES["stl10"](tmp_path / "s")(False)
    fit = stl.split_record()["splits"]["fit"]
    assert fit == {"unlabeled": list(range(8)), "train": list(range(12))} and len(stl.train_set) == 20


def test_split_record_names_the_source_and_the_settings(tmp_path):
    build = SOURCES["h5_labelled_path"](tmp_path)
    pre, down = build(False).split_record(), build(True).split_record()
    assert pre["source"]["path"] == str((tmp_path / "unlab.h5").resolve())
    assert down["source"]["path"] == str((tmp_path / "lab.h5").resolve())
    assert down["source"]["bytes"] == (tmp_path / "lab.h5").stat().st_size
    assert down["source"]["image_keys"] == ["images"] and down["source"]["kind"] == "hdf5"
    assert pre["settings"]["label_key"] is None and down["settings"]["label_key"] == "labels"
    assert {"split_seed", "test_fraction", "val_fraction", "label_fraction", "split_key", "split_keys", "mode"} <= set(
        down["settings"])


# ---- check_no_leak ------------------------------------------------------------------------------------------------
@pytest.fixture
def labelled_file(tmp_path):
    return write_h5(tmp_path / "lab.h5", images=images(60), labels=labels(60))


def pretrain_run(tmp_path, path, **kw):
    run = tmp_path / "pre"
    dm = h5_builder(path, **kw)(False)
    write_splits(run, dm)
    (run / "backbone.pt").write_bytes(b"")
    return run, dm


@pytest.mark.parametrize("pre_kw,down_kw,fix", [
    ({"label_key": None}, {}, r"read no labels.*pretrain with dataset\.label_key=labels"),
    ({"split_seed": 1}, {}, r"set dataset\.split_seed=1 as the pretraining run did \(this run has split_seed=0\)"),
    ({}, {"test_fraction": 0.4}, r"set dataset\.test_fraction=0\.2 .*test_fraction=0\.4"),
])
def test_check_no_leak_refuses_with_the_count_and_the_fix(tmp_path, labelled_file, pre_kw, down_kw, fix):
    run, pre = pretrain_run(tmp_path, labelled_file, **pre_kw)
    down = h5_builder(labelled_file)(True, **down_kw)
    n = len(set(pre.split_record()["splits"]["fit"]["images"]) & set(down.split_record()["splits"]["test"]["images"]))
    assert n > 0
    for pretrained in (run, run / "backbone.pt"):
        with pytest.raises(DataError, match=rf"^{n} of the {len(down.test_set)} test images of .*lab\.h5 were "
                                            rf"pretraining images of .*pre/splits\.json.*{fix}") as err:
            check_no_leak(str(pretrained), down)
        assert "\n" not in str(err.value)


def test_check_no_leak_passes_matching_settings_other_sources_and_old_runs(tmp_path, labelled_file, caplog):
    run, _ = pretrain_run(tmp_path, labelled_file, val_fraction=0.4, label_fraction=0.3)
    check_no_leak(str(run), h5_builder(labelled_file)(True, val_fraction=0.1, seed=5))  # same split settings
    other = write_h5(tmp_path / "other.h5", images=images(60, seed=3), labels=labels(60))
    check_no_leak(str(run), h5_builder(other)(True, split_seed=4))  # another file: nothing of it was pretrained on
    unlab = write_h5(tmp_path / "unlab.h5", images=images(30))
    two, _ = pretrain_run(tmp_path / "two", unlab, labelled_path=labelled_file)
    check_no_leak(str(two), h5_builder(unlab, labelled_path=labelled_file)(True))
    check_no_leak(None, None)
    check_no_leak("random", None)
    old = tmp_path / "old"
    old.mkdir()
    with caplog.at_level(logging.WARNING, logger="ssl_lab.data.splits"):
        check_no_leak(str(old / "backbone.pt"), h5_builder(labelled_file)(True))
    assert any("splits.json not found" in r.getMessage() for r in caplog.records)
    (old / "splits.json").write_text("{not json")
    with pytest.raises(DataError, match=r"old/splits\.json: cannot be read as splits\.json"):
        check_no_leak(str(old), h5_builder(labelled_file)(True))


# ---- HDF5 split_keys ------------------------------------------------------------------------------------------------
@pytest.fixture
def keyed(tmp_path):
    rng = np.random.default_rng(4)
    arrays = {}
    for split, n in [("train", 24), ("val", 8), ("test", 10)]:
        arrays[f"x_{split}"] = rng.normal(size=(n, 4, 4, 2)).astype(np.float32)
        arrays[f"y_{split}"], arrays[f"m_{split}"] = labels(n, 2), rng.normal(size=n)
    arrays["x_test"][[2, 7], 1, 1, 0] = np.nan
    return write_h5(tmp_path / "keyed.h5", **arrays), arrays


KEYS = {"train": "x_train", "val": "x_val", "test": "x_test"}


def test_split_keys_read_each_split_from_its_key(keyed):
    path, a = keyed
    kw = dict(split_keys=KEYS, label_key="y_{split}", target_keys=["m_{split}"], layout="NHWC")
    down = h5_builder(path, **kw)(True, stats_max_samples=10_000)
    assert (len(down.train_set), len(down.val_set), len(down.test_set)) == (24, 8, 10)
    item = down.test_set[3]
    np.testing.assert_array_equal(item["x"].numpy(), np.nan_to_num(a["x_test"][3].transpose(2, 0, 1)))
    assert int(item["y"]) == a["y_test"][3] and float(item["targets"][0]) == pytest.approx(a["m_test"][3])
    assert down.target_names == ["m"] and down.num_classes == 2
    np.testing.assert_allclose(down.mean.numpy(), a["x_train"].mean(axis=(0, 1, 2)), rtol=1e-5)  # the train key
    np.testing.assert_allclose(down.target_mean.numpy(), [a["m_train"].mean()], rtol=1e-5)
    drop = h5_builder(path, **kw)(True, nan_policy="drop")
    assert sorted(set(range(10)) - set(drop.test_set.indices.tolist())) == [2, 7] and drop.summary()["dropped"] == 2
    memory = h5_builder(path, **kw)(True, in_memory=True)
    assert np.array_equal(memory.test_set[3]["x"].numpy(), item["x"].numpy())
    block = h5_builder(path, **kw)(False, read="block", block_samples=4)
    assert block.read_mode == "block" and block.split_record()["splits"]["fit"] == {"x_train": list(range(24))}
    rows = sorted(float(t) for b in block.train_dataloader() for t in b["targets"][:, 0])
    assert rows == sorted(a["m_train"].astype(np.float32).tolist())  # every train-key row, nothing of val or test


def test_split_keys_refuse_bad_settings_naming_the_keys(keyed, tmp_path):
    path, a = keyed
    with pytest.raises(ConfigError, match=r"dataset\.split_key='s' and dataset\.split_keys are both set; use one"):
        H5DataModule("t", path, 2, split_key="s", split_keys=KEYS)
    with pytest.raises(ConfigError, match=r"split_keys has no train key"):
        H5DataModule("t", path, 2, split_keys={"test": "x_test"})
    with pytest.raises(ConfigError, match=r"'y_\{split\}' contains \{split\}.*dataset\.split_keys"):
        H5DataModule("t", path, 2, label_key="y_{split}")
    build = h5_builder(path, label_key="y_{split}", layout="NHWC")
    with pytest.raises(ConfigError, match=r"has no test key.*add test: <image key> to dataset\.split_keys"):
        build(True, split_keys={"train": "x_train", "val": "x_val"})
    assert len(build(False, split_keys={"train": "x_train", "val": "x_val"}).train_set) == 24  # pretraining is fine
    with pytest.raises(DataError, match=r"key 'y_train' has shape \(24,\) but 'x_val' has 8 images.*\{split\}"):
        build(True, split_keys=KEYS, label_key="y_train")
    odd = write_h5(tmp_path / "odd.h5", x_train=a["x_train"], x_test=a["x_test"][:, :3], y_train=a["y_train"],
                   y_test=a["y_test"])
    with pytest.raises(DataError, match=r"key 'x_test' holds images of shape \(3, 4, 2\).*but 'x_train' holds "
                                        r"\(4, 4, 2\)"):
        h5_builder(odd, label_key="y_{split}", layout="NHWC")(True, split_keys={"train": "x_train", "test": "x_test"})
    with pytest.raises(DataError, match=r"key 'x_tset' not found.*dataset\.split_keys\.test"):
        build(True, split_keys={**KEYS, "test": "x_tset"})


@pytest.mark.parametrize("val", [True, False])
def test_inspect_suggests_split_keys_and_the_line_loads(tmp_path, val):
    rng = np.random.default_rng(6)
    parts = [("train", 32), ("val", 8), ("test", 12)] if val else [("train", 32), ("test", 12)]
    arrays = {}
    for split, n in parts:
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels(n)[:, None].astype(np.uint8)
        arrays[f"mass_{split}"] = rng.normal(size=n).astype(np.float32)
    report = inspect_path(write_h5(tmp_path / "med.h5", **arrays))
    keys = ",".join(f"{s}:{s}_images" for s, _ in parts)
    assert f"'dataset.split_keys={{{keys}}}'" in report["suggestion"]
    assert """'dataset.label_key="{split}_labels"'""" in report["suggestion"]
    assert """'dataset.target_keys=["mass_{split}"]'""" in report["suggestion"]
    assert "dataset.image_key" not in report["suggestion"] and report["split_keys"] == dict(
        (s, f"{s}_images") for s, _ in parts)
    cfg = compose_cfg([*TINY, *shlex.split(report["suggestion"])[2:]])
    for labelled in (False, True):
        dm = setup(instantiate(cfg.dataset, labelled=labelled))
        assert (dm.in_chans, dm.image_shape, dm.num_classes, dm.target_names) == (3, (12, 12), 3, ["mass"])
        assert dm.split_record()["splits"]["test"] == {"test_images": list(range(12))}
    assert len(dm.test_set) == 12 and (len(dm.val_set) == 8 if val else len(dm.val_set) + len(dm.train_set) == 32)


def test_pretraining_writes_splits_json_before_training_and_downstream_checks_it(tmp_path, labelled_file,
                                                                                  monkeypatch):
    import lightning.pytorch as pl

    from ssl_lab.tasks.pretrain import pretrain

    def stop(*args, **kwargs):
        raise RuntimeError("stopped where training would start")

    monkeypatch.setattr(pl.Trainer, "fit", stop)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="where training would start"):
        pretrain(compose_cfg([*TINY, "dataset=lens_h5", f"dataset.path={labelled_file}", "dataset.in_chans=2",
                              "dataset.label_key=null", "augment.size=4", f"run_dir={run}"]))
    record = read_splits(run / "splits.json")
    assert record["splits"]["fit"] == {"images": list(range(60))}  # no labels read: everything is fit
    with pytest.raises(DataError, match=r"pretrain with dataset\.label_key=labels"):
        check_no_leak(str(run / "backbone.pt"), h5_builder(labelled_file)(True))
