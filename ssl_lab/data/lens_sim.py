"""DeepLense-style strong-lensing simulator, so the framework runs end to end without downloading data.

Physics (angles in arcsec, a fixed field of view whatever the pixel count): an SIE main lens (SIS when the axis
ratio is 1) with external shear deflects rays shot from every pixel back to the source plane, where an elliptical
Sérsic profile is evaluated. Substructure adds point-mass deflections: a few CDM subhaloes near the Einstein ring
(class 1) or a line of many small masses, i.e. a vortex (class 2). Then a Gaussian PSF (in Fourier space),
Poisson counts on a sky background plus Gaussian read noise, and per-image min-max normalisation to [0, 1].
Everything is vectorised over a batch of images and the pixel grid; the only Python loop runs over the (few)
substructure masses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ssl_lab.data.simulated import SimulatedDataModule, atomic_h5, check_sim_args

log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("no_sub", "cdm", "vortex")
FOV_ARCSEC = 4.0  # full width of the image; the ring (theta_E ~ 0.7-1.2") sits well inside it
MAX_CDM = 6  # at most this many CDM subhaloes per image
VORTEX_POINTS = 24  # the vortex line is sampled by this many equal point masses
_BATCH = 128  # images rendered at once: bounds memory to a few (128, H, W) float64 arrays
SIM_VERSION = 1  # bump when the physics changes, so cached files made by an older simulator are not reused


def pixel_grid(image_size: int, fov: float = FOV_ARCSEC) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (arcsec), shape (H, W) each; x grows to the right, y upwards (row 0 is the top)."""
    half = fov / 2.0
    c = (np.arange(image_size) + 0.5) / image_size * fov - half
    x, y = np.meshgrid(c, -c)
    return x, y


