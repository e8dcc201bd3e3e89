"""HDF5 at scale: chunk-aligned block reading (coverage, determinism, ranks, workers), prepare, the loader benchmark."""

import json
import subprocess
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, run_cli

from ssl_lab.artifacts import load_backbone_file
from ssl_lab.data.block_sampler import block_length, group_by_block
from ssl_lab.data.h5 import H5DataModule, H5Dataset
from ssl_lab.errors import DataError
from ssl_lab.prepare import main as prepare_main
from ssl_lab.prepare import prepare


def jets(path, n=192, chunk=8, c=4, hw=6, nan_rows=()):
    """NHWC float32 images whose pixel values encode the sample, plus `ident` (= file row) to track samples."""
    rng = np.random.default_rng(0)
    x = rng.gamma(0.5, 3.0, size=(n, hw, hw, c)).astype(np.float32)
    x[rng.random(x.shape) < 0.6] = 0.0  # sparse, like calorimeter deposits
    for r in nan_rows:
        x[r, 1, 2, 0] = np.nan
    with h5py.File(path, "w") as f:
        f.create_dataset("jet", data=x, chunks=(chunk, hw, hw, c) if chunk else None)
        f["ident"] = np.arange(n, dtype=np.float64)
        f["Y"] = (np.arange(n) % 2).astype(np.float32)
    return str(path), x


def dm_for(path, c=4, **kw):
    kw = {"batch_size": 16, "num_workers": 0, "image_key": "jet", "layout": "NHWC", "target_keys": ["ident"],
          "stats_max_samples": 10_000, "block_samples": 8, **kw}
    dm = H5DataModule("t", path, c, **kw)
    dm.setup("fit")
    return dm


def epoch_rows(loader, epoch):
    loader.sampler.set_epoch(epoch)
    batches = list(loader)
    return [int(v) for b in batches for v in b["targets"][:, 0]], batches


@pytest.mark.parametrize("workers", [0, 2])
def test_block_mode_reads_every_train_sample_once_per_epoch(tmp_path, workers):
    path, x = jets(tmp_path / "j.h5")
    dm = dm_for(path, num_workers=workers)
    assert dm.read_mode == "block" and dm.block == 8
    loader = dm.train_dataloader()
    e0, batches = epoch_rows(loader, 0)
    e1, _ = epoch_rows(loader, 1)
    again, _ = epoch_rows(loader, 0)  # persistent workers must see the new epoch each time
    train = sorted(dm.train_indices.tolist())
    assert len(dm.train_indices) == 192 and len(loader) == 12 == len(batches)  # unlabelled: fit on every row
    assert sorted(e0) == train and sorted(e1) == train and e0 != e1 and again == e0
    b = batches[3]
    rows = b["targets"][:, 0].long().numpy()
    assert b["x"].shape == (16, 4, 6, 6) and b["x"].is_contiguous()
    assert torch.equal(b["x"], torch.from_numpy(x[rows]).permute(0, 3, 1, 2))  # NHWC -> NCHW, same values


def test_order_is_a_function_of_seed_and_epoch_and_resume_starts_at_the_restored_epoch(tmp_path):
    path, _ = jets(tmp_path / "j.h5")
    a, b = dm_for(path), dm_for(path)
    la, lb = a.train_dataloader(), b.train_dataloader()
    assert epoch_rows(la, 2)[0] == epoch_rows(lb, 2)[0]
    assert epoch_rows(dm_for(path, seed=1).train_dataloader(), 2)[0] != epoch_rows(la, 2)[0]
    # a resumed run: Lightning builds the loader (and workers draw data) before it calls set_epoch
    resumed = dm_for(path, num_workers=2)
    resumed.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=2)
    rows = [int(v) for bt in resumed.train_dataloader() for v in bt["targets"][:, 0]]
    assert rows == epoch_rows(dm_for(path, num_workers=2).train_dataloader(), 2)[0]
    assert rows != epoch_rows(dm_for(path, num_workers=2).train_dataloader(), 0)[0]
    # workers interleave their batches differently, but every worker count reads the same samples
    assert sorted(rows) == sorted(epoch_rows(la, 2)[0])


@pytest.mark.parametrize("batch_size", [16, 7])
def test_two_ranks_get_disjoint_equal_shares(tmp_path, batch_size):
    path, _ = jets(tmp_path / "j.h5")
    dm = dm_for(path, batch_size=batch_size)
    shares = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=4)
        loader = dm.train_dataloader()
        shares.append([int(v) for bt in loader for v in bt["targets"][:, 0]])
        assert len(loader) == len(list(loader)) == 96 // batch_size  # same batch count on every rank: no DDP hang
    assert set(shares[0]).isdisjoint(shares[1]) and len(shares[0]) == len(shares[1])
    if batch_size == 16:  # 192 = 2 ranks x 6 full batches: nothing left out
        assert sorted(shares[0] + shares[1]) == sorted(dm.train_indices.tolist())


