"""Labelled (downstream) mode of every data module: seeded stratified train/val/test splits, label_fraction,
regression-target statistics, the labelled_path rule and the errors that explain bad settings."""

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ssl_lab.data.folder import FolderDataModule
from ssl_lab.data.h5 import H5DataModule
from ssl_lab.data.jets_sim import JetsSimDataModule
from ssl_lab.data.lens_sim import LensSimDataModule
from ssl_lab.data.stl10 import STL10DataModule
from ssl_lab.errors import ConfigError, DataError

Y = np.array([0] * 60 + [1] * 30 + [2] * 10)


def write(path, **arrays):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
    return str(path)


def images(n, c=2, seed=0):
    return np.random.default_rng(seed).normal(1.0, 2.0, size=(n, c, 3, 3)).astype(np.float32)


def setup(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


def h5(path, labelled=True, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 0)
    kw.setdefault("label_key", "labels")
    return setup(H5DataModule("t", str(path), 2, labelled=labelled, **kw))


@pytest.fixture
def labelled_file(tmp_path):
    rng = np.random.default_rng(3)
    perm = rng.permutation(len(Y))  # classes interleaved, so a split that ignored labels would not keep ratios
    m, pt = rng.normal(50, 10, len(Y)), rng.normal(300, 40, len(Y))
    return write(tmp_path / "lab.h5", images=images(len(Y)), labels=Y[perm], m=m, pT=pt), Y[perm], np.stack([m, pt], 1)


def test_splits_are_disjoint_stratified_and_cover_everything(labelled_file):
    path, y, _ = labelled_file
    dm = h5(path, test_fraction=0.2, val_fraction=0.25, seed=1)
    tr, va, te = dm.train_indices, dm.val_indices, dm.test_indices
    assert np.bincount(y[te]).tolist() == [12, 6, 2]  # 20% of each class
    assert np.bincount(y[va]).tolist() == [12, 6, 2]  # 25% of each class's remainder
    assert np.bincount(y[tr]).tolist() == [36, 18, 6]
    assert np.array_equal(np.sort(np.concatenate([tr, va, te])), np.arange(100))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (60, 20, 20)
    assert [int(dm.test_set[i]["y"]) for i in range(len(te))] == y[te].tolist()


def test_splits_are_determined_by_the_split_seed(labelled_file):
    path, _, _ = labelled_file
    a, b, c = h5(path, split_seed=4), h5(path, split_seed=4, seed=7), h5(path, split_seed=5)
    for split in ("train_indices", "val_indices", "test_indices"):
        assert np.array_equal(getattr(a, split), getattr(b, split))
    assert not np.array_equal(a.test_indices, c.test_indices)


def test_label_fraction_thins_train_only_and_keeps_one_per_class(labelled_file):
    path, y, _ = labelled_file
    full, tenth, tiny = (h5(path, seed=2, label_fraction=f) for f in (1.0, 0.1, 0.01))
    assert np.array_equal(full.test_indices, tenth.test_indices)  # the test split never depends on label_fraction
    assert np.array_equal(full.test_indices, tiny.test_indices) and np.array_equal(full.val_indices, tiny.val_indices)
    counts = np.bincount(y[full.train_indices])  # [38, 19, 6] with val_fraction 0.2 of the remainder
    assert np.bincount(y[tenth.train_indices]).tolist() == [max(1, round(0.1 * c)) for c in counts]
    assert np.bincount(y[tiny.train_indices]).tolist() == [1, 1, 1]
    assert set(tiny.train_indices) <= set(tenth.train_indices) <= set(full.train_indices)  # nested subsets
    # image statistics still use every training image: label_fraction limits labels, not images
    assert torch.allclose(full.mean, tenth.mean) and torch.allclose(full.std, tenth.std)
    s = tenth.summary()
    assert (s["n_train"], s["n_val"], s["n_test"], s["label_fraction"]) == (7, 17, 20, 0.1)
    assert s["labelled"] is True and s["test_fraction"] == 0.2 and s["class_names"] == ["0", "1", "2"]


def test_target_stats_equal_numpy_on_the_train_split(labelled_file):
    path, _, targets = labelled_file
    for fraction in (1.0, 0.3):
        dm = h5(path, target_keys=["m", "pT"], label_fraction=fraction)
        t = targets[dm.train_indices]
        assert dm.target_mean.dtype == torch.float32 and dm.target_mean.shape == (2,)
        np.testing.assert_allclose(dm.target_mean.numpy(), t.mean(0), rtol=1e-6)
        np.testing.assert_allclose(dm.target_std.numpy(), t.std(0), rtol=1e-5)
        assert dm.summary()["target_mean"] == pytest.approx(t.mean(0).tolist(), rel=1e-6)
    assert h5(path).target_mean is None and h5(path).target_std is None


def test_loaders_keep_ragged_batches_but_never_a_single_sample(labelled_file):
    path, y, _ = labelled_file
    dm = h5(path, batch_size=8)  # 63 train samples: 7 full batches + one of 7
    sizes = [len(b["y"]) for b in dm.train_dataloader()]
    assert sum(sizes) == 63 and sizes[-1] == 7
    sizes = [len(b["y"]) for b in h5(path, batch_size=31).train_dataloader()]  # 63 = 2 * 31 + 1
    assert sizes == [31, 31]
    test = list(dm.test_dataloader())
    assert torch.equal(torch.cat([b["y"] for b in test]), torch.from_numpy(y[dm.test_indices]))
    assert sum(len(b["y"]) for b in dm.val_dataloader()) == len(dm.val_indices)
    small = h5(path, batch_size=64, label_fraction=0.1)  # fewer samples than a batch is fine downstream
    assert [len(b["y"]) for b in small.train_dataloader()] == [len(small.train_indices)]


def test_pretraining_mode_fits_on_everything_but_the_test_split(labelled_file):
    path, _, _ = labelled_file
    dm = h5(path, labelled=False, label_fraction=0.1)
    down = h5(path, label_fraction=0.1)
    assert len(dm.train_set) == 80 and dm.test_set is None  # label_fraction limits downstream labels only
    assert np.array_equal(dm.test_indices, down.test_indices) and not set(dm.train_indices) & set(down.test_indices)
    assert dm.summary()["labelled"] is False and "n_test" not in dm.summary()
    with pytest.raises(DataError, match="no test split in pretraining mode.*labelled=True"):
        dm.test_dataloader()


def test_labelled_path_rule(tmp_path, labelled_file):
    lab, y, targets = labelled_file
    unlab = write(tmp_path / "unlab.h5", images=images(37, seed=9))
    kw = dict(label_key="labels", target_keys=["m", "pT"], labelled_path=lab)
    pre = h5(unlab, labelled=False, **kw)  # the unlabelled file has no 'labels', 'm' or 'pT': none is looked for
    assert len(pre.train_set) == 37 and pre.summary()["path"] == unlab  # no labels read: nothing held out
    assert set(pre.train_set[0]) == {"x"} and pre.num_classes is None and pre.target_names == []
    down = h5(unlab, labelled=True, **kw)  # downstream reads everything from the labelled file
    assert down.summary()["path"] == lab and len(down.train_set) + len(down.val_set) + len(down.test_set) == 100
    item = down.train_set[0]
    j = int(down.train_indices[0])
    assert int(item["y"]) == y[j] and np.allclose(item["targets"].numpy(), targets[j])
    # without labelled_path both modes read labels from path
    both = h5(lab, labelled=False, target_keys=["m"])
    assert set(both.train_set[0]) == {"x", "y", "targets"}
    with pytest.raises(DataError, match=r"key 'labels' not found.*dataset\.labelled_path"):
        h5(unlab, labelled=False)


@pytest.mark.parametrize(
    "tags,given_test", [(np.array([0, 1, 2, 0, 0] * 20), True), (np.array([0, 0, 0, 1] * 25), False)]
)
def test_split_key_in_labelled_mode(tmp_path, tags, given_test):
    path = write(tmp_path / "sk.h5", images=images(100), labels=Y, split=tags)
    dm = h5(path, split_key="split", val_fraction=0.2, label_fraction=0.5)
    if given_test:  # train/val/test as tagged; label_fraction thins train
        assert dm.test_indices.tolist() == np.flatnonzero(tags == 2).tolist()
        assert dm.val_indices.tolist() == np.flatnonzero(tags == 1).tolist()
        assert len(dm.train_indices) == 30 and set(dm.train_indices) <= set(np.flatnonzero(tags == 0))
    else:  # only train/val tags: val is held out as the test split and val is carved from train
        assert dm.test_indices.tolist() == np.flatnonzero(tags == 1).tolist()
        assert set(dm.val_indices) | set(dm.train_indices) <= set(np.flatnonzero(tags == 0))
        assert len(dm.val_indices) == 15 and not set(dm.val_indices) & set(dm.train_indices)


def test_errors_name_the_setting_and_the_fix(tmp_path, labelled_file):
    path, _, _ = labelled_file
    with pytest.raises(DataError, match=r"task needs labels: set dataset\.label_key=<key>.*dataset\.labelled_path"):
        h5(path, label_key=None)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=rf"dataset\.label_fraction={bad} is not in \(0, 1\]"):
            H5DataModule("t", path, 2, label_fraction=bad)
    for bad in (0.0, 1.0):
        with pytest.raises(ConfigError, match=rf"dataset\.test_fraction={bad} is not in \(0, 1\).*training data"):
            H5DataModule("t", path, 2, test_fraction=bad)
    with pytest.raises(ConfigError, match=r"dataset\.val_fraction=1\.0"):
        H5DataModule("t", path, 2, val_fraction=1.0, labelled=True)
    lone = write(tmp_path / "lone.h5", images=images(7), labels=np.array([0, 0, 0, 1, 1, 1, 2]))
    with h5py.File(lone, "a") as f:
        f.attrs["class_names"] = ["a", "b", "rare"]
    with pytest.raises(DataError, match=r"class 'rare' \(label 2\) has only 1 labelled sample.*at least 2 per class"):
        h5(lone)


