"""H5DataModule on tiny files: layouts, NaN policies, splits, stats, errors, and loaders with worker processes."""

import pickle

import h5py
import numpy as np
import pytest
import torch

from ssl_lab.data.h5 import H5DataModule
from ssl_lab.errors import ConfigError, DataError


def write(path, **arrays):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            chunks = (min(4, len(v)), *v.shape[1:]) if v.ndim > 1 and len(v) else None
            f.create_dataset(k, data=v, chunks=chunks)
    return str(path)


def images(n=30, c=3, h=6, w=5, seed=0):
    return np.random.default_rng(seed).normal(2.0, 3.0, size=(n, c, h, w)).astype(np.float32)


def make(path, in_chans=3, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 0)
    dm = H5DataModule("t", path, in_chans, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def all_x(ds):
    return torch.stack([ds[i]["x"] for i in range(len(ds))])


def test_nchw_and_nhwc_files_give_identical_samples(tmp_path):
    x = images()
    a = make(write(tmp_path / "a.h5", images=x), layout="NCHW")
    b = make(write(tmp_path / "b.h5", images=x.transpose(0, 2, 3, 1)), layout="NHWC")
    assert torch.equal(all_x(a.train_set), all_x(b.train_set))
    assert torch.equal(all_x(b.val_set), torch.from_numpy(x[b.val_indices]))
    assert a.image_shape == b.image_shape == (6, 5)
    assert torch.allclose(a.mean, b.mean) and torch.allclose(a.std, b.std)


def test_three_d_file_is_one_channel_only_when_in_chans_is_1(tmp_path):
    x = images(c=1)[:, 0]
    dm = make(write(tmp_path / "g.h5", images=x), in_chans=1)
    assert dm.train_set[0]["x"].shape == (1, 6, 5)
    with pytest.raises(DataError, match=r"3-D shape \(30, 6, 5\).*in_chans=1"):
        make(tmp_path / "g.h5", in_chans=3)


def test_stats_equal_numpy_on_the_train_split(tmp_path):
    x = images(n=40)
    dm = make(write(tmp_path / "s.h5", images=x), stats_max_samples=10_000)
    tr = x[dm.train_indices]
    assert len(dm.train_indices) == 40  # an unlabelled file has no test split: pretraining fits on every image
    np.testing.assert_allclose(dm.mean.numpy(), tr.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(dm.std.numpy(), tr.std(axis=(0, 2, 3)), rtol=1e-5)
    assert dm.norm_stats() == {"mean": dm.mean.tolist(), "std": dm.std.tolist()}


def test_uint8_stats_are_of_x_over_255_and_x_stays_uint8(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, size=(20, 2, 4, 4), dtype=np.uint8)
    dm = make(write(tmp_path / "u.h5", images=x), in_chans=2, stats_max_samples=10_000)
    tr = x[dm.train_indices] / 255.0
    assert dm.train_set[0]["x"].dtype == torch.uint8
    np.testing.assert_allclose(dm.mean.numpy(), tr.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(dm.std.numpy(), tr.std(axis=(0, 2, 3)), rtol=1e-5)


def test_stats_are_bounded_by_stats_max_samples(tmp_path):
    dm = make(write(tmp_path / "big.h5", images=images(n=400, h=4, w=4)), stats_max_samples=16)
    s = dm.summary()
    assert s["stats_samples"] == 16
    assert 16 <= s["nan_scanned_samples"] < 400  # the NaN scan for policy zero is bounded too


def test_nan_policy_error_names_key_and_first_index(tmp_path):
    x = images()
    x[7, 1, 2, 2] = np.nan
    x[11, 0, 0, 0] = np.inf
    with pytest.raises(DataError, match=r"key 'images'.*in 2 of 30 samples.*first at index 7.*nan_policy=zero"):
        make(write(tmp_path / "n.h5", images=x), nan_policy="error")


def test_nan_policy_zero_replaces_and_counts(tmp_path):
    x = images()
    x[7, 1, 2, :] = np.nan  # 5 pixels
    x[11, 0, 0, 0] = -np.inf
    dm = make(write(tmp_path / "n.h5", images=x), nan_policy="zero", stats_max_samples=10_000)
    s = dm.summary()
    assert (s["nan_pixels_replaced"], s["nan_samples_found"], s["dropped"]) == (6, 2, 0)
    assert s["n_train"] == 30  # fit: every image of an unlabelled file
    ds = dm.train_set if 7 in dm.train_indices else dm.val_set
    pos = int(np.flatnonzero(ds.indices == 7)[0])
    got = ds[pos]["x"]
    assert torch.isfinite(got).all() and (got[1, 2] == 0).all()
    clean = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)[dm.train_indices]
    np.testing.assert_allclose(dm.mean.numpy(), clean.mean(axis=(0, 2, 3)), rtol=1e-5)


def test_nan_policy_drop_removes_exactly_the_bad_samples(tmp_path):
    x = images(n=40)
    bad = [0, 13, 39]
    for i in bad:
        x[i, 2, 3, 1] = np.nan
    dm = make(write(tmp_path / "n.h5", images=x), nan_policy="drop", stats_max_samples=10_000)
    kept = np.concatenate([dm.train_indices, dm.val_indices])
    assert sorted(set(range(40)) - set(kept.tolist())) == bad
    assert dm.summary()["dropped"] == 3
    assert torch.isfinite(all_x(dm.train_set)).all()
    np.testing.assert_allclose(dm.mean.numpy(), x[dm.train_indices].mean(axis=(0, 2, 3)), rtol=1e-5)


def test_labels_targets_and_class_names(tmp_path):
    x = images(n=20)
    y = (np.arange(20) % 3).astype(np.float32)[:, None]  # (N, 1) float holding class ids, like the E2E files
    m, pt = np.arange(20.0), np.arange(20.0)[:, None] * 10
    path = write(tmp_path / "l.h5", images=x, Y=y, m=m, pT=pt)
    with h5py.File(path, "a") as f:
        f.attrs["class_names"] = ["a", "b", "c"]
    dm = make(path, label_key="Y", target_keys=["m", "pT"])
    item = dm.train_set[2]
    j = int(dm.train_indices[2])
    assert item["y"].dtype == torch.int64 and int(item["y"]) == j % 3
    assert item["targets"].dtype == torch.float32 and item["targets"].tolist() == [j, 10 * j]
    assert (dm.num_classes, dm.class_names, dm.target_names) == (3, ["a", "b", "c"], ["m", "pT"])


def test_stratified_split_keeps_ratios_and_is_seeded_by_split_seed(tmp_path):
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    path = write(tmp_path / "st.h5", images=images(n=100, h=2, w=2), labels=y)
    dm = make(path, label_key="labels", val_fraction=0.2, split_seed=5)
    assert np.bincount(y[dm.test_indices]).tolist() == [12, 6, 2]  # held out first, 20% of each class
    assert np.bincount(y[dm.val_indices]).tolist() == [10, 5, 2]  # 20% of each class's remainder
    assert np.bincount(y[dm.train_indices]).tolist() == [48, 24, 8]  # pretraining fits on train + val
    assert set(dm.val_indices) <= set(dm.train_indices) and not set(dm.test_indices) & set(dm.train_indices)
    again = make(path, label_key="labels", split_seed=5, seed=6)  # the run's seed does not move the split
    other = make(path, label_key="labels", split_seed=6)
    assert np.array_equal(again.val_indices, dm.val_indices) and np.array_equal(again.test_indices, dm.test_indices)
    assert not np.array_equal(other.test_indices, dm.test_indices)


@pytest.mark.parametrize("tags", [np.array([0, 1] * 10), np.array([b"train", b"val"] * 10)])
def test_split_key_decides_the_split(tmp_path, tags):
    dm = make(write(tmp_path / "sk.h5", images=images(n=20), split=tags), split_key="split")
    assert dm.train_indices.tolist() == list(range(0, 20, 2))  # pretraining never fits on the val-tagged rows:
    assert dm.test_indices.tolist() == list(range(1, 20, 2))  # with only train/val tags they are the test split
    assert len(dm.val_indices) == 2 and set(dm.val_indices) <= set(range(0, 20, 2))


def test_bad_split_tags_are_named(tmp_path):
    path = write(tmp_path / "sk.h5", images=images(n=4), split=np.array([b"train", b"val", b"tset", b"val"]))
    with pytest.raises(DataError, match=r"'split'.*tset"):
        make(path, split_key="split")


def test_missing_file_names_path_and_option(tmp_path):
    with pytest.raises(DataError, match=r"nope\.h5: file not found; check dataset\.path"):
        make(str(tmp_path / "nope.h5"))


def test_missing_key_lists_available_keys(tmp_path):
    path = write(tmp_path / "k.h5", images=images(n=4), labels=np.zeros(4))
    with pytest.raises(DataError, match=r"key 'imgs' not found; available keys: images, labels\. Set dataset"):
        make(path, image_key="imgs")
    with pytest.raises(DataError, match=r"key 'Y' not found.*dataset\.label_key"):
        make(path, label_key="Y")


def test_wrong_channel_count_and_layout_hint(tmp_path):
    x = images(n=4, c=8, h=9, w=9)
    nhwc = write(tmp_path / "j.h5", jet=x.transpose(0, 2, 3, 1))
    with pytest.raises(DataError, match=r"has 8 channels \(shape \(4, 9, 9, 8\), layout NHWC\).*in_chans=3"):
        make(nhwc, in_chans=3, image_key="jet", layout="NHWC")
    with pytest.raises(DataError, match=r"has 9 channels.*layout NCHW.*dataset\.layout=NHWC"):
        make(nhwc, in_chans=8, image_key="jet", layout="NCHW")


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4, 4, 4)])
def test_wrong_rank(tmp_path, shape):
    path = write(tmp_path / "r.h5", images=np.zeros(shape, np.float32))
    with pytest.raises(DataError, match=r"-D shape.*expected 4-D"):
        make(path)


