"""Toy CMS end-to-end jet images (8 channels, mass and pT targets), so jet pipelines run without the real files.

Each jet is a set of massless constituents in the (eta, phi) plane around the jet axis (the image centre).
Signal jets (Y = 1, a boosted W or top) have 2 or 3 compact prongs and more constituents; background jets (Y = 0,
QCD) have one diffuse prong. The constituent cloud is then rescaled about its pT-weighted centroid so that
sqrt(sum_i z_i dR_i^2) = m / pT exactly (the small-angle jet-mass relation), hence the targets really shape the
picture: pT sets the deposited intensity, m / pT the angular spread (prong separation ~ 2 m / pT for two equal
prongs). Each constituent is a charged hadron, photon or neutral hadron and lands in channels with different
responses: track pT, ECAL (3x3 shower spread), HCAL (coarse towers), d0 and dz of tracks, and hits in three
pixel layers (growing position jitter). Deposits are binned with np.bincount, so images stay sparse.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ssl_lab.data.simulated import SimulatedDataModule, atomic_h5, check_sim_args

log = logging.getLogger(__name__)

CHANNEL_NAMES: tuple[str, ...] = ("track_pT", "ECAL", "HCAL", "d0", "dz", "pix1", "pix2", "pix3")
CLASS_NAMES: tuple[str, ...] = ("qcd", "boosted")
WINDOW = 125 * 0.0174  # full (eta, phi) width of the image: 125 ECAL crystals, whatever the pixel count
MAX_RMS = 0.3  # largest m / pT, keeps the constituent cloud inside the window
PT_RANGE = (100.0, 1000.0)  # GeV
M_MAX = 290.0  # GeV
K_MAX = 96  # constituents per jet at most
SIM_VERSION = 1  # bump when the physics changes, so cached files made by an older simulator are not reused
_CHUNK = 64  # jets rendered at once: ~64 MB of float64 work arrays at 125 px
_ECAL_KERNEL = ((0.015, 0.06, 0.015), (0.06, 0.70, 0.06), (0.015, 0.06, 0.015))  # sums to 1: energy conserved
_ECAL_THRESHOLD = 0.05  # GeV, zero suppression
_HCAL_THRESHOLD = 0.5  # GeV per tower
_PIX_EFF = (0.97, 0.95, 0.92)
_PIX_JITTER = (0.3, 0.6, 0.9)  # pixels: outer layers sit further from the calorimeter extrapolation


def draw_jets(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Per-jet truth: label, mass, pT, prong count and prong energy fractions (padded to 3 prongs)."""
    y = rng.permutation(np.arange(n) % 2).astype(np.int64)
    is_top = rng.uniform(size=n) < 0.5
    m_sig = np.where(is_top, 172.8, 80.4) * rng.normal(1.0, 0.08, n)
    m_bkg = 10.0 + (M_MAX - 10.0) * rng.beta(1.2, 3.0, n)  # falling QCD-like mass spectrum
    m = np.clip(np.where(y == 1, m_sig, m_bkg), 10.0, M_MAX)
    pt_lo = np.maximum(PT_RANGE[0], m / MAX_RMS)
    pt = pt_lo + (PT_RANGE[1] - pt_lo) * rng.uniform(size=n)
    n_prong = np.where(y == 1, np.where(is_top, 3, 2), 1)
    frac = rng.gamma(3.0, size=(n, 3)) * (np.arange(3)[None, :] < n_prong[:, None])
    frac = np.maximum(frac / frac.sum(1, keepdims=True), 0.1 * (frac > 0))
    frac = frac / frac.sum(1, keepdims=True)
    mult = np.where(y == 1, 20 + rng.poisson(12.0 * n_prong), 12 + rng.poisson(16.0, n))
    mult = np.clip(mult + np.round(5.0 * np.log(pt / PT_RANGE[0])).astype(int), 4, K_MAX)
    return {"y": y, "m": m, "pt": pt, "n_prong": n_prong, "frac": frac, "mult": mult, "is_top": is_top}


