"""FolderDataModule: PNG/JPG and .npy folders in the flat, class and DeepLense train/val layouts."""

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_lab.data.folder import FolderDataModule
from ssl_lab.errors import DataError


def png(path, rgb: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def rgb(k: int, size=(10, 12)) -> np.ndarray:
    h, w = size
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(w)[None] * 20  # red grows across columns
    a[..., 1] = np.arange(h)[:, None] * 20  # green grows down rows
    a[..., 2] = 10 * k
    return a


def make(root, in_chans=3, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("num_workers", 0)
    dm = FolderDataModule("f", str(root), in_chans, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture
def classes(tmp_path):
    for c, n in [("cat", 6), ("dog", 4)]:
        for k in range(n):
            png(tmp_path / c / f"{k:02d}.png", rgb(k))
    return tmp_path


def test_class_folders_are_labelled_split_and_rgb_keeps_orientation(classes):
    dm = make(classes, val_fraction=0.5)
    assert (dm.class_names, dm.num_classes, dm.image_shape) == (["cat", "dog"], 2, (10, 12))
    # one test image per class is held out first (20%, at least one); val is half of the rest (round(2.5) = 2)
    assert len(dm.train_set) == 8 and len(dm.val_set) == 4 and len(dm.split_record()["splits"]["test"]["files"]) == 2
    assert sorted(int(dm.val_set[i]["y"]) for i in range(4)) == [0, 0, 1, 1]
    item = dm.train_set[0]
    k = int(dm.train_set.files[0].rsplit("/", 1)[1][:2])
    assert item["x"].dtype == torch.uint8 and torch.equal(item["x"], torch.from_numpy(rgb(k).transpose(2, 0, 1)))


def test_greyscale_and_resize(classes):
    dm = make(classes, in_chans=1, image_size=8)
    x = dm.train_set[0]["x"]
    ref = np.array(Image.open(dm.train_set.files[0]).convert("L").resize((8, 8), Image.BILINEAR))
    assert x.shape == (1, 8, 8) and torch.equal(x[0], torch.from_numpy(ref))
    assert dm.image_shape == (8, 8)


def test_stats_of_uint8_images_are_over_255(classes):
    dm = make(classes, val_fraction=0.2)
    x = np.stack([dm.train_set[i]["x"].numpy() for i in range(len(dm.train_set))]) / 255.0
    np.testing.assert_allclose(dm.mean.numpy(), x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(dm.std.numpy(), x.std(axis=(0, 2, 3)), rtol=1e-5)


def test_flat_folder_is_unlabelled_and_listing_is_deterministic(tmp_path):
    for k in range(5):
        png(tmp_path / f"img{k}.jpg", rgb(k))
    a, b = make(tmp_path, val_fraction=0.4), make(tmp_path, val_fraction=0.4)
    assert a.num_classes is None and a.class_names is None
    assert a.train_set.files == b.train_set.files and len(a.val_set) == 2
    assert set(next(iter(a.train_dataloader()))) == {"x"}


def test_deeplense_layout_with_npy_uses_the_given_split(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in [("train", 3), ("val", 2)]:
        for c in ["no", "sphere", "vort"]:
            (tmp_path / split / c).mkdir(parents=True)
            for k in range(n):
                a = rng.random((1, 9, 9)).astype(np.float32)
                np.save(tmp_path / split / c / f"{k}.npy", a)
                arrays[(split, c, k)] = a
    dm = make(tmp_path, in_chans=1)
    # the val folder is the test split in both modes: pretraining fits on the train folder, val is carved from it
    assert (len(dm.train_set), len(dm.val_set), dm.class_names) == (9, 3, ["no", "sphere", "vort"])
    assert dm.split_record()["splits"]["test"]["files"] == sorted(f"val/{c}/{k}.npy" for c in ["no", "sphere", "vort"]
                                                                  for k in range(2))
    item = dm.train_set[8]  # sorted: train/vort/2.npy is last
    assert item["x"].dtype == torch.float32 and int(item["y"]) == 2
    assert torch.equal(item["x"], torch.from_numpy(arrays[("train", "vort", 2)]))
    tr = np.stack([a for (s, _, _), a in arrays.items() if s == "train"])
    np.testing.assert_allclose(dm.mean.numpy(), tr.mean(axis=(0, 2, 3)), rtol=1e-5)


def test_npy_channel_last_and_2d_arrays(tmp_path):
    a = np.random.default_rng(1).random((7, 7, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", a)
    dm = make(tmp_path, in_chans=8, val_fraction=0.0)
    assert torch.equal(dm.train_set[0]["x"], torch.from_numpy(a.transpose(2, 0, 1).copy()))
    with pytest.raises(DataError, match=r"a\.npy: array shape \(7, 7, 8\).*in_chans=3"):
        make(tmp_path, in_chans=3, val_fraction=0.0)
    g = tmp_path / "grey"
    g.mkdir()
    np.save(g / "c.npy", a[..., 0])
    np.save(g / "d.npy", a[..., 1])
    assert make(g, in_chans=1, val_fraction=0.0, image_size=14).train_set[1]["x"].shape == (1, 14, 14)


def test_unreadable_file_is_named(tmp_path):
    for k in range(3):  # a flat folder: no test split, so setup reads every file for the statistics
        png(tmp_path / f"{k}.png", rgb(k))
    (tmp_path / "99.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"99\.png: cannot be read as an image"):
        make(tmp_path, val_fraction=0.0)


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="folder not found; check dataset.root"):
        make(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        make(tmp_path / "empty")
    png(tmp_path / "mixed" / "a.png", rgb(0))
    np.save(tmp_path / "mixed" / "b.npy", np.zeros((3, 4, 4)))
    with pytest.raises(DataError, match="mixes .npy arrays and PNG/JPG"):
        make(tmp_path / "mixed")
    png(tmp_path / "multi" / "a.png", rgb(0))
    png(tmp_path / "multi" / "b.png", rgb(1))
    with pytest.raises(DataError, match="in_chans=8"):
        make(tmp_path / "multi", in_chans=8)
    png(tmp_path / "multi" / "c.png", rgb(1, size=(5, 5)))
    dm = make(tmp_path / "multi", val_fraction=0.0, stats_max_samples=1)
    with pytest.raises(DataError, match=r"c\.png: decoded shape \(3, 5, 5\).*dataset\.image_size"):
        dm.train_set[2]


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders(classes, workers):
    dm = make(classes, num_workers=workers, val_fraction=0.2)
    batches = list(dm.val_dataloader())
    assert torch.equal(torch.cat([b["x"] for b in batches]), torch.stack([dm.val_set[i]["x"] for i in range(2)]))
    train = list(dm.train_dataloader())
    assert len(train) == 4 and all(b["y"].dtype == torch.int64 for b in train)
