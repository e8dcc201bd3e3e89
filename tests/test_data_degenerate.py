"""Degenerate data is refused before training with one line that says what is wrong and how to fix it; images of
more than 8 bits (16-bit PNG, TIFF of any depth) are read at full depth instead of being clipped to 8 bits."""

import logging
import struct
import zlib

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, compose_cfg
from ssl_lab.cli import run_or_exit
import ssl_lab.data.folder as folder_module
from ssl_lab.data.folder import FolderDataModule, load_file
from ssl_lab.data.h5 import H5DataModule
from ssl_lab.errors import DataError


def folder(root, in_chans=1, cache=None, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("num_workers", 0)
    if cache is None:
        kw["decode_cache"] = False
    dm = FolderDataModule("f", str(root), in_chans, cache_dir=str(cache or root.parent / "unused"), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def h5(path, in_chans=1, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("num_workers", 0)
    dm = H5DataModule("t", str(path), in_chans, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def write_h5(path, **arrays):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
    return path


def every_x(ds) -> torch.Tensor:
    return torch.stack([ds[i]["x"] for i in range(len(ds))])


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


def grey16(k: int, size=(6, 7)) -> np.ndarray:
    """uint16 pixels well above 255 (and distinct), so clipping or rescaling to 8 bits shows."""
    return (np.random.default_rng(k).integers(0, 65536, size) | 0x0100).astype(np.uint16)


def png16_colour(path, a: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one): colour type 2, bit depth 16."""
    h, w, _ = a.shape
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------------------------
# bit depth

@pytest.mark.parametrize("cached", [False, True])
def test_16bit_png_keeps_values_above_255_in_decode_cache_and_stats(tmp_path, cached):
    root = tmp_path / "png16"
    root.mkdir()
    arrays = {f"{k}.png": grey16(k) for k in range(5)}
    for name, a in arrays.items():
        Image.fromarray(a).save(root / name)
    with Image.open(root / "0.png") as im:  # the file holds the 16 bits (Pillow writes and reads them)
        assert im.mode in ("I;16", "I") and np.array_equal(np.asarray(im), arrays["0.png"])
    x = load_file(str(root / "0.png"), 1, None)
    assert x.dtype == np.float32 and x.shape == (1, 6, 7) and np.array_equal(x[0], arrays["0.png"].astype(np.float32))
    dm = folder(root, cache=tmp_path / "cache" if cached else None, val_fraction=0.0, stats_max_samples=100)
    got = every_x(dm.train_set)
    ref = torch.from_numpy(np.stack([arrays[f.rsplit("/", 1)[1]] for f in dm.train_set.files])[:, None]
                           .astype(np.float32))
    assert got.dtype == torch.float32 and torch.equal(got, ref) and float(got.max()) > 255
    if cached:
        info = dm.summary()["decode_cache"]
        assert info["used"] and np.load(info["path"], mmap_mode="r").dtype == np.float32
    # stats in the data's own units (not x/255, not clipped)
    np.testing.assert_allclose(dm.mean.numpy(), [ref.double().mean().item()], rtol=1e-6)
    np.testing.assert_allclose(dm.std.numpy(), [ref.double().std(correction=0).item()], rtol=1e-5)


def test_16bit_png_resized_and_cached_equals_decoded(tmp_path):
    root = tmp_path / "png16"
    root.mkdir()
    for k in range(4):
        Image.fromarray(grey16(k, (12, 10))).save(root / f"{k}.png")
    plain = folder(root, image_size=8, val_fraction=0.0)
    cached = folder(root, cache=tmp_path / "cache", image_size=8, val_fraction=0.0)
    x = every_x(cached.train_set)
    assert x.dtype == torch.float32 and x.shape == (4, 1, 8, 8) and float(x.max()) > 255
    assert torch.equal(x, every_x(plain.train_set))
    assert torch.equal(cached.mean, plain.mean) and torch.equal(cached.std, plain.std)


def test_16bit_colour_png_is_refused_rather_than_cut_to_8_bits(tmp_path):
    root = tmp_path / "rgb16"
    root.mkdir()
    for k in range(3):
        png16_colour(root / f"{k}.png", np.random.default_rng(k).integers(256, 65536, (4, 5, 3), dtype=np.uint16))
    with pytest.raises(DataError) as err:
        folder(root, in_chans=3)
    msg = one_line(err)
    assert "0.png" in msg and "16-bit colour PNG" in msg and "TIFF" in msg


def test_16bit_grey_png_with_three_channels_is_refused(tmp_path):
    root = tmp_path / "png16"
    root.mkdir()
    for k in range(3):
        Image.fromarray(grey16(k)).save(root / f"{k}.png")
    with pytest.raises(DataError) as err:
        folder(root, in_chans=3)
    assert "dataset.in_chans=1" in one_line(err)


@pytest.mark.parametrize("reader", ["tifffile", "pillow"])
def test_tiff_16bit_and_float32_single_channel(tmp_path, monkeypatch, reader):
    """Written by Pillow (modes I;16 and F); "pillow" reads them as the loader does where tifffile (a dependency)
    was removed."""
    if reader == "pillow":
        monkeypatch.setattr(folder_module, "tifffile", None)
    root = tmp_path / "tif"
    root.mkdir()
    ints, floats = grey16(1), np.random.default_rng(2).normal(1e3, 5e2, (6, 7)).astype(np.float32)
    Image.fromarray(ints).save(root / "a.tif")
    Image.fromarray(floats).save(root / "b.tiff")
    a, b = load_file(str(root / "a.tif"), 1, None), load_file(str(root / "b.tiff"), 1, None)
    assert a.dtype == b.dtype == np.float32
    assert np.array_equal(a[0], ints.astype(np.float32)) and np.array_equal(b[0], floats)
    dm = folder(root, cache=tmp_path / "cache", val_fraction=0.0)
    assert torch.equal(every_x(dm.train_set), torch.from_numpy(np.stack([a, b])))


def test_without_tifffile_a_tiff_pillow_cannot_read_fully_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_module, "tifffile", None)
    root = tmp_path / "tif"
    root.mkdir()
    pages = [Image.fromarray(grey16(k)) for k in range(2)]
    pages[0].save(root / "a.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(DataError) as err:
        folder(root, in_chans=2)
    msg = one_line(err)
    assert "a.tif" in msg and "2 pages" in msg and "pip install tifffile" in msg


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_tiff_multichannel_of_any_depth(tmp_path, dtype, channels_last):
    import tifffile
    root = tmp_path / "tif"
    root.mkdir()
    arrays = []
    for k in range(3):
        a = (np.random.default_rng(k).random((4, 6, 7)) * 60000).astype(dtype)  # [C, H, W], values above 255
        arrays.append(a.astype(np.float32))
        tifffile.imwrite(root / f"{k}.tif", a.transpose(1, 2, 0) if channels_last else a)
    dm = folder(root, in_chans=4, cache=tmp_path / "cache", val_fraction=0.0)
    x = every_x(dm.train_set)
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(np.stack(arrays)))
    np.testing.assert_allclose(dm.mean.numpy(), np.stack(arrays).mean(axis=(0, 2, 3)), rtol=1e-5)


def test_tiff_with_the_wrong_channel_count_is_one_line(tmp_path):
    import tifffile
    root = tmp_path / "tif"
    root.mkdir()
    tifffile.imwrite(root / "a.tif", np.zeros((5, 6, 7), np.float32))
    with pytest.raises(DataError) as err:
        folder(root, in_chans=3)
    msg = one_line(err)
    assert "a.tif" in msg and "dataset.in_chans" in msg


def test_8bit_tiff_and_png_stay_uint8(tmp_path):
    """8-bit files keep today's uint8 decoding, cache and x/255 stats."""
    tif, png = tmp_path / "tif", tmp_path / "png"
    tif.mkdir(), png.mkdir()
    arrays = [np.random.default_rng(k).integers(0, 256, (6, 7), dtype=np.uint8) for k in range(3)]
    for k, a in enumerate(arrays):
        Image.fromarray(a).save(tif / f"{k}.tif")
        Image.fromarray(a).save(png / f"{k}.png")
    ref = torch.from_numpy(np.stack(arrays)[:, None])
    for root in (tif, png):
        dm = folder(root, cache=tmp_path / "cache", val_fraction=0.0)
        x = every_x(dm.train_set)
        assert x.dtype == torch.uint8 and torch.equal(x, ref)
        assert np.load(dm.summary()["decode_cache"]["path"], mmap_mode="r").dtype == np.uint8
        np.testing.assert_allclose(dm.mean.numpy(), [ref.double().mean().item() / 255], rtol=1e-6)


@pytest.mark.parametrize("cached", [False, True])
def test_a_folder_mixing_8_and_16_bit_images_is_refused(tmp_path, cached):
    root = tmp_path / "mixed"
    root.mkdir()
    Image.fromarray(np.full((6, 7), 200, np.uint8)).save(root / "a.png")
    Image.fromarray(grey16(0)).save(root / "b.png")
    with pytest.raises(DataError) as err:
        folder(root, cache=tmp_path / "cache" if cached else None, val_fraction=0.0)
    msg = one_line(err)
    assert "a.png" in msg and "b.png" in msg and "bit depth" in msg


# ---------------------------------------------------------------------------------------------------------------
# no finite pixel

@pytest.mark.parametrize("policy", ["zero", "drop", "error"])
def test_an_all_nan_hdf5_is_refused_under_every_nan_policy(tmp_path, policy):
    path = write_h5(tmp_path / "all_nan.h5", images=np.full((10, 2, 4, 4), np.nan, np.float32))
    with pytest.raises(DataError) as err:
        h5(path, in_chans=2, nan_policy=policy)
    msg = one_line(err)
    assert f"no finite pixel in {path}/images" in msg and "dataset.image_key" in msg


def test_an_all_inf_split_key_is_refused(tmp_path):
    x = np.random.default_rng(0).random((8, 1, 4, 4)).astype(np.float32)
    path = write_h5(tmp_path / "k.h5", X_train=x, X_test=np.full((4, 1, 4, 4), np.inf, np.float32),
                    y_train=np.arange(8) % 2, y_test=np.arange(4) % 2)
    with pytest.raises(DataError) as err:
        h5(path, labelled=True, label_key="y_{split}", split_keys={"train": "X_train", "test": "X_test"})
    msg = one_line(err)
    assert f"no finite pixel in {path}/X_test" in msg and "dataset.split_keys.test" in msg


def test_an_all_nan_channel_under_policy_zero_is_named_in_a_warning(tmp_path, caplog):
    x = np.random.default_rng(0).random((10, 3, 4, 4)).astype(np.float32)
    x[:, 1] = np.nan
    with caplog.at_level(logging.WARNING):
        dm = h5(write_h5(tmp_path / "c.h5", images=x), in_chans=3, nan_policy="zero")
    assert torch.isfinite(dm.mean).all()
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "channel 1" in warned and "no finite pixel" in warned and "constant 0" in warned


def test_an_all_nan_npy_folder_is_refused(tmp_path):
    root = tmp_path / "npy"
    root.mkdir()
    for k in range(3):
        np.save(root / f"{k}.npy", np.full((2, 5, 5), np.nan, np.float32))
    with pytest.raises(DataError) as err:
        folder(root, in_chans=2, val_fraction=0.0)
    msg = one_line(err)
    assert f"no finite pixel in {root}" in msg


def test_nan_pixels_in_a_float_folder_are_named(tmp_path):
    """Folders have no dataset.nan_policy: NaN/Inf would reach the statistics and training as they are."""
    root = tmp_path / "npy"
    root.mkdir()
    for k in range(3):
        a = np.ones((1, 5, 5), np.float32)
        if k == 1:
            a[0, 2, :2] = np.inf
        np.save(root / f"{k}.npy", a)
    with pytest.raises(DataError) as err:
        folder(root, val_fraction=0.0)
    msg = one_line(err)
    assert "1.npy" in msg and "2 non-finite" in msg and "nan_to_num" in msg


# ---------------------------------------------------------------------------------------------------------------
# splits with no samples

def test_drop_that_empties_the_train_split_is_refused_with_counts(tmp_path):
    x = np.random.default_rng(0).random((6, 1, 4, 4)).astype(np.float32)
    x[:, 0, 0, 0] = np.nan  # every sample has one bad pixel: all finite ones are in samples that drop
    path = write_h5(tmp_path / "d.h5", images=x)
    with pytest.raises(DataError) as err:
        h5(path, nan_policy="drop")
    msg = one_line(err)
    assert all(s in msg for s in (str(path), "train split", "0 samples", "6 samples", "dataset.nan_policy=zero"))


def test_labelled_mode_refuses_an_empty_test_split(tmp_path):
    x = np.random.default_rng(0).random((8, 1, 4, 4)).astype(np.float32)
    path = write_h5(tmp_path / "t.h5", images=x, labels=np.arange(8) % 2, split=np.zeros(8, np.int64))
    assert h5(path, label_key="labels", split_key="split").summary()["n_train"] == 8  # pretraining needs no test
    with pytest.raises(DataError) as err:
        h5(path, labelled=True, label_key="labels", split_key="split")
    msg = one_line(err)
    assert all(s in msg for s in ("test split", "0 samples", "8 samples", "dataset.split_key"))
    # an empty val split stays allowed (the tasks warn): 2 per class, 1 to test, round(0.3 * 1) = 0 to val
    small = write_h5(tmp_path / "v.h5", images=x[:4], labels=np.array([0, 0, 1, 1]))
    dm = h5(small, labelled=True, label_key="labels", val_fraction=0.3)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (2, 0, 2)


def test_labelled_mode_refuses_a_test_split_emptied_by_drop(tmp_path):
    x = np.random.default_rng(0).random((8, 1, 4, 4)).astype(np.float32)
    x[6:, 0, 1, 1] = np.nan
    path = write_h5(tmp_path / "t.h5", images=x, labels=np.arange(8) % 2, split=np.array([0] * 6 + [2] * 2))
    with pytest.raises(DataError) as err:
        h5(path, labelled=True, label_key="labels", split_key="split", nan_policy="drop")
    msg = one_line(err)
    assert all(s in msg for s in ("test split", "0 samples", "dropped", "dataset.nan_policy"))


# ---------------------------------------------------------------------------------------------------------------
# through the command line: exit 2, one line, nothing trained

def test_cli_refuses_an_all_nan_file_under_policy_zero(tmp_path, capsys):
    path = write_h5(tmp_path / "all_nan.h5", images=np.full((20, 1, 16, 16), np.nan, np.float32))
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_or_exit(compose_cfg([*TINY, "dataset=lens_h5", f"dataset.path={path}", "dataset.nan_policy=zero",
                                 f"run_dir={run_dir}"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("ssl_lab: error:") == 1 and "Traceback" not in err and f"no finite pixel in {path}" in err
    assert not run_dir.exists()