def test_label_and_target_length_mismatch(tmp_path):
    path = write(tmp_path / "m.h5", images=images(n=10), labels=np.zeros(9), m=np.zeros((10, 2)))
    with pytest.raises(DataError, match=r"key 'labels' has shape \(9,\) but 'images' has 10 images"):
        make(path, label_key="labels")
    with pytest.raises(DataError, match=r"key 'm' has shape \(10, 2\)"):
        make(path, target_keys=["m"])


def test_empty_dataset_and_bad_options(tmp_path):
    with pytest.raises(DataError, match="0 images"):
        make(write(tmp_path / "e.h5", images=np.zeros((0, 3, 4, 4), np.float32)))
    with pytest.raises(ConfigError, match="nan_policy"):
        H5DataModule("t", "x.h5", 3, nan_policy="ignore")
    with pytest.raises(DataError, match="labelled file not found"):
        make(write(tmp_path / "ok.h5", images=images(n=8)), labelled_path=str(tmp_path / "missing.h5"))


def test_non_integer_labels_are_refused(tmp_path):
    path = write(tmp_path / "f.h5", images=images(n=4), labels=np.array([0, 0.5, 1, 1]))
    with pytest.raises(DataError, match="class ids"):
        make(path, label_key="labels")


def test_dataset_pickles_without_an_open_handle(tmp_path):
    dm = make(write(tmp_path / "p.h5", images=images(n=10)))
    first = dm.train_set[0]["x"]
    assert dm.train_set._file is not None
    clone = pickle.loads(pickle.dumps(dm.train_set))
    assert clone._file is None and torch.equal(clone[0]["x"], first)


