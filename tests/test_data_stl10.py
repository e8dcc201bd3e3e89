"""STL10DataModule on tiny .bin files written in the official column-major format."""

import numpy as np
import pytest
import torch

from ssl_lab.data.stl10 import STL10DataModule
from ssl_lab.errors import ConfigError, DataError


def pattern(k: int) -> np.ndarray:
    """An asymmetric [3, 96, 96] image: row index, column index and a per-image constant in separate channels."""
    r, c = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
    return np.stack([r, c * 2 % 256, np.full_like(r, 10 * k)]).astype(np.uint8)


def write_split(d, part, imgs, labels=None):
    # official layout: per image, channel-major, and each channel column-major (i.e. the transpose of H, W)
    np.stack([im.transpose(0, 2, 1) for im in imgs]).astype(np.uint8).tofile(d / f"{part}_X.bin")
    if labels is not None:
        np.asarray(labels, np.uint8).tofile(d / f"{part}_y.bin")


@pytest.fixture
def root(tmp_path):
    d = tmp_path / "stl10_binary"
    d.mkdir()
    write_split(d, "unlabeled", [pattern(k) for k in range(6)])
    write_split(d, "train", [pattern(10 + k) for k in range(4)], [1, 2, 10, 3])
    write_split(d, "test", [pattern(20 + k) for k in range(4)], [5, 6, 7, 8])
    return tmp_path


def make(root, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("num_workers", 0)
    dm = STL10DataModule("stl10", str(root), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_images_round_trip_with_row_major_orientation(root):
    dm = make(root)
    x = dm.train_set[3]["x"]
    assert x.dtype == torch.uint8 and x.shape == (3, 96, 96)
    assert torch.equal(x, torch.from_numpy(pattern(3)))
    assert x[0, 5, 0] == 5 and x[1, 0, 5] == 10  # channel 0 varies down rows, channel 1 across columns


@pytest.mark.parametrize("split,n,has_y", [("unlabeled", 6, False), ("train", 4, True), ("unlabeled+train", 10, False)])
def test_splits(root, split, n, has_y):
    dm = make(root, split=split)
    val = {"unlabeled": 1, "train": 0, "unlabeled+train": 1}[split]  # 0.1 of each part; one image per train class
    assert len(dm.train_set) == n and len(dm.val_set) == val  # pretraining fits on train + val of its parts
    assert dm.split_record()["splits"]["test"] == {"test": [0, 1, 2, 3]} and dm.test_set is None
    assert ("y" in dm.train_set[0]) == has_y
    if split == "unlabeled+train":
        assert torch.equal(dm.train_set[7]["x"], torch.from_numpy(pattern(11)))
    assert (dm.num_classes, dm.image_shape, len(dm.class_names)) == (10, (96, 96), 10)


def test_labels_are_shifted_to_zero_based(root):
    dm = make(root, split="train")
    assert [int(dm.train_set[i]["y"]) for i in range(4)] == [0, 1, 9, 2]
    test = make(root, labelled=True).test_set
    assert [int(test[i]["y"]) for i in range(4)] == [4, 5, 6, 7]


def test_stats_are_of_x_over_255_on_the_pretraining_split(root):
    dm = make(root, split="unlabeled+train")
    x = np.stack([pattern(k) for k in [*range(6), *range(10, 14)]]) / 255.0
    np.testing.assert_allclose(dm.mean.numpy(), x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(dm.std.numpy(), x.std(axis=(0, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders(root, workers):
    dm = make(root, split="train", num_workers=workers)
    val = list(make(root, labelled=True, num_workers=workers).test_dataloader())
    expected = torch.stack([torch.from_numpy(pattern(20 + k)) for k in range(4)])
    assert torch.equal(torch.cat([b["x"] for b in val]), expected)
    assert torch.cat([b["y"] for b in val]).tolist() == [4, 5, 6, 7]
    train = list(dm.train_dataloader())
    assert len(train) == 2 and all(b["x"].shape == (2, 3, 96, 96) for b in train)


def test_missing_file_names_it_and_the_layout(root):
    (root / "stl10_binary" / "test_y.bin").unlink()
    with pytest.raises(DataError, match=r"test_y\.bin: not found; expected <root>/stl10_binary/"):
        make(root)
    with pytest.raises(DataError, match=r"unlabeled_X\.bin: not found"):
        make(root / "elsewhere")


def test_corrupt_files_and_bad_options(root):
    d = root / "stl10_binary"
    np.zeros(3 * 96 * 96 * 4, np.uint8).tofile(d / "train_X.bin")
    np.array([1, 2, 11, 3], np.uint8).tofile(d / "train_y.bin")
    with pytest.raises(DataError, match=r"train_y\.bin: labels must be 1\.\.10"):
        make(root, split="train")
    np.array([1, 2], np.uint8).tofile(d / "train_y.bin")
    with pytest.raises(DataError, match=r"2 labels for 4 images"):
        make(root, split="train")
    np.zeros(100, np.uint8).tofile(d / "unlabeled_X.bin")
    with pytest.raises(DataError, match="not a whole number"):
        make(root)
    with pytest.raises(DataError, match="in_chans=3"):
        make(root, in_chans=1)
    with pytest.raises(ConfigError, match="dataset.split"):
        STL10DataModule("s", str(root), split="test")
