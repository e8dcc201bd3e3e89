"""Simulators: file layout, determinism, the physics that makes labels and targets learnable, and the data modules."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from ssl_lab.data import jets_sim, lens_sim
from ssl_lab.data.jets_sim import CHANNEL_NAMES, JetsSimDataModule, jet_arrays, simulate_jets
from ssl_lab.data.lens_sim import (
    CLASS_NAMES, LensSimDataModule, draw_params, lens_images, pixel_grid, render, sie_deflection,
    simulate_lenses,
)
from ssl_lab.data.simulated import atomic_h5
from ssl_lab.errors import ConfigError, DataError


def _rank(a: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(a)).astype(float)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_rank(a), _rank(b))[0, 1])


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    r = _rank(score) + 1
    n1, n0 = int((label == 1).sum()), int((label == 0).sum())
    return float((r[label == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# ---- lenses ---------------------------------------------------------------------------------------------------
def test_lens_file_layout(tmp_path):
    path = simulate_lenses(tmp_path / "lenses.h5", n_per_class=4, image_size=32, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenses.h5"]  # the temporary file was moved, not left
    with h5py.File(path, "r") as f:
        x, y = f["images"][()], f["labels"][()]
        names = [str(n) for n in f.attrs["class_names"]]
    assert x.shape == (12, 1, 32, 32) and x.dtype == np.float32
    assert y.shape == (12,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [4, 4, 4]
    assert names == ["no_sub", "cdm", "vortex"] == list(CLASS_NAMES)
    np.testing.assert_allclose(x.min(axis=(1, 2, 3)), 0.0)
    np.testing.assert_allclose(x.max(axis=(1, 2, 3)), 1.0)


def test_lens_deterministic_from_seed():
    a, la = lens_images(2, 24, seed=3)
    b, lb = lens_images(2, 24, seed=3)
    c, _ = lens_images(2, 24, seed=4)
    assert a.tobytes() == b.tobytes() and np.array_equal(la, lb)
    assert not np.array_equal(a, c)


def test_sis_deflection_has_constant_magnitude_and_makes_an_einstein_ring():
    x, y = pixel_grid(64)
    ax, ay = sie_deflection(x, y, b=1.0, q=np.float64(1.0), phi=np.float64(0.3))
    np.testing.assert_allclose(np.hypot(ax, ay), 1.0, atol=1e-3)
    # A source right behind an SIS is imaged into a ring at the Einstein radius.
    theta_e = 1.1
    labels = np.zeros(1, np.int64)
    p = draw_params(np.random.default_rng(0), labels)
    p.update(theta_e=np.array([theta_e]), q=np.ones(1), g1=np.zeros(1), g2=np.zeros(1), x0=np.zeros(1),
             y0=np.zeros(1), src_r=np.zeros(1), src_q=np.ones(1), src_re=np.array([0.1]))
    img = render(p, 64)[0]
    r = np.hypot(x, y)
    ring_r = (img * r).sum() / img.sum()
    assert abs(ring_r - theta_e) < 2 * lens_sim.FOV_ARCSEC / 64


def test_sie_deflection_is_a_gradient_and_tends_to_sis():
    """A lens deflection is the gradient of a potential: its curl vanishes (numerically, off the centre)."""
    h = 1e-5
    x, y = np.meshgrid(np.linspace(-1.5, 1.5, 9), np.linspace(-1.3, 1.7, 9))
    b, q, phi = 1.0, 0.65, 0.4
    _, ay_xp = sie_deflection(x + h, y, b, q, phi)
    _, ay_xm = sie_deflection(x - h, y, b, q, phi)
    ax_yp, _ = sie_deflection(x, y + h, b, q, phi)
    ax_ym, _ = sie_deflection(x, y - h, b, q, phi)
    curl = (ay_xp - ay_xm - ax_yp + ax_ym) / (2 * h)
    assert np.abs(curl).max() < 1e-4
    ax_e, ay_e = sie_deflection(x, y, b, 0.998, phi)
    ax_s, ay_s = sie_deflection(x, y, b, 1.0, phi)
    np.testing.assert_allclose(ax_e, ax_s, atol=5e-3)
    np.testing.assert_allclose(ay_e, ay_s, atol=5e-3)
    ax_q, _ = sie_deflection(x, y, b, q, phi)
    assert np.abs(ax_q - ax_s).max() > 0.05  # ellipticity really matters


def test_substructure_masses_follow_the_class():
    labels = np.repeat(np.arange(3), 20)
    p = draw_params(np.random.default_rng(1), labels)
    n_masses = (p["sub_b2"] > 0).sum(1)
    assert (n_masses[labels == 0] == 0).all()
    assert ((n_masses[labels == 1] >= 1) & (n_masses[labels == 1] <= lens_sim.MAX_CDM)).all()
    assert (n_masses[labels == 2] == lens_sim.VORTEX_POINTS).all()
    for i in np.flatnonzero(labels == 2):  # vortex masses lie on one straight segment
        pts = np.stack([p["sub_x"][i], p["sub_y"][i]], 1)[: lens_sim.VORTEX_POINTS]
        assert np.linalg.svd(pts - pts.mean(0), compute_uv=False)[1] < 1e-9


def test_substructure_changes_the_image_near_the_masses():
    labels = np.repeat(np.arange(3), 12)
    p = draw_params(np.random.default_rng(2), labels)
    size = 48
    with_sub = render(p, size)
    without = render(p, size, substructure=False)
    diff = np.abs(with_sub - without)
    assert diff[labels == 0].max() == 0.0
    assert diff[labels > 0].max(axis=(1, 2)).min() > 0.03  # every perturbed image changes visibly
    x, y = pixel_grid(size)
    dist = []
    for i in np.flatnonzero(labels == 1):
        k = np.argmax(diff[i])
        live = p["sub_b2"][i] > 0
        dist.append(np.hypot(p["sub_x"][i][live] - x.flat[k], p["sub_y"][i][live] - y.flat[k]).min())
    assert np.median(dist) < 0.4  # arcsec: the biggest change sits by a subhalo (ring points are ~1" apart)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.h5"
    with pytest.raises(RuntimeError):
        with atomic_h5(target) as f:
            f.create_dataset("a", data=np.zeros(3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ---- jets ------------------------------------------------------------------------------------------------------
def test_jets_file_layout_matches_cms_e2e(tmp_path):
    path = simulate_jets(tmp_path / "jets.h5", n=6, seed=0)
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"jet", "Y", "m", "pT"}
        assert f["jet"].shape == (6, 125, 125, 8) and f["jet"].dtype == np.float32
        for k in ("Y", "m", "pT"):
            assert f[k].shape == (6, 1) and f[k].dtype == np.float32
        assert [str(c) for c in f.attrs["channel_names"]] == list(CHANNEL_NAMES)
        jets, y, m, pt = f["jet"][()], f["Y"][()], f["m"][()], f["pT"][()]
    assert set(np.unique(y).tolist()) <= {0.0, 1.0}
    assert ((m >= 10) & (m <= 300)).all() and ((pt >= 100) & (pt <= 1000)).all()
    assert np.isfinite(jets).all()
    assert (jets != 0).mean() < 0.05  # sparse deposits, like the real detector images
    mem = jet_arrays(6, 125, seed=0)  # the file holds exactly what the in-memory generator makes
    assert mem["jet"].tobytes() == jets.tobytes() and np.array_equal(mem["m"], m)


def test_jets_deterministic_from_seed():
    a, b, c = jet_arrays(8, 32, seed=1), jet_arrays(8, 32, seed=1), jet_arrays(8, 32, seed=2)
    for k in ("jet", "Y", "m", "pT"):
        assert a[k].tobytes() == b[k].tobytes()
    assert not np.array_equal(a["jet"], c["jet"]) and not np.array_equal(a["pT"], c["pT"])


def test_jet_channels_have_distinct_detector_responses():
    d = jet_arrays(12, 125, seed=5)
    x = d["jet"]
    hcal = x[..., CHANNEL_NAMES.index("HCAL")]
    towers = hcal.reshape(12, 25, 5, 25, 5)
    assert (towers == towers[:, :, :1, :, :1]).all()  # coarse HCAL towers, upsampled to the ECAL grid
    assert (hcal > 0).sum() > 0
    for name in ("pix1", "pix2", "pix3"):
        hits = x[..., CHANNEL_NAMES.index(name)]
        assert (hits == np.round(hits)).all() and hits.min() >= 0 and hits.max() >= 1  # hit counts
    for name in ("d0", "dz"):
        v = x[..., CHANNEL_NAMES.index(name)]
        assert v.min() < 0 < v.max()  # signed impact parameters
    track = x[..., CHANNEL_NAMES.index("track_pT")] > 0
    ecal = x[..., CHANNEL_NAMES.index("ECAL")] > 0
    assert (ecal & ~track).any() and (track & ~ecal).any()  # photons without tracks, tracks without showers


def test_jet_targets_and_label_shape_the_image():
    d = jet_arrays(240, 64, seed=7)
    x, y, m, pt = d["jet"], d["Y"][:, 0], d["m"][:, 0], d["pT"][:, 0]
    energy = x[..., :3].sum(-1)  # track pT + ECAL + HCAL
    assert _spearman(energy.sum((1, 2)), pt) > 0.8
    s = x.shape[1]
    c = (np.arange(s) + 0.5) * jets_sim.WINDOW / s - jets_sim.WINDOW / 2
    gx, gy = np.meshgrid(c, -c)
    w = energy / energy.sum((1, 2), keepdims=True)
    mx, my = (w * gx).sum((1, 2)), (w * gy).sum((1, 2))
    rms = np.sqrt((w * ((gx - mx[:, None, None]) ** 2 + (gy - my[:, None, None]) ** 2)).sum((1, 2)))
    assert np.corrcoef(rms, m / pt)[0, 1] > 0.5  # mass sets the angular spread (m/pT = pT-weighted rms)
    hits = (x[..., CHANNEL_NAMES.index("pix1")] > 0).sum((1, 2))
    assert _auc(hits.astype(float), y) > 0.8  # signal: more prongs, more constituents
    assert 0.3 < y.mean() < 0.7


# ---- data modules ----------------------------------------------------------------------------------------------
def test_lens_sim_datamodule_writes_once_and_yields_batches(tmp_path):
    kw = dict(n_per_class=6, image_size=32, sim_seed=1, cache_dir=str(tmp_path), batch_size=4, num_workers=0)
    dm = LensSimDataModule(**kw)
    assert dm.path == LensSimDataModule(**kw).path  # a pure function of the knobs: other processes agree
    assert dm.path != LensSimDataModule(**{**kw, "sim_seed": 2}).path
    assert not (tmp_path / dm.path).exists()  # the constructor does no I/O
    dm.prepare_data()
    mtime = (tmp_path / dm.path).stat().st_mtime_ns
    dm.prepare_data()
    assert (tmp_path / dm.path).stat().st_mtime_ns == mtime  # cached, not regenerated
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.class_names == list(CLASS_NAMES) and dm.image_shape == (32, 32)
    assert dm.mean.shape == (1,) and dm.std.shape == (1,)
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, 1, 32, 32) and batch["x"].dtype == torch.float32
    assert batch["y"].dtype == torch.int64 and set(batch["y"].tolist()) <= {0, 1, 2}
    assert "targets" not in batch
    assert float(batch["x"].min()) >= 0.0 and float(batch["x"].max()) <= 1.0


def test_jets_sim_datamodule_yields_images_labels_and_matching_targets(tmp_path):
    dm = JetsSimDataModule(n=20, image_size=32, sim_seed=3, cache_dir=str(tmp_path), batch_size=4, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.in_chans == 8 and dm.num_classes == 2 and dm.target_names == ["m", "pT"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, 8, 32, 32) and batch["x"].dtype == torch.float32
    assert batch["y"].dtype == torch.int64 and set(batch["y"].tolist()) <= {0, 1}
    assert batch["targets"].shape == (4, 2) and batch["targets"].dtype == torch.float32
    with h5py.File(dm.path, "r") as f:
        jets, y, mpt = f["jet"][()], f["Y"][()][:, 0], np.concatenate([f["m"][()], f["pT"][()]], 1)
    seen = 0
    for b in dm.val_dataloader():  # each sample's image and label belong to the row its (m, pT) came from
        for xi, yi, ti in zip(b["x"].numpy(), b["y"].numpy(), b["targets"].numpy()):
            row = int(np.flatnonzero((mpt == ti).all(1))[0])
            np.testing.assert_array_equal(xi, jets[row].transpose(2, 0, 1))
            assert yi == y[row]
            seen += 1
    assert seen == len(dm.val_set) > 0


def test_sim_datamodules_check_their_knobs_and_channels(tmp_path):
    with pytest.raises(ConfigError, match="dataset.n_per_class"):
        LensSimDataModule(n_per_class=0, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="dataset.image_size"):
        JetsSimDataModule(image_size=4, cache_dir=str(tmp_path))
    dm = JetsSimDataModule(in_chans=3, n=4, image_size=16, cache_dir=str(tmp_path), batch_size=2, num_workers=0)
    dm.prepare_data()
    with pytest.raises(DataError, match="in_chans"):
        dm.setup("fit")