def test_reads_are_one_contiguous_slice_inside_one_chunk_aligned_block(tmp_path, monkeypatch):
    path, _ = jets(tmp_path / "j.h5", chunk=8)
    reads = []
    original = H5Dataset.read_rows

    def spy(self, rows):
        reads.append((int(rows[0]), int(rows[-1]) + 1, len(rows)))
        return original(self, rows)

    monkeypatch.setattr(H5Dataset, "read_rows", spy)
    dm = dm_for(path, block_samples=12)  # rounded up to whole chunks
    assert dm.block == 16 and dm.summary()["chunks"] == [8, 6, 6, 4]
    loader = dm.train_dataloader()
    epoch_rows(loader, 0)
    n_blocks = len(group_by_block(dm.train_indices, 16))
    assert len(reads) == n_blocks  # one read per block (one worker, one rank: no block is split)
    assert all(lo // 16 == (hi - 1) // 16 for lo, hi, _ in reads)
    assert sum(k for *_, k in reads) == 192
    b = block_length(8, 1000)  # auto: the fewest whole chunks that reach 16 MB
    assert b % 8 == 0 and (b - 8) * 1000 < 16 << 20 <= b * 1000
    assert block_length(None, 500_000, None) == 34 and block_length(375, 500_000, None) == 375
    assert group_by_block(np.array([0, 3, 7, 8, 15, 16]), 8)[1].tolist() == [8, 15]


def test_contiguous_file_and_nan_policies_in_block_mode(tmp_path):
    path, _ = jets(tmp_path / "c.h5", chunk=0, nan_rows=(5, 77))
    dm = dm_for(path, nan_policy="zero", block_samples=10)
    assert dm.block == 10 and dm.summary()["chunks"] is None
    assert dm_for(path, block_samples=None).block >= 200  # auto: 16 MB, more than this whole file
    allx = torch.cat([b["x"] for b in dm.train_dataloader()])
    assert torch.isfinite(allx).all()
    dropped = dm_for(path, nan_policy="drop")
    rows = epoch_rows(dropped.train_dataloader(), 0)[0]
    assert 5 not in rows and 77 not in rows
    with pytest.raises(DataError, match=r"sample (5|77) has 1 non-finite"):
        strict = dm_for(path, nan_policy="zero")
        strict.train_set.nan_policy = "error"  # setup would refuse the file; reading must refuse too
        list(strict.train_dataloader())


def test_auto_read_mode_and_labelled_block_mode_keeps_the_ragged_batch(tmp_path):
    path, _ = jets(tmp_path / "j.h5")
    assert dm_for(path, in_memory=True).read_mode == "sample"
    lab = dm_for(path, labelled=True, label_key="Y", batch_size=32)
    assert lab.read_mode == "sample"
    blk = dm_for(path, labelled=True, label_key="Y", batch_size=32, read="block")
    batches = list(blk.train_dataloader())
    n = len(blk.train_indices)
    assert sum(len(b["x"]) for b in batches) == n and len(batches) == -(-n // 32)
    assert sorted(int(v) for b in batches for v in b["targets"][:, 0]) == sorted(blk.train_indices.tolist())
    assert all(torch.equal(b["y"], b["targets"][:, 0].long() % 2) for b in batches)


@pytest.mark.parametrize("dtype, ratio, tol", [("float16", 0.5, 2e-3), ("uint8", 0.25, None)])
def test_prepare_round_trips_and_the_loader_undoes_the_scale(tmp_path, dtype, ratio, tol):
    src, x = jets(tmp_path / "src.h5", n=96, c=8, hw=16)
    out = tmp_path / f"{dtype}.h5"
    rep = prepare(src, out, "jet", layout="NHWC", dtype=dtype, chunk_samples=8)
    assert rep["copied_keys"] == ["Y", "ident"] and rep["chunk"] == [8, 8, 16, 16]
    assert rep["size_ratio"] == pytest.approx(ratio, rel=0.15)
    with h5py.File(out) as f:
        stored = f["jet"]
        assert stored.dtype == np.dtype(dtype) and stored.shape == (96, 8, 16, 16) and stored.chunks == (8, 8, 16, 16)
        np.testing.assert_array_equal(f["ident"][()], np.arange(96))
    bound = tol * np.abs(x).max() if tol else np.max(rep["scale"]) / 2 * 1.0001
    assert 0 < rep["max_abs_error"] <= bound
    orig = dm_for(src, c=8)
    prep = dm_for(str(out), c=8)  # the config says NHWC; the file records NCHW and wins
    assert prep.layout == "NCHW" and prep.summary()["quantised"] == (dtype == "uint8")
    np.testing.assert_allclose(prep.mean.numpy(), orig.mean.numpy(), atol=rep["max_abs_error"])
    np.testing.assert_allclose(prep.std.numpy(), orig.std.numpy(), rtol=0.02, atol=rep["max_abs_error"])
    got = {int(r): xb for b in prep.train_dataloader() for r, xb in zip(b["targets"][:, 0], b["x"])}
    rows = sorted(got)
    xs = torch.stack([got[r] for r in rows])
    assert xs.dtype == torch.float32
    err = (xs - torch.from_numpy(x[rows]).permute(0, 3, 1, 2)).abs().max().item()
    assert err <= rep["max_abs_error"] + 1e-6
    sample = prep.val_set[0]["x"]  # per-sample reads decode too
    j = int(prep.val_indices[0])
    assert (sample - torch.from_numpy(x[j]).permute(2, 0, 1)).abs().max().item() <= rep["max_abs_error"] + 1e-6


def test_prepare_refuses_bad_input_clearly(tmp_path, capsys):
    src, _ = jets(tmp_path / "src.h5", n=16, nan_rows=(3,))
    with pytest.raises(DataError, match="nope.h5: file not found"):
        prepare(tmp_path / "nope.h5", tmp_path / "o.h5", "jet")
    with pytest.raises(DataError, match=r"key 'images' not found; available keys: Y, ident, jet"):
        prepare(src, tmp_path / "o.h5", "images")
    with pytest.raises(DataError, match=r"key 'm' not found.*--labels-key"):
        prepare(src, tmp_path / "o.h5", "jet", layout="NHWC", labels_keys=["m"])
    with pytest.raises(DataError, match="1 non-finite.*uint8 cannot hold"):
        prepare(src, tmp_path / "o.h5", "jet", layout="NHWC", dtype="uint8")
    assert not list(tmp_path.glob("*o.h5*"))  # nothing half-written is left behind
    (tmp_path / "taken.h5").write_bytes(b"x")
    assert prepare_main([src, str(tmp_path / "taken.h5"), "--key", "jet", "--layout", "NHWC"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert prepare_main([src, str(tmp_path / "taken.h5"), "--key", "jet", "--layout", "nhwc", "--overwrite",
                         "--labels-key", "Y"]) == 0
    assert "ratio" in capsys.readouterr().out
    with h5py.File(tmp_path / "taken.h5") as f:
        assert sorted(f) == ["Y", "jet"] and np.isnan(f["jet"][3]).sum() == 1  # float16 keeps NaN for nan_policy
    big = tmp_path / "big.h5"
    with h5py.File(big, "w") as f:
        f["jet"] = np.full((2, 1, 2, 2), 1e6, np.float32)
    with pytest.raises(DataError, match="beyond float16's range"):
        prepare(big, tmp_path / "b16.h5", "jet")


def test_loader_benchmark_quick_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "h5_loader.py"), "--quick", "--dir",
                          str(tmp_path), "--json", str(out)], capture_output=True, text=True, timeout=300,
                         check=False, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(out.read_text())
    cases = {(r["file"], r["read"], r["workers"]) for r in rep["results"]}
    assert ("chunked", "sample", 0) in cases and ("chunked", "block", 2) in cases and ("float16", "block", 1) in cases
    assert all(r["samples_per_s"] > 0 and r["vs_sample_reads"] > 0 for r in rep["results"])
    assert "vs per-sample" in res.stdout


@pytest.mark.slow
def test_pretrain_cli_streams_blocks_from_a_jets_h5_file(tmp_path):
    path, _ = jets(tmp_path / "jets.h5", n=48, chunk=8, c=8, hw=32)
    run_dir = tmp_path / "run"
    out = run_cli([*TINY, "dataset=jets_h5", f"dataset.path={path}", "dataset.label_key=null",
                   "dataset.target_keys=[]", "dataset.num_workers=2", "dataset.block_samples=8", "trainer.max_epochs=2",
                   f"run_dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((run_dir / "summary.json").read_text())["data"]
    assert (data["read"], data["block_samples"], data["layout"]) == ("block", 8, "NHWC")
    assert load_backbone_file(run_dir / "backbone.pt")["meta"]["dataset"] == "jets_h5"