def _constituents(rng: np.random.Generator, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Constituent (B, K) arrays: position (rad, about the axis), pT (GeV), type, displacement flag, valid mask."""
    b = len(t["y"])
    k = np.arange(K_MAX)[None, :]
    valid = k < t["mult"][:, None]
    # Prong membership ~ prong energy fraction; the first n_prong constituents seed one prong each.
    cum = np.cumsum(t["frac"], axis=1)
    prong = (rng.uniform(size=(b, K_MAX))[:, :, None] > cum[:, None, :]).sum(-1)
    prong = np.where(k < t["n_prong"][:, None], k, np.minimum(prong, t["n_prong"][:, None] - 1))
    w = rng.gamma(0.6, size=(b, K_MAX)) * valid + 1e-9 * valid
    flat = (np.arange(b)[:, None] * 3 + prong).ravel()
    wsum = np.bincount(flat, weights=w.ravel(), minlength=3 * b).reshape(b, 3)
    z = t["frac"][np.arange(b)[:, None], prong] * w / wsum[np.arange(b)[:, None], prong]
    # Prong axes, pT-balanced (weighted centroid at 0); background has one prong at the origin.
    centres = rng.normal(size=(b, 3, 2)) * (np.arange(3)[None, :, None] < t["n_prong"][:, None, None])
    centres -= (t["frac"][:, :, None] * centres).sum(1, keepdims=True)
    spread = np.sqrt((t["frac"] * (centres**2).sum(-1)).sum(1))
    centres /= np.where(spread > 0, spread, 1.0)[:, None, None]
    # Soft constituents wander further from their prong; signal prongs are compact, QCD is diffuse.
    width = np.where(t["y"] == 1, rng.uniform(0.12, 0.25, b), 1.0)[:, None]
    rel = np.clip(w / np.maximum(w.max(1, keepdims=True), 1e-12), 1e-3, 1.0)
    offset = rng.normal(size=(b, K_MAX, 2)) * (width * np.minimum(rel ** -0.35, 6.0))[:, :, None]
    pos = centres[np.arange(b)[:, None], prong] + offset
    pos -= (z[:, :, None] * pos).sum(1, keepdims=True)
    rms = np.sqrt((z * (pos**2).sum(-1)).sum(1))
    pos *= (t["m"] / t["pt"] / np.maximum(rms, 1e-12))[:, None, None]
    kind = np.searchsorted([0.62, 0.87], rng.uniform(size=(b, K_MAX)))  # 0 charged, 1 photon, 2 neutral hadron
    # The b-quark prong of a top decays displaced: its tracks have large impact parameters.
    displaced = (t["is_top"] & (t["y"] == 1))[:, None] & (prong == 0)
    return {"pos": pos, "pt": z * t["pt"][:, None], "kind": kind, "displaced": displaced, "valid": valid}


def _bin(jet: np.ndarray, iy: np.ndarray, ix: np.ndarray, val: np.ndarray, b: int, s: int) -> np.ndarray:
    return np.bincount(jet * s * s + iy * s + ix, weights=val, minlength=b * s * s).reshape(b, s, s)


def _render(rng: np.random.Generator, t: dict[str, np.ndarray], s: int) -> np.ndarray:
    """Images (B, S, S, 8) float32 for the jets in `t`."""
    b = len(t["y"])
    c = _constituents(rng, t)
    pix = WINDOW / s
    col = np.floor((c["pos"][..., 0] + WINDOW / 2) / pix).astype(np.int64)
    row = np.floor((WINDOW / 2 - c["pos"][..., 1]) / pix).astype(np.int64)
    inside = c["valid"] & (col >= 0) & (col < s) & (row >= 0) & (row < s)
    jet = np.broadcast_to(np.arange(b)[:, None], inside.shape)
    pt, kind = c["pt"], c["kind"]
    charged = kind == 0
    shape = pt.shape
    # Channel responses per constituent type.
    trk = np.where(charged, pt * rng.normal(1.0, 0.01, shape), 0.0)
    e_frac = np.where(kind == 1, rng.normal(1.0, 0.04, shape), rng.uniform(0.0, 0.25, shape))
    ecal = pt * e_frac
    hcal = np.where(kind == 1, 0.0, np.maximum(pt - ecal, 0.0) * rng.normal(0.85, 0.15, shape))
    disp = c["displaced"]
    d0 = np.where(charged, np.where(disp, rng.laplace(0.0, 0.3, shape), rng.normal(0.0, 0.02, shape)), 0.0)
    dz = np.where(charged, np.where(disp, rng.laplace(0.0, 0.4, shape), rng.normal(0.0, 0.05, shape)), 0.0)
    out = np.zeros((b, s, s, len(CHANNEL_NAMES)), dtype=np.float32)
    sel = inside
    j, r, q = jet[sel], row[sel], col[sel]
    trk_sel = inside & charged
    jt, rt, qt = jet[trk_sel], row[trk_sel], col[trk_sel]
    out[..., 0] = _bin(jt, rt, qt, trk[trk_sel], b, s)
    e = _bin(j, r, q, ecal[sel], b, s)
    ep = np.pad(e, ((0, 0), (1, 1), (1, 1)))
    e = sum(_ECAL_KERNEL[dy][dx] * ep[:, dy:dy + s, dx:dx + s] for dy in range(3) for dx in range(3))
    out[..., 1] = np.where(e >= _ECAL_THRESHOLD, e, 0.0)
    tower = max(1, round(s / 25))  # 5 ECAL crystals per HCAL tower at 125 px
    nt = -(-s // tower)
    h = _bin(j, r // tower, q // tower, hcal[sel], b, nt)
    h = np.where(h >= _HCAL_THRESHOLD, h, 0.0) / tower**2  # spread evenly: total energy is kept
    out[..., 2] = np.repeat(np.repeat(h, tower, axis=1), tower, axis=2)[:, :s, :s]
    out[..., 3] = _bin(jt, rt, qt, d0[trk_sel], b, s)
    out[..., 4] = _bin(jt, rt, qt, dz[trk_sel], b, s)
    for layer, (eff, jit) in enumerate(zip(_PIX_EFF, _PIX_JITTER)):
        rr = np.clip(rt + np.round(rng.normal(0.0, jit, rt.shape)).astype(np.int64), 0, s - 1)
        qq = np.clip(qt + np.round(rng.normal(0.0, jit, qt.shape)).astype(np.int64), 0, s - 1)
        hit = rng.uniform(size=rt.shape) < eff
        out[..., 5 + layer] = _bin(jt[hit], rr[hit], qq[hit], np.ones(int(hit.sum())), b, s)
    return out


def iter_jets(n: int = 600, image_size: int = 125,
              seed: int = 0) -> Iterator[tuple[slice, np.ndarray, dict[str, np.ndarray]]]:
    """Yield (rows, images (B, S, S, 8) float32, truth) chunk by chunk, so 600 x 125 x 125 x 8 never sits twice
    in memory. Deterministic from `seed` (one generator consumed in a fixed order)."""
    if n < 1 or image_size < 8:
        raise ValueError(f"n must be >= 1 and image_size >= 8, got {n}, {image_size}")
    rng = np.random.default_rng(seed)
    truth = draw_jets(rng, n)
    for start in range(0, n, _CHUNK):
        rows = slice(start, min(start + _CHUNK, n))
        t = {k: v[rows] for k, v in truth.items()}
        yield rows, _render(rng, t, image_size), t


def jet_arrays(n: int = 64, image_size: int = 125, seed: int = 0) -> dict[str, np.ndarray]:
    """The whole dataset in memory, in the CMS E2E layout ("jet", "Y", "m", "pT"); for small n."""
    jets = np.empty((n, image_size, image_size, len(CHANNEL_NAMES)), dtype=np.float32)
    cols = {"Y": np.empty((n, 1), np.float32), "m": np.empty((n, 1), np.float32), "pT": np.empty((n, 1), np.float32)}
    for rows, img, t in iter_jets(n, image_size, seed):
        jets[rows] = img
        cols["Y"][rows, 0], cols["m"][rows, 0], cols["pT"][rows, 0] = t["y"], t["m"], t["pt"]
    return {"jet": jets, **cols}


def simulate_jets(path: str | os.PathLike, n: int = 600, image_size: int = 125, seed: int = 0) -> Path:
    """Write simulated jets to HDF5 in the CMS E2E layout, atomically (tmp file, then os.replace).

    "jet" (N, S, S, 8) float32 channels-last, one lzf-compressed chunk per jet (images are sparse); "Y", "m",
    "pT" (N, 1) float32.
    """
    path = Path(path)
    s = image_size
    with atomic_h5(path) as f:
        ds = f.create_dataset("jet", shape=(n, s, s, len(CHANNEL_NAMES)), dtype=np.float32,
                              chunks=(1, s, s, len(CHANNEL_NAMES)), compression="lzf")
        cols = {k: f.create_dataset(k, shape=(n, 1), dtype=np.float32) for k in ("Y", "m", "pT")}
        for rows, img, t in iter_jets(n, s, seed):
            ds[rows] = img
            cols["Y"][rows, 0], cols["m"][rows, 0], cols["pT"][rows, 0] = t["y"], t["m"], t["pt"]
        cols["Y"].attrs["class_names"] = list(CLASS_NAMES)
        f.attrs["class_names"] = list(CLASS_NAMES)
        f.attrs["channel_names"] = list(CHANNEL_NAMES)
        f.attrs["simulator"] = "ssl_lab.data.jets_sim"
        f.attrs["seed"] = seed
    log.info("wrote %d simulated jets (%dx%dx%d) to %s", n, s, s, len(CHANNEL_NAMES), path)
    return path


class JetsSimDataModule(SimulatedDataModule):
    """Simulated 8-channel jets (label Y, targets m and pT), NHWC like a CMS E2E file."""

    def __init__(self, name: str = "jets_sim", in_chans: int = 8, n: int = 600, image_size: int = 125,
                 sim_seed: int = 0, cache_dir: str = ".cache/ssl_lab", val_fraction: float = 0.2,
                 nan_policy: str = "zero", in_memory: bool = False, batch_size: int = 64, num_workers: int = 2,
                 seed: int = 0, stats_max_samples: int = 4096, labelled: bool = False, test_fraction: float = 0.2,
                 label_fraction: float = 1.0, split_seed: int = 0, bad_samples: str = "error",
                 max_bad_samples: int = 100) -> None:
        check_sim_args(n=n, image_size=image_size)
        params = {"simulator": "jets", "version": SIM_VERSION, "n": n, "image_size": image_size, "seed": sim_seed}
        super().__init__(
            params, cache_dir, name=name, in_chans=in_chans, image_key="jet", label_key="Y", target_keys=("m", "pT"),
            layout="NHWC", val_fraction=val_fraction, nan_policy=nan_policy, in_memory=in_memory,
            batch_size=batch_size, num_workers=num_workers, seed=seed, stats_max_samples=stats_max_samples,
            labelled=labelled, test_fraction=test_fraction, label_fraction=label_fraction,
            split_seed=split_seed, bad_samples=bad_samples, max_bad_samples=max_bad_samples,
        )

    def simulate(self, path: str) -> None:
        p = self.sim_params
        simulate_jets(path, p["n"], p["image_size"], p["seed"])