def _rotate(x: np.ndarray, y: np.ndarray, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ca, sa = np.cos(angle), np.sin(angle)
    return ca * x - sa * y, sa * x + ca * y


def sie_deflection(x: np.ndarray, y: np.ndarray, b: np.ndarray, q: np.ndarray, phi: np.ndarray,
                   x0: np.ndarray | float = 0.0, y0: np.ndarray | float = 0.0,
                   core: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Deflection of a (cored) singular isothermal ellipsoid; falls back to the SIS formula when q ~ 1.

    Normalised so that `b` is the Einstein radius for q = 1 and the mass inside the elliptical critical curve is
    conserved for q < 1 (Kormann et al. 1994 convention). Arguments broadcast: per-image parameters of shape
    (B, 1, 1) against a (H, W) grid give (B, H, W).
    """
    xr, yr = _rotate(x - x0, y - y0, -phi)  # into the lens frame: major axis along x
    qc = np.minimum(q, 0.999)
    e = np.sqrt(1.0 - qc**2)
    psi = np.sqrt(qc**2 * (core**2 + xr**2) + yr**2)
    pref = b * np.sqrt(qc) / e
    ax_sie = pref * np.arctan(e * xr / (psi + core))
    ay_sie = pref * np.arctanh(e * yr / (psi + qc**2 * core))
    r = np.sqrt(xr**2 + yr**2 + core**2)
    sis = q > 0.999
    axr = np.where(sis, b * xr / r, ax_sie)
    ayr = np.where(sis, b * yr / r, ay_sie)
    return _rotate(axr, ayr, phi)


def shear_deflection(x: np.ndarray, y: np.ndarray, g1: np.ndarray, g2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """External shear from the lens environment: alpha = Gamma @ (x, y)."""
    return g1 * x + g2 * y, g2 * x - g1 * y


def point_masses_deflection(x: np.ndarray, y: np.ndarray, xs: np.ndarray, ys: np.ndarray, b2: np.ndarray,
                            soft: float) -> tuple[np.ndarray, np.ndarray]:
    """Summed deflection b^2 (x - x_s) / |x - x_s|^2 of point masses; xs, ys, b2 have shape (B, M).

    `soft` (arcsec) softens the singularity so a mass sitting on a pixel centre stays finite. Masses with b2 = 0
    (padding) contribute nothing, which lets CDM (a few masses) and vortex (a line of many) share one code path.
    """
    ax = np.zeros(np.broadcast_shapes(x.shape, (xs.shape[0], 1, 1)))
    ay = np.zeros_like(ax)
    for m in range(xs.shape[1]):
        dx = x - xs[:, m, None, None]
        dy = y - ys[:, m, None, None]
        w = b2[:, m, None, None] / (dx**2 + dy**2 + soft**2)
        ax += w * dx
        ay += w * dy
    return ax, ay


def sersic(x: np.ndarray, y: np.ndarray, x0: np.ndarray, y0: np.ndarray, r_e: np.ndarray, n: np.ndarray,
           q: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Elliptical Sérsic surface brightness, 1 at the effective radius."""
    xr, yr = _rotate(x - x0, y - y0, -phi)
    r = np.sqrt(q * xr**2 + yr**2 / q)
    bn = 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n**2)
    return np.exp(-bn * ((r / r_e) ** (1.0 / n) - 1.0))


def gaussian_blur_fft(img: np.ndarray, sigma_pix: np.ndarray) -> np.ndarray:
    """Convolve each (H, W) image with a Gaussian PSF of its own width, via the analytic transfer function.

    The wrap-around of the circular convolution is harmless: the lensed light sits far from the borders.
    """
    h, w = img.shape[-2:]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    s = np.asarray(sigma_pix).reshape(-1, 1, 1)
    transfer = np.exp(-2.0 * np.pi**2 * s**2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(img) * transfer, s=(h, w))


def draw_params(rng: np.random.Generator, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Random lens, source, substructure and observing parameters, one row per image (shape (B,) or (B, M))."""
    nb = len(labels)
    u = rng.uniform
    p: dict[str, np.ndarray] = {
        "theta_e": u(0.7, 1.2, nb),
        "q": np.where(u(0, 1, nb) < 0.2, 1.0, u(0.6, 1.0, nb)),  # a fifth are SIS
        "phi": u(0, np.pi, nb),
        "x0": rng.normal(0, 0.03, nb),
        "y0": rng.normal(0, 0.03, nb),
        "g1": rng.normal(0, 0.03, nb),
        "g2": rng.normal(0, 0.03, nb),
        "src_r": np.sqrt(u(0, 1, nb)) * u(0.05, 0.35, nb),  # source offset (arcsec) -> rings and arcs
        "src_angle": u(0, 2 * np.pi, nb),
        "src_re": u(0.08, 0.3, nb),
        "src_n": u(0.7, 2.5, nb),
        "src_q": u(0.6, 1.0, nb),
        "src_phi": u(0, np.pi, nb),
        "psf_sigma": u(0.03, 0.07, nb),  # arcsec
        "peak_counts": u(40.0, 400.0, nb),
        "sky_counts": u(2.0, 20.0, nb),
        "read_noise": u(0.5, 3.0, nb),
    }
    m = max(MAX_CDM, VORTEX_POINTS)
    xs, ys, b2 = np.zeros((nb, m)), np.zeros((nb, m)), np.zeros((nb, m))
    te = p["theta_e"]
    # CDM: 1..MAX_CDM point masses scattered around the Einstein ring, where they perturb the arcs.
    n_sub = np.minimum(1 + rng.poisson(2.0, nb), MAX_CDM)
    rad = te[:, None] * u(0.75, 1.25, (nb, MAX_CDM))
    ang = u(0, 2 * np.pi, (nb, MAX_CDM))
    b_sub = u(0.06, 0.16, (nb, MAX_CDM))
    live = np.arange(MAX_CDM)[None, :] < n_sub[:, None]
    cdm = labels == 1
    xs[cdm, :MAX_CDM] = (rad * np.cos(ang))[cdm]
    ys[cdm, :MAX_CDM] = (rad * np.sin(ang))[cdm]
    b2[cdm, :MAX_CDM] = (b_sub**2 * live)[cdm]
    # Vortex: a straight segment near the ring, mass spread evenly along it.
    length = te * u(0.5, 1.1, nb)
    centre_r = te * u(0.8, 1.2, nb)
    centre_a = u(0, 2 * np.pi, nb)
    orient = u(0, np.pi, nb)
    b_vortex = u(0.15, 0.3, nb)
    t = np.linspace(-0.5, 0.5, VORTEX_POINTS)[None, :] * length[:, None]
    vx = (centre_r * np.cos(centre_a))[:, None] + t * np.cos(orient)[:, None]
    vy = (centre_r * np.sin(centre_a))[:, None] + t * np.sin(orient)[:, None]
    vort = labels == 2
    xs[vort, :VORTEX_POINTS] = vx[vort]
    ys[vort, :VORTEX_POINTS] = vy[vort]
    b2[vort, :VORTEX_POINTS] = (b_vortex**2 / VORTEX_POINTS)[vort, None]
    p.update(sub_x=xs, sub_y=ys, sub_b2=b2)
    return p


def render(params: Mapping[str, np.ndarray], image_size: int, substructure: bool = True,
           noise_rng: np.random.Generator | None = None) -> np.ndarray:
    """Lensed, PSF-blurred images (B, H, W) float64 in [0, 1]; noiseless when `noise_rng` is None.

    `substructure=False` renders the same lens and source without the subhaloes/vortex, which is how the tests
    show that the substructure deflection really changes the picture.
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}

    def col(k: str) -> np.ndarray:
        return p[k][:, None, None]

    x, y = pixel_grid(image_size)
    ax, ay = sie_deflection(x, y, col("theta_e"), col("q"), col("phi"), col("x0"), col("y0"))
    sx, sy = shear_deflection(x, y, col("g1"), col("g2"))
    ax, ay = ax + sx, ay + sy
    if substructure:
        pix = FOV_ARCSEC / image_size
        dx, dy = point_masses_deflection(x, y, p["sub_x"], p["sub_y"], p["sub_b2"], soft=0.5 * pix)
        ax, ay = ax + dx, ay + dy
    bx, by = x - ax, y - ay  # lens equation: beta = theta - alpha(theta)
    src_x = col("src_r") * np.cos(col("src_angle"))
    src_y = col("src_r") * np.sin(col("src_angle"))
    img = sersic(bx, by, src_x, src_y, col("src_re"), col("src_n"), col("src_q"), col("src_phi"))
    img = gaussian_blur_fft(img, p["psf_sigma"] / (FOV_ARCSEC / image_size))
    img = img / np.maximum(img.max(axis=(1, 2), keepdims=True), 1e-12)
    if noise_rng is not None:
        counts = img * col("peak_counts") + col("sky_counts")
        img = noise_rng.poisson(np.maximum(counts, 0.0)) - col("sky_counts")
        img = img + noise_rng.normal(0.0, 1.0, img.shape) * col("read_noise")
    lo = img.min(axis=(1, 2), keepdims=True)
    hi = img.max(axis=(1, 2), keepdims=True)
    return (img - lo) / np.maximum(hi - lo, 1e-12)


def lens_images(n_per_class: int = 300, image_size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generate the dataset in memory: images (N, 1, H, W) float32 in [0, 1] and labels (N,) int64.

    Classes come in a seeded random order (not sorted), so any prefix of the file is class-balanced on average.
    """
    if n_per_class < 1 or image_size < 8:
        raise ValueError(f"n_per_class must be >= 1 and image_size >= 8, got {n_per_class}, {image_size}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(CLASS_NAMES), dtype=np.int64), n_per_class))
    params = draw_params(rng, labels)
    images = np.empty((len(labels), 1, image_size, image_size), dtype=np.float32)
    for start in range(0, len(labels), _BATCH):
        sl = slice(start, start + _BATCH)
        chunk = {k: v[sl] for k, v in params.items()}
        images[sl, 0] = render(chunk, image_size, noise_rng=rng)
    return images, labels


def simulate_lenses(path: str | os.PathLike, n_per_class: int = 300, image_size: int = 64, seed: int = 0) -> Path:
    """Write a simulated 3-class lensing dataset to HDF5 ("images", "labels", attrs class_names) atomically."""
    images, labels = lens_images(n_per_class, image_size, seed)
    path = Path(path)
    with atomic_h5(path) as f:
        f.create_dataset("images", data=images, chunks=(1, 1, image_size, image_size))
        f.create_dataset("labels", data=labels)
        f.attrs["class_names"] = list(CLASS_NAMES)
        f.attrs["simulator"] = "ssl_lab.data.lens_sim"
        f.attrs["seed"] = seed
        f.attrs["fov_arcsec"] = FOV_ARCSEC
    log.info("wrote %d simulated lenses (%dx%d) to %s", len(labels), image_size, image_size, path)
    return path


class LensSimDataModule(SimulatedDataModule):
    """Simulated 3-class lenses (labels 0 no_sub, 1 cdm, 2 vortex), 1 channel, NCHW."""

    def __init__(self, name: str = "lens_sim", in_chans: int = 1, n_per_class: int = 300, image_size: int = 64,
                 sim_seed: int = 0, cache_dir: str = ".cache/ssl_lab", val_fraction: float = 0.2,
                 nan_policy: str = "zero", in_memory: bool = False, batch_size: int = 64, num_workers: int = 2,
                 seed: int = 0, stats_max_samples: int = 4096, labelled: bool = False, test_fraction: float = 0.2,
                 label_fraction: float = 1.0, split_seed: int = 0, bad_samples: str = "error",
                 max_bad_samples: int = 100) -> None:
        check_sim_args(n_per_class=n_per_class, image_size=image_size)
        params = {"simulator": "lens", "version": SIM_VERSION, "n_per_class": n_per_class,
                  "image_size": image_size, "seed": sim_seed}
        super().__init__(
            params, cache_dir, name=name, in_chans=in_chans, image_key="images", label_key="labels", layout="NCHW",
            val_fraction=val_fraction, nan_policy=nan_policy, in_memory=in_memory, batch_size=batch_size,
            num_workers=num_workers, seed=seed, stats_max_samples=stats_max_samples,
            labelled=labelled, test_fraction=test_fraction, label_fraction=label_fraction,
            split_seed=split_seed, bad_samples=bad_samples, max_bad_samples=max_bad_samples,
        )

    def simulate(self, path: str) -> None:
        p = self.sim_params
        simulate_lenses(path, p["n_per_class"], p["image_size"], p["seed"])