def test_in_memory_matches_lazy(tmp_path):
    x = images()
    x[3, 0, 0, 0] = np.nan
    path = write(tmp_path / "im.h5", images=x)
    lazy, mem = make(path), make(path, in_memory=True)
    assert torch.equal(all_x(lazy.train_set), all_x(mem.train_set))
    assert mem.summary()["nan_pixels_replaced"] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_with_and_without_worker_processes(tmp_path, workers):
    x = images(n=20)
    y = np.arange(20) % 2
    dm = make(write(tmp_path / "w.h5", images=x, labels=y), label_key="labels", num_workers=workers)
    batches = list(dm.val_dataloader())
    xs = torch.cat([b["x"] for b in batches])
    assert torch.equal(xs, torch.from_numpy(x[dm.val_indices]))
    assert torch.cat([b["y"] for b in batches]).tolist() == y[dm.val_indices].tolist()
    train = list(dm.train_dataloader())
    assert len(train) == 16 // 4 and all(set(b) == {"x", "y"} and b["x"].shape == (4, 3, 6, 5) for b in train)


def test_unlabelled_batches_have_only_x_and_small_train_split_is_refused(tmp_path):
    dm = make(write(tmp_path / "un.h5", images=images(n=10)), batch_size=4)
    assert dm.num_classes is None and dm.class_names is None
    assert set(next(iter(dm.train_dataloader()))) == {"x"}
    dm.batch_size = 64
    with pytest.raises(DataError, match="batch_size"):
        dm.train_dataloader()


def test_non_finite_targets_error_or_drop(tmp_path):
    m = np.arange(12.0)
    m[5] = np.nan
    path = write(tmp_path / "t.h5", images=images(n=12), m=m)
    with pytest.raises(DataError, match=r"key 'm' has non-finite targets in 1 samples \(first at index 5\)"):
        make(path, target_keys=["m"])
    dm = make(path, target_keys=["m"], nan_policy="drop")
    assert 5 not in np.concatenate([dm.train_indices, dm.val_indices]) and dm.summary()["dropped"] == 1