@pytest.mark.parametrize("test_fraction", [0.2, 0.9])  # 0.2 of 2 rounds to 0, 0.9 of 2 to 2: both clamp to 1
def test_every_class_keeps_a_train_and_a_test_sample(tmp_path, test_fraction):
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 2, 2])
    path = write(tmp_path / "few.h5", images=images(9), labels=labels)
    dm = h5(path, test_fraction=test_fraction, val_fraction=0.5)
    assert set(labels[dm.train_indices]) == set(labels[dm.test_indices]) == {0, 1, 2}


# ---- STL-10 ------------------------------------------------------------------------------------------------------
def stl_root(tmp_path):
    d = tmp_path / "stl10_binary"
    d.mkdir()
    imgs = np.arange(24, dtype=np.uint8)[:, None, None, None] * np.ones((1, 3, 96, 96), np.uint8)
    imgs[:10].tofile(d / "train_X.bin")
    np.array([1, 2] * 5, np.uint8).tofile(d / "train_y.bin")
    imgs[10:16].tofile(d / "test_X.bin")
    np.array([1, 2, 1, 2, 3, 3], np.uint8).tofile(d / "test_y.bin")
    imgs[16:].tofile(d / "unlabeled_X.bin")
    return tmp_path


def test_stl10_labelled_uses_train_for_train_val_and_test_for_test(tmp_path):
    root = stl_root(tmp_path)
    dm = setup(STL10DataModule("stl10", str(root), batch_size=2, num_workers=0, labelled=True, val_fraction=0.2))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (8, 2, 6)
    seen = [int(dm.train_set[i]["x"][0, 0, 0]) for i in range(8)] + [int(dm.val_set[i]["x"][0, 0, 0]) for i in range(2)]
    assert sorted(seen) == list(range(10))  # train + val are exactly the official train images
    assert sorted(int(dm.val_set[i]["y"]) for i in range(2)) == [0, 1]  # stratified
    assert [int(dm.test_set[i]["x"][0, 0, 0]) for i in range(6)] == list(range(10, 16))
    assert [int(dm.test_set[i]["y"]) for i in range(6)] == [0, 1, 0, 1, 2, 2]
    assert dm.summary()["n_test"] == 6 and dm.num_classes == 10
    np.testing.assert_allclose(dm.mean.numpy(), [4.5 / 255] * 3, rtol=1e-5)  # stats over the train images
    few = setup(STL10DataModule("stl10", str(root), batch_size=2, num_workers=0, labelled=True, label_fraction=0.25))
    assert sorted(int(few.train_set[i]["y"]) for i in range(len(few.train_set))) == [0, 1]
    assert len(few.test_set) == 6


