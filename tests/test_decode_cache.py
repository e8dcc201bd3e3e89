"""The decode cache of image folders: same pixels as decoding, decoded once across runs, rebuilt when stale or torn."""

import logging
import multiprocessing as mp
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import ssl_lab.data.folder as folder
from ssl_lab.data.folder import FolderDataModule
from ssl_lab.errors import ConfigError, DataError


def png(path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def noise(k: int, size=(20, 24), rgb=True) -> np.ndarray:
    """Random pixels: any difference in decoding or resizing shows."""
    shape = (*size, 3) if rgb else size
    return np.random.default_rng(k).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def classes(tmp_path):
    root = tmp_path / "data"
    for c, n in [("cat", 8), ("dog", 6)]:
        for k in range(n):
            png(root / c / f"{k:02d}.png", noise(100 * len(c) + k))
    return root


def make(root, cache, in_chans=1, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("num_workers", 0)
    dm = FolderDataModule("f", str(root), in_chans, cache_dir=str(cache), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def every_x(ds) -> torch.Tensor:
    return torch.stack([ds[i]["x"] for i in range(len(ds))])


def sample_of(dm, path) -> torch.Tensor:
    """The sample of one file, in whichever split holds it."""
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        if ds is not None and str(path) in ds.files:
            return ds[ds.files.index(str(path))]["x"]
    raise AssertionError(f"{path} is in no split")


def rows(dm) -> int:
    return np.load(dm.summary()["decode_cache"]["path"], mmap_mode="r").shape[0]


@pytest.fixture
def decodes(monkeypatch):
    """Counts calls of the folder's decode function (in this process: num_workers=0)."""
    calls = []
    real = folder.load_file

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(folder, "load_file", counting)
    return calls


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("image_size", [None, 16])
def test_cached_pixels_equal_decoded_pixels(classes, tmp_path, in_chans, image_size):
    cached = make(classes, tmp_path / "cache", in_chans, image_size=image_size, val_fraction=0.3)
    plain = make(classes, tmp_path / "unused", in_chans, image_size=image_size, val_fraction=0.3, decode_cache=False)
    assert cached.summary()["decode_cache"]["used"] and not (tmp_path / "unused").exists()
    for a, b in [(cached.train_set, plain.train_set), (cached.val_set, plain.val_set)]:
        assert a.files == b.files
        x, ref = every_x(a), every_x(b)
        assert x.dtype == torch.uint8 and x.shape == (len(a), in_chans, *(2 * [image_size] if image_size else (20, 24)))
        assert torch.equal(x, ref)
    assert torch.equal(cached.mean, plain.mean) and torch.equal(cached.std, plain.std)


def test_later_run_reads_the_cache_and_never_decodes(classes, tmp_path, decodes):
    cache = tmp_path / "cache"
    first = make(classes, cache, image_size=16)
    built = first.summary()["decode_cache"]
    assert built["built"] and len(decodes) >= 14 and os.path.dirname(built["path"]) == str(cache)
    decodes.clear()
    later = make(classes, cache, image_size=16)
    x = every_x(later.train_set)
    downstream = make(classes, cache, image_size=16, labelled=True)  # another mode shares the one cache
    every_x(downstream.test_set)
    assert decodes == []
    assert later.summary()["decode_cache"] == {**built, "built": False}
    assert downstream.summary()["decode_cache"]["path"] == built["path"]
    assert torch.equal(x, every_x(first.train_set)) and torch.equal(later.std, first.std)


def test_a_changed_or_added_file_or_size_gets_another_cache(classes, tmp_path):
    cache = tmp_path / "cache"
    path = lambda dm: dm.summary()["decode_cache"]["path"]  # noqa: E731
    first = path(make(classes, cache))
    changed = classes / "dog" / "03.png"
    st = changed.stat()
    png(changed, noise(999))
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    dm = make(classes, cache)
    assert path(dm) != first and dm.summary()["decode_cache"]["built"]
    assert torch.equal(sample_of(dm, changed)[0], torch.from_numpy(np.array(Image.open(changed).convert("L"))))
    png(classes / "dog" / "99.png", noise(7))
    added = make(classes, cache)
    assert path(added) not in (first, path(dm)) and (rows(dm), rows(added)) == (14, 15)
    others = {path(make(classes, cache, in_chans=3)), path(make(classes, cache, image_size=12))}
    assert len(others | {path(added)}) == 3
    assert len(list(cache.glob("*.npy"))) == 5  # no cache was overwritten or deleted


@pytest.mark.parametrize("damage", ["truncated", "garbage", "float32", "no sidecar"])
def test_a_torn_cache_is_rebuilt_with_a_warning(classes, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    good = make(classes, cache, image_size=16)
    p, ref = good.summary()["decode_cache"]["path"], every_x(good.train_set)  # read before the damage
    if damage == "truncated":
        os.truncate(p, os.path.getsize(p) - 100)
    elif damage == "garbage":
        with open(p, "r+b") as f:
            f.write(b"\0" * 64)
    elif damage == "float32":
        np.save(p, np.zeros((14, 1, 16, 16), np.float32))
    else:
        os.remove(p[: -len(".npy")] + ".json")
    with caplog.at_level(logging.WARNING):
        again = make(classes, cache, image_size=16)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("ssl_lab")]
    assert len(warned) == 1 and p in warned[0] and "rebuilding" in warned[0]
    assert again.summary()["decode_cache"] == {**good.summary()["decode_cache"], "built": True}
    assert torch.equal(every_x(again.train_set), ref)
    assert not make(classes, cache, image_size=16).summary()["decode_cache"]["built"]  # and is used from then on


def test_loader_workers_read_the_cache_and_never_receive_the_memmap(classes, tmp_path):
    dm = make(classes, tmp_path / "cache", in_chans=3, num_workers=2, batch_size=1, val_fraction=0.3)
    plain = make(classes, tmp_path / "c2", in_chans=3, batch_size=1, val_fraction=0.3, decode_cache=False)
    blob = pickle.dumps(dm.train_set)
    assert len(blob) < 4000  # a path and row numbers, not the 14 x 3 x 20 x 24 bytes of pixels
    assert torch.equal(pickle.loads(blob)[1]["x"], plain.train_set[1]["x"])
    assert torch.equal(torch.cat([b["x"] for b in dm.val_dataloader()]), every_x(plain.val_set))
    seen = sorted(x.numpy().tobytes() for b in dm.train_dataloader() for x in b["x"])  # shuffled: compare as sets
    assert seen == sorted(x.numpy().tobytes() for x in every_x(plain.train_set))


def test_parallel_build_and_a_file_it_cannot_decode(tmp_path, caplog):
    """Over 256 files the build decodes in workers; an unreadable file fails when read, as without the cache."""
    root = tmp_path / "dl"
    for split, n in [("train", 100), ("val", 40), ("test", 30)]:
        for c in ("a", "b"):
            for k in range(n):
                png(root / split / c / f"{k:03d}.png", noise(k, size=(8, 8), rgb=False))
    (root / "test" / "b" / "zz.png").write_bytes(b"not a png")
    pre = make(root, tmp_path / "cache", num_workers=2)
    assert pre.summary()["decode_cache"]["built"] and rows(pre) == 341
    plain = make(root, tmp_path / "c2", decode_cache=False)
    assert torch.equal(every_x(pre.train_set), every_x(plain.train_set))
    with caplog.at_level(logging.WARNING):
        down = make(root, tmp_path / "cache", labelled=True)  # reads the test folder: the file is in its splits
    assert not down.summary()["decode_cache"]["built"] and down.summary()["decode_cache"]["undecodable"] == 1
    assert any("test/b/zz.png" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    bad = down.test_set.files.index(str(root / "test" / "b" / "zz.png"))
    with pytest.raises(DataError, match=r"zz\.png: cannot be read as an image.*remove or replace"):
        down.test_set[bad]
    assert torch.equal(down.test_set[0]["x"][0], torch.from_numpy(noise(0, size=(8, 8), rgb=False)))


def _setup_in_child(root, cache, out) -> None:
    out.put(make(root, cache, image_size=16).summary()["decode_cache"]["built"])


def test_concurrent_runs_build_the_cache_once(classes, tmp_path, monkeypatch):
    real = folder.load_file

    def slow(*args, **kwargs):
        import time

        time.sleep(0.03)  # both processes look for the cache while the first still builds it
        return real(*args, **kwargs)

    monkeypatch.setattr(folder, "load_file", slow)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_setup_in_child, args=(classes, tmp_path / "cache", out)) for _ in range(2)]
    for p in procs:
        p.start()
    built = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert built == [False, True] and all(p.exitcode == 0 for p in procs)


def test_unwritable_cache_dir_is_one_line(classes, tmp_path):
    (tmp_path / "a_file").write_text("")
    where = tmp_path / "a_file" / "cache"
    with pytest.raises(DataError) as err:
        make(classes, where)
    msg = str(err.value)
    assert "\n" not in msg and str(where) in msg and "dataset.cache_dir" in msg and "dataset.decode_cache=false" in msg
    assert make(classes, where, decode_cache=False).summary()["decode_cache"] == {
        "used": False, "why": "dataset.decode_cache=false"}


def test_without_the_cache_every_read_decodes_as_before(classes, tmp_path, decodes):
    dm = make(classes, tmp_path / "cache", image_size=16, decode_cache=False)
    decodes.clear()
    x = dm.train_set[0]["x"]
    dm.train_set[0]
    ref = np.array(Image.open(dm.train_set.files[0]).convert("L").resize((16, 16), Image.BILINEAR))
    assert len(decodes) == 2 and torch.equal(x[0], torch.from_numpy(ref)) and not (tmp_path / "cache").exists()
    (tmp_path / "arr").mkdir()
    np.save(tmp_path / "arr" / "a.npy", np.ones((2, 5, 5), np.float32))
    np.save(tmp_path / "arr" / "b.npy", np.zeros((2, 5, 5), np.float32))
    arrays = make(tmp_path / "arr", tmp_path / "cache", in_chans=2, val_fraction=0.0)
    assert arrays.summary()["decode_cache"]["used"] is False and not (tmp_path / "cache").exists()
    with pytest.raises(ConfigError, match=r"dataset\.decode_cache='yes' must be true or false"):
        FolderDataModule("f", str(classes), 1, decode_cache="yes")