# ---- folders -----------------------------------------------------------------------------------------------------
def png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(path)


def folder(root, **kw):
    return setup(FolderDataModule("f", str(root), 1, batch_size=2, num_workers=0, labelled=True, **kw))


def test_folder_class_subfolders_split_three_ways(tmp_path):
    for c, n in [("cat", 10), ("dog", 5)]:
        for k in range(n):
            png(tmp_path / c / f"{k:02d}.png", k)
    dm = folder(tmp_path, test_fraction=0.2, val_fraction=0.25)
    files = [dm.train_set.files, dm.val_set.files, dm.test_set.files]
    assert sum(map(len, files)) == 15 and len(set().union(*map(set, files))) == 15
    assert np.bincount(dm.test_set.labels).tolist() == [2, 1] and np.bincount(dm.val_set.labels).tolist() == [2, 1]
    assert np.bincount(dm.train_set.labels).tolist() == [6, 3]
    assert folder(tmp_path, seed=0).test_set.files == folder(tmp_path, seed=0, label_fraction=0.2).test_set.files
    with pytest.raises(DataError, match="flat folder.*labelled.*one sub-folder per class"):
        folder(tmp_path / "cat")


def test_folder_deeplense_val_becomes_test_and_given_test_is_kept(tmp_path):
    for split, n in [("train", 5), ("val", 2)]:
        for c in ["no", "sub"]:
            for k in range(n):
                png(tmp_path / split / c / f"{k}.png", k)
    dm = folder(tmp_path, val_fraction=0.2)
    assert all("/val/" in f for f in dm.test_set.files) and len(dm.test_set) == 4
    assert all("/train/" in f for f in dm.train_set.files + dm.val_set.files)
    assert (len(dm.train_set), len(dm.val_set)) == (8, 2) and dm.summary()["n_test"] == 4
    for c in ["no", "sub"]:
        png(tmp_path / "test" / c / "0.png", 9)
    given = folder(tmp_path)
    assert given.layout == "train/val/test" and len(given.test_set) == 2 and len(given.val_set) == 4


# ---- simulators --------------------------------------------------------------------------------------------------
def test_simulated_modules_in_labelled_mode_yield_labels_and_targets(tmp_path):
    lens = setup(LensSimDataModule(n_per_class=5, image_size=16, cache_dir=str(tmp_path), batch_size=4,
                                   num_workers=0, labelled=True, test_fraction=0.2))
    assert len(lens.test_set) == 3 and np.bincount(lens.test_set.labels[lens.test_indices]).tolist() == [1, 1, 1]
    assert set(next(iter(lens.train_dataloader()))) == {"x", "y"}
    jets = setup(JetsSimDataModule(n=24, image_size=32, cache_dir=str(tmp_path), batch_size=4, num_workers=0,
                                   labelled=True, label_fraction=0.5))
    batch = next(iter(jets.test_dataloader()))
    assert set(batch) == {"x", "y", "targets"} and batch["targets"].shape[1] == 2
    t = jets.train_set.targets[jets.train_indices]
    np.testing.assert_allclose(jets.target_mean.numpy(), t.mean(0), rtol=1e-5)
    assert jets.summary()["target_names"] == ["m", "pT"] and jets.summary()["label_fraction"] == 0.5
