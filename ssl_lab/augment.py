"""Batched, on-device view making for images with any number of channels.

Why batched: per-sample transforms (PIL on workers, or per-sample GPU kernels) ran at 0.27-0.39x the training ceiling
(see DESIGN.md). Here every op works on the whole stack of views at once: the ``n_views`` copies of the batch are
stacked along the batch axis ([V*B, C, H, W]), each op draws one tensor of per-sample parameters, and samples that
an op skips get identity parameters, so there is no Python loop over samples and no host-device sync.

Pipeline (fixed order, whatever the order of ``ops`` in the config):
uint8 -> float/255 (float stays in raw units) -> geometry (resized_crop, hflip, vflip, rot90, rotate composed into ONE
affine per view, one ``affine_grid`` + ``grid_sample``) -> colour (color_jitter, grayscale, solarize; RGB only)
-> intensity -> gamma -> blur -> normalise (mean/std) -> noise -> channel_drop.

Op parameters and defaults (an op absent from ``ops`` is off; ``p: 0`` also turns it off; ``op: null`` in YAML means
"on, with defaults"):

============  ====================================================================================================
resized_crop  p=1.0, scale=[0.08, 1.0] (area fraction), ratio=[3/4, 4/3] (w/h, drawn log-uniformly)
hflip/vflip   p=0.5
rot90         p=1.0 (k uniform in 0..3, so k=0 is already one of the outcomes)
rotate        p=1.0, degrees=[0, 360] (angle drawn uniformly, in rot90's sense: 90 = one rot90 turn; the view's
              corners that a turn brings in from outside the image are mirrored content, see PADDING_MODE)
color_jitter  p=0.8, brightness=0.4, contrast=0.4, saturation=0.2 (x -> factor in [max(0, 1-x), 1+x], or a pair),
              hue=0.1 (h -> shift in [-h, h] turns, h <= 0.5, or a pair)
grayscale     p=0.2
solarize      p=0.2, threshold=0.5 (in [0, 1] pixel units)
intensity     p=0.8, scale=[0.8, 1.2] (per sample, per channel factor), shift=[0.0, 0.0] (per sample, per channel,
              in units of that channel's std from ``set_stats``, so one preset fits data in any units)
gamma         p=0.5, gamma=[0.7, 1.5] (per sample, per channel: the image rescaled to [0, 1] by its own min and max,
              raised to gamma, scaled back; contrast changes while the range stays, in any units; flat channels stay)
blur          p=0.5, sigma=[0.1, 2.0] (pixels of the output view), kernel_size=None (-> 2*ceil(3*sigma_hi)+1, odd)
noise         p=0.5, std=[0.0, 0.1] (Gaussian, in normalised units, per sample std)
channel_drop  p=0.2 (one channel set to 0 = the channel mean after normalisation; no-op for C == 1)
============  ====================================================================================================

RGB-only ops (``RGB_ONLY``) assume pixel values in [0, 1] (uint8 input, or float scaled that way) and clamp to it,
as torchvision does.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

RGB_ONLY = frozenset({"color_jitter", "grayscale", "solarize"})
GEOMETRIC = ("resized_crop", "hflip", "vflip", "rot90", "rotate")
OPS = (*GEOMETRIC, "color_jitter", "grayscale", "solarize", "intensity", "gamma", "blur", "noise", "channel_drop")

# grid_sample padding. Without `rotate`, every sampling point lies inside the image box by construction (crops never
# leave the image, flips and 90-degree turns map the square onto itself), so padding only decides the outer half-pixel
# ring when a view is resampled. "zeros" would blend that ring with 0 (a fake dark frame, i.e. a feature the network
# could learn); PyTorch's "reflection" with align_corners=False reflects and then clips to the edge pixel, so the ring
# keeps the edge value. It also makes an identity affine equal to F.interpolate(bilinear), which eval_view uses.
# A turn by another angle swings the view's corners out of the box (by up to 41% of the half-width at 45 degrees for a
# full-image view): reflection fills them with the image mirrored at its edge, which continues a noisy background,
# where zeros would add constant wedges whose edges reveal the angle. The cost: a structure within ~20% of the edge can
# show up mirrored in a corner; views cropped well inside the image turn in real content instead.
PADDING_MODE = "reflection"
CROP_TRIES = 10  # batched rejection sampling for crops whose box would leave the image (as torchvision does)

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 luma, shared by grayscale, contrast and the YIQ hue rotation
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.595716, -0.274453, -0.321263), (0.211456, -0.522591, 0.311135))


# ----------------------------------------------------------------------------------------------------- validation
def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ValueError("expected a finite number")
    return float(v)


def _prob(v: Any) -> float:
    x = _number(v)
    if not 0.0 <= x <= 1.0:
        raise ValueError("expected a probability in [0, 1]")
    return x


def _pair(lo_min: float, hi_max: float, open_lo: bool = False) -> Callable[[Any], tuple[float, float]]:
    """Parser for a [lo, hi] range with lo <= hi inside (lo_min, hi_max] or [lo_min, hi_max]."""
    bound = f"{'>' if open_lo else '>='} {lo_min:g}"

    def parse(v: Any) -> tuple[float, float]:
        if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 2:
            raise ValueError(f"expected a pair [lo, hi] with lo {bound}, hi <= {hi_max:g} and lo <= hi")
        lo, hi = _number(v[0]), _number(v[1])
        if lo > hi or hi > hi_max or (lo <= lo_min if open_lo else lo < lo_min):
            raise ValueError(f"expected lo {bound}, hi <= {hi_max:g} and lo <= hi")
        return lo, hi

    return parse


def _strength(v: Any) -> tuple[float, float]:
    """torchvision's convention: a number x means a factor in [max(0, 1-x), 1+x]."""
    if isinstance(v, Sequence) and not isinstance(v, (str, bytes)):
        return _pair(0.0, math.inf)(v)
    x = _number(v)
    if x < 0:
        raise ValueError("expected a number >= 0 or a pair [lo, hi] with 0 <= lo <= hi")
    return max(0.0, 1.0 - x), 1.0 + x


def _hue(v: Any) -> tuple[float, float]:
    if isinstance(v, Sequence) and not isinstance(v, (str, bytes)):
        return _pair(-0.5, 0.5)(v)
    x = _number(v)
    if not 0.0 <= x <= 0.5:
        raise ValueError("expected a number in [0, 0.5] (turns) or a pair within [-0.5, 0.5]")
    return -x, x


def _unit(v: Any) -> float:
    x = _number(v)
    if not 0.0 <= x <= 1.0:
        raise ValueError("expected a number in [0, 1]")
    return x


def _kernel(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v % 2 == 0:
        raise ValueError("expected an odd integer >= 1, or null to derive it from sigma")
    return v


_INF = math.inf
SPECS: dict[str, dict[str, tuple[Any, Callable[[Any], Any]]]] = {
    "resized_crop": {"p": (1.0, _prob), "scale": ((0.08, 1.0), _pair(0.0, 1.0, True)),
                     "ratio": ((3 / 4, 4 / 3), _pair(0.0, _INF, True))},
    "hflip": {"p": (0.5, _prob)},
    "vflip": {"p": (0.5, _prob)},
    "rot90": {"p": (1.0, _prob)},
    "rotate": {"p": (1.0, _prob), "degrees": ((0.0, 360.0), _pair(-360.0, 360.0))},
    "color_jitter": {"p": (0.8, _prob), "brightness": (0.4, _strength), "contrast": (0.4, _strength),
                     "saturation": (0.2, _strength), "hue": (0.1, _hue)},
    "grayscale": {"p": (0.2, _prob)},
    "solarize": {"p": (0.2, _prob), "threshold": (0.5, _unit)},
    "intensity": {"p": (0.8, _prob), "scale": ((0.8, 1.2), _pair(0.0, _INF)),
                  "shift": ((0.0, 0.0), _pair(-_INF, _INF))},
    "gamma": {"p": (0.5, _prob), "gamma": ((0.7, 1.5), _pair(0.0, _INF, True))},
    "blur": {"p": (0.5, _prob), "sigma": ((0.1, 2.0), _pair(0.0, _INF, True)), "kernel_size": (None, _kernel)},
    "noise": {"p": (0.5, _prob), "std": ((0.0, 0.1), _pair(0.0, _INF))},
    "channel_drop": {"p": (0.2, _prob)},
}
assert tuple(SPECS) == OPS


def parse_ops(name: str, ops: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Validate a preset and fill defaults; raise ConfigError naming preset, op/param and the valid choices."""
    if ops is None:
        return {}
    if not isinstance(ops, Mapping):
        raise ConfigError(f"augment preset '{name}': ops must be a mapping op -> params, got {type(ops).__name__}.")
    out: dict[str, dict[str, Any]] = {}
    for op, params in ops.items():
        if op not in SPECS:
            raise ConfigError(f"augment preset '{name}': unknown op '{op}'; valid ops: {', '.join(OPS)}. "
                              f"Fix or remove augment.ops.{op}.")
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise ConfigError(f"augment preset '{name}', op '{op}': params must be a mapping (e.g. {{p: 0.5}}), "
                              f"got {params!r}. Fix augment.ops.{op}.")
        spec = SPECS[op]
        for key in params:
            if key not in spec:
                raise ConfigError(f"augment preset '{name}', op '{op}': unknown param '{key}'; valid params: "
                                  f"{', '.join(spec)}. Fix or remove augment.ops.{op}.{key}.")
        parsed: dict[str, Any] = {}
        for key, (default, parse) in spec.items():
            value = params.get(key, default)
            try:
                parsed[key] = parse(value)
            except ValueError as err:
                raise ConfigError(f"augment preset '{name}', op '{op}': {key}={value!r} is invalid ({err}). "
                                  f"Fix augment.ops.{op}.{key}.") from None
        out[op] = parsed
    return out


# ------------------------------------------------------------------------------------------------ batched kernels
class _Draws:
    """All random draws of one call. Draws happen on the generator's device (a CPU generator cannot draw on CUDA)
    and move to the data's device: the per-sample parameter tensors are tiny; only noise is image-sized, so pass a
    generator on the data's device for speed."""

    def __init__(self, generator: torch.Generator | None, device: torch.device) -> None:
        self.g = generator
        self.device = device
        self.draw_device = generator.device if generator is not None else device

    def uniform(self, n: int, k: int) -> Tensor:
        u = torch.rand((n, k), generator=self.g, device=self.draw_device, dtype=torch.float32)
        return u.to(self.device)

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        z = torch.randn(shape, generator=self.g, device=self.draw_device, dtype=dtype)
        return z.to(self.device)


@functools.lru_cache(maxsize=32)
def _colour_consts(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(luma [3], RGB->YIQ [3, 3], YIQ->RGB [3, 3]) built once per device: a fresh small host-to-device copy on
    every call would make the host wait for the GPU queue."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
    from_yiq = torch.linalg.inv(to_yiq)
    luma = torch.tensor(_LUMA, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (luma, to_yiq, from_yiq))  # type: ignore[return-value]


def _lerp(u: Tensor, lo_hi: tuple[float, float]) -> Tensor:
    return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u


def affine_theta(fw: Tensor, fh: Tensor, cx: Tensor, cy: Tensor, k: Tensor, flip_x: Tensor, flip_y: Tensor,
                 angle: Tensor | None = None) -> Tensor:
    """[N, 2, 3] affine mapping output to input normalised coords: crop box (half-sizes fw, fh, centre cx, cy, all
    in [-1, 1] units) after a turn by k*90 degrees (as torch.rot90(k, dims=(-2, -1))) plus ``angle`` radians in the
    same sense (the square view turns about its centre) after flips of the output.

    Exposed so tests (and users) can force parameters."""
    # exact cos/sin of k*90 degrees (integers, built on the device), so turns resample pixel centres
    cos = ((k == 0).to(fw.dtype) - (k == 2).to(fw.dtype))
    sin = ((k == 1).to(fw.dtype) - (k == 3).to(fw.dtype))
    if angle is not None:  # compose with the free angle; without one the exact matrices above stay untouched
        ca, sa = torch.cos(angle).to(fw.dtype), torch.sin(angle).to(fw.dtype)
        cos, sin = cos * ca - sin * sa, sin * ca + cos * sa
    sx = 1.0 - 2.0 * flip_x.to(fw.dtype)
    sy = 1.0 - 2.0 * flip_y.to(fw.dtype)
    row0 = torch.stack([fw * cos * sx, -fw * sin * sy, cx], dim=-1)
    row1 = torch.stack([fh * sin * sx, fh * cos * sy, cy], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def warp(x: Tensor, theta: Tensor, size: int) -> Tensor:
    """One resampling for the whole stack: [N, C, H, W] -> [N, C, size, size]."""
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=PADDING_MODE, align_corners=False)


def _sample_crop(u: Tensor, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Crop half-sizes and centres in normalised units from uniforms u [N, 2*CROP_TRIES + 2].

    Sub-pixel boxes (no rounding to whole pixels): the resampling is bilinear anyway."""
    t = CROP_TRIES
    area = _lerp(u[:, :t], scale)
    log_r = _lerp(u[:, t:2 * t], (math.log(ratio[0]), math.log(ratio[1])))
    r = torch.exp(log_r)
    fw = torch.sqrt(area * r * (h / w))  # crop width / image width
    fh = torch.sqrt(area / r * (w / h))
    ok = (fw <= 1.0) & (fh <= 1.0)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first valid try; 0 when none is valid
    fw = fw.gather(1, first).squeeze(1).clamp(max=1.0)  # fallback: clip the box to the image
    fh = fh.gather(1, first).squeeze(1).clamp(max=1.0)
    cx = (1.0 - fw) * (2.0 * u[:, 2 * t] - 1.0)
    cy = (1.0 - fh) * (2.0 * u[:, 2 * t + 1] - 1.0)
    return fw, fh, cx, cy


def _gray(y: Tensor) -> Tensor:
    luma = _colour_consts(y.dtype, y.device)[0]
    return (y * luma.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def _sat_hue_matrix(sat: Tensor, hue: Tensor) -> Tensor:
    """[N, 3, 3] colour matrix: saturation blend towards luma, then hue as a rotation of the YIQ chroma plane.

    Why YIQ: it keeps the whole of saturation+hue one linear map per sample (a single bmm) and leaves luma
    unchanged; HSV would need branchy per-pixel code for a look-alike result."""
    n = sat.shape[0]
    dt, dev = sat.dtype, sat.device
    luma, to_yiq, from_yiq = _colour_consts(dt, dev)
    eye = torch.eye(3, dtype=dt, device=dev)
    s = sat.view(n, 1, 1)
    m_sat = s * eye + (1.0 - s) * luma.view(1, 1, 3).expand(n, 3, 3)
    angle = 2.0 * math.pi * hue
    c, si = torch.cos(angle), torch.sin(angle)
    rot = eye.repeat(n, 1, 1)
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -si, si, c
    return from_yiq @ rot @ to_yiq @ m_sat


def gaussian_blur(y: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with one sigma per sample [N] (sigma <= 0 means identity), as two grouped
    convolutions over all N*C planes at once (groups = N*C), so one kernel launch per direction."""
    n, c, h, w = y.shape
    half = kernel_size // 2
    pos = torch.arange(kernel_size, device=y.device, dtype=torch.float32) - half
    s = sigma.to(torch.float32).clamp(min=1e-6).view(n, 1)
    kern = torch.exp(-0.5 * (pos / s) ** 2)
    kern = kern / kern.sum(dim=1, keepdim=True)
    delta = (pos == 0).to(kern.dtype).expand_as(kern)
    kern = torch.where((sigma > 0).view(n, 1), kern, delta)
    kern = kern.repeat_interleave(c, dim=0).to(y.dtype)  # [N*C, K]
    # reflect (as torchvision) where it is defined; replicate for kernels wider than the image
    mode = "reflect" if half < min(h, w) else "replicate"
    z = y.reshape(1, n * c, h, w)
    z = F.conv2d(F.pad(z, (half, half, 0, 0), mode=mode), kern.view(n * c, 1, 1, kernel_size), groups=n * c)
    z = F.conv2d(F.pad(z, (0, 0, half, half), mode=mode), kern.view(n * c, 1, kernel_size, 1), groups=n * c)
    return z.view(n, c, h, w)


# ------------------------------------------------------------------------------------------------------ the module
class Augment(nn.Module):
    """Makes ``n_views`` independently augmented, normalised views of a raw batch, on the batch's device."""

    def __init__(self, name: str, ops: Mapping[str, Any] | None, n_views: int = 2, size: int | None = None) -> None:
        super().__init__()
        self.name = name
        if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
            raise ConfigError(f"augment preset '{name}': n_views={n_views!r}; expected an integer >= 1.")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"augment preset '{name}': size={size!r}; expected an integer >= 1 or null "
                              "(null keeps the input size).")
        self.n_views = n_views
        self.size = size
        self.ops = parse_ops(name, ops)
        self.active = {op: prm for op, prm in self.ops.items() if prm["p"] > 0}
        # empty = not set yet: normalisation is the identity for any C until set_stats gives per-channel values
        # (kept in the state dict, so a checkpoint records whether and which stats were used)
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.ones(0))

    @property
    def rgb_only_ops(self) -> list[str]:
        """Active ops that need C == 3 (for the config validator)."""
        return [op for op in OPS if op in self.active and op in RGB_ONLY]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n_views={self.n_views}, size={self.size}, ops={list(self.active)}"

    # -------------------------------------------------------------------------------------------- normalisation
    def set_stats(self, mean: Tensor | Sequence[float], std: Tensor | Sequence[float]) -> None:
        """Per-channel stats in the units of x as float (uint8 data: stats of x/255). Buffers are resized to C."""
        mean_t = torch.as_tensor(mean, dtype=torch.float32).detach().flatten().clone()
        std_t = torch.as_tensor(std, dtype=torch.float32).detach().flatten().clone()
        if mean_t.numel() != std_t.numel() or mean_t.numel() == 0:
            raise DataError(f"augment preset '{self.name}': set_stats got {mean_t.numel()} means and "
                            f"{std_t.numel()} stds; pass one of each per channel.")
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all()) or (std_t < 0).any():
            raise DataError(f"augment preset '{self.name}': normalisation stats must be finite with std >= 0, got "
                            f"mean={mean_t.tolist()}, std={std_t.tolist()}; check the dataset for NaN/Inf pixels "
                            "(dataset.nan_policy).")
        dead = (std_t == 0).nonzero().flatten().tolist()
        if dead:
            # a constant channel (e.g. an unused detector layer) normalises to 0 whatever the divisor
            log.warning("augment preset '%s': channels %s have std 0 (constant); dividing them by 1 instead",
                        self.name, dead)
            std_t[std_t == 0] = 1.0
        self.mean = mean_t.to(self.mean.device)
        self.std = std_t.to(self.std.device)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # the checkpoint holds stats for C channels while a freshly built module holds the empty default
        for key in ("mean", "std"):
            saved = state_dict.get(prefix + key)
            if isinstance(saved, Tensor) and saved.shape != getattr(self, key).shape:
                setattr(self, key, torch.empty(saved.shape, dtype=saved.dtype, device=getattr(self, key).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _std(self, y: Tensor) -> Tensor:
        """[1, C or 1] std in y's dtype (1 until set)."""
        return self.std.to(y.device, y.dtype).view(1, -1) if self.std.numel() else y.new_ones(1, 1)

    def _normalise(self, y: Tensor) -> Tensor:
        if not self.mean.numel():
            return y
        mean = self.mean.to(y.device, y.dtype).view(1, -1, 1, 1)
        return (y - mean) / self._std(y).view(1, -1, 1, 1)

    # ---------------------------------------------------------------------------------------------- input checks
    def _prepare(self, x: Tensor, out_size: int | None) -> tuple[Tensor, torch.dtype, int]:
        """-> (x, output dtype, output side). Computation runs in float32 (float64 if given) for bf16 safety."""
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise DataError(f"augment preset '{self.name}': expected a batch [B, C, H, W], got {shape}.")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise DataError(f"augment preset '{self.name}': batch dtype {x.dtype} is not supported; yield uint8 "
                            "(scaled by 1/255) or float (kept in raw units).")
        c = x.shape[1]
        if self.mean.numel() not in (0, c):
            raise DataError(f"augment preset '{self.name}': batch has {c} channels but the normalisation stats have "
                            f"{self.mean.numel()}; call set_stats with this dataset's per-channel stats.")
        if out_size is not None and (isinstance(out_size, bool) or not isinstance(out_size, int) or out_size < 1):
            raise ConfigError(f"augment preset '{self.name}': out_size={out_size!r}; expected an integer >= 1.")
        # a square side is needed so that 90-degree turns keep the shape; non-square input uses its short side
        side = out_size or self.size or min(x.shape[-2:])
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        return x, out_dtype, side

    @staticmethod
    def _to_float(x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            return x.to(torch.float32) / 255.0
        return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)

    # --------------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, generator: torch.Generator | None = None, out_size: int | None = None,
                n_views: int | None = None, crop_scale: Sequence[float] | None = None) -> list[Tensor]:
        """Raw batch [B, C, H, W] -> list of n_views normalised views [B, C, S, S] (S = out_size or size or input).

        ``n_views`` and ``crop_scale`` override the preset for this call only: a method that needs one view (MAE,
        pretext tasks) or extra small crops (DINO's multi-crop) reuses the preset and its normalisation stats."""
        x, out_dtype, side = self._prepare(x, out_size)
        b, c, h, w = x.shape
        if n_views is not None and (isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1):
            raise ConfigError(f"augment preset '{self.name}': n_views={n_views!r}; expected an integer >= 1.")
        ops = self.active
        if crop_scale is not None:
            if "resized_crop" not in ops:
                raise ConfigError(f"augment preset '{self.name}' has no resized_crop op, so a crop scale of "
                                  f"{list(crop_scale)} cannot be applied; add augment.ops.resized_crop.")
            try:
                scale = _pair(0.0, 1.0, True)(crop_scale)
            except ValueError as err:
                raise ConfigError(f"augment preset '{self.name}': crop scale {crop_scale!r} is invalid "
                                  f"({err}).") from None
            ops = {**ops, "resized_crop": {**ops["resized_crop"], "scale": scale}}
        rgb = self.rgb_only_ops
        if c != 3 and rgb:
            raise ConfigError(f"augment preset '{self.name}': op(s) {', '.join(rgb)} need 3-channel RGB images but "
                              f"the batch has {c} channels; use a channel-agnostic preset (e.g. augment=physics) or "
                              "remove these ops.")
        v = self.n_views if n_views is None else n_views
        draws = _Draws(generator, x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = x.unsqueeze(0).expand(v, b, c, h, w).reshape(v * b, c, h, w)  # views stacked along the batch
            y = self._geometry(self._to_float(y), side, draws, ops)
            if c == 3:
                y = self._colour(y, draws)
            y = self._intensity(y, draws)
            y = self._gamma(y, draws)
            y = self._blur(y, draws)
            y = self._normalise(y)
            y = self._noise(y, draws)
            y = self._channel_drop(y, draws)
        return list(y.to(out_dtype).view(v, b, c, side, side).unbind(0))

    def eval_view(self, x: Tensor) -> Tensor:
        """Deterministic view for evaluation: to float, resize to size (bilinear, the same resampling as a training
        view without crop), normalise."""
        x, out_dtype, side = self._prepare(x, None)
        y = self._to_float(x)
        if tuple(y.shape[-2:]) != (side, side):
            y = F.interpolate(y, size=(side, side), mode="bilinear", align_corners=False)
        return self._normalise(y).to(out_dtype)

    # ------------------------------------------------------------------------------------------------ op stages
    def _geometry(self, y: Tensor, side: int, draws: _Draws, ops: Mapping[str, dict[str, Any]]) -> Tensor:
        n, _, h, w = y.shape
        if not any(op in ops for op in GEOMETRIC):
            if (h, w) == (side, side):
                return y
            return F.interpolate(y, size=(side, side), mode="bilinear", align_corners=False)
        ones = torch.ones(n, device=y.device)
        fw, fh, cx, cy = ones, ones, ones * 0, ones * 0
        k = torch.zeros(n, dtype=torch.long, device=y.device)
        flip_x = flip_y = torch.zeros(n, dtype=torch.bool, device=y.device)
        if "resized_crop" in ops:
            prm = ops["resized_crop"]
            u = draws.uniform(n, 2 * CROP_TRIES + 3)
            cfw, cfh, ccx, ccy = _sample_crop(u[:, 1:], h, w, prm["scale"], prm["ratio"])
            on = u[:, 0] < prm["p"]
            fw, fh = torch.where(on, cfw, fw), torch.where(on, cfh, fh)
            cx, cy = torch.where(on, ccx, cx), torch.where(on, ccy, cy)
        if "hflip" in ops:
            flip_x = draws.uniform(n, 1)[:, 0] < ops["hflip"]["p"]
        if "vflip" in ops:
            flip_y = draws.uniform(n, 1)[:, 0] < ops["vflip"]["p"]
        if "rot90" in ops:
            u = draws.uniform(n, 2)
            k = torch.where(u[:, 0] < ops["rot90"]["p"], (u[:, 1] * 4).long().clamp(max=3), k)
        angle = None
        if "rotate" in ops:
            prm = ops["rotate"]
            u = draws.uniform(n, 2)
            degrees = torch.where(u[:, 0] < prm["p"], _lerp(u[:, 1], prm["degrees"]), torch.zeros_like(u[:, 1]))
            angle = torch.deg2rad(degrees)
        return warp(y, affine_theta(fw, fh, cx, cy, k, flip_x, flip_y, angle), side)

    def _colour(self, y: Tensor, draws: _Draws) -> Tensor:
        n = y.shape[0]
        ops = self.active
        if "color_jitter" in ops:
            prm = ops["color_jitter"]
            u = draws.uniform(n, 5).to(y.dtype)
            on = u[:, 0] < prm["p"]
            one = torch.ones_like(u[:, 0])
            bright = torch.where(on, _lerp(u[:, 1], prm["brightness"]), one).view(n, 1, 1, 1)
            contrast = torch.where(on, _lerp(u[:, 2], prm["contrast"]), one).view(n, 1, 1, 1)
            sat = torch.where(on, _lerp(u[:, 3], prm["saturation"]), one)
            hue = torch.where(on, _lerp(u[:, 4], prm["hue"]), one * 0)
            z = (y * bright).clamp(0.0, 1.0)
            z = (contrast * z + (1.0 - contrast) * _gray(z).mean(dim=(-2, -1), keepdim=True)).clamp(0.0, 1.0)
            z = torch.bmm(_sat_hue_matrix(sat, hue), z.flatten(2)).view_as(z).clamp(0.0, 1.0)
            y = torch.where(on.view(n, 1, 1, 1), z, y)  # skipped samples stay bit-exact
        if "grayscale" in ops:
            on = draws.uniform(n, 1)[:, 0] < ops["grayscale"]["p"]
            y = torch.where(on.view(n, 1, 1, 1), _gray(y).expand_as(y), y)
        if "solarize" in ops:
            prm = ops["solarize"]
            on = draws.uniform(n, 1)[:, 0] < prm["p"]
            y = torch.where(on.view(n, 1, 1, 1) & (y >= prm["threshold"]), 1.0 - y, y)
        return y

    def _intensity(self, y: Tensor, draws: _Draws) -> Tensor:
        if "intensity" not in self.active:
            return y
        prm = self.active["intensity"]
        n, c = y.shape[:2]
        u = draws.uniform(n, 1 + 2 * c).to(y.dtype)
        on = (u[:, :1] < prm["p"]).to(y.dtype)  # [N, 1]
        scale = 1.0 + on * (_lerp(u[:, 1:1 + c], prm["scale"]) - 1.0)
        shift = on * _lerp(u[:, 1 + c:], prm["shift"]) * self._std(y)
        return y * scale.view(n, c, 1, 1) + shift.view(n, c, 1, 1)

    def _gamma(self, y: Tensor, draws: _Draws) -> Tensor:
        """Gamma on each channel's own [min, max] (MRI intensities have no fixed scale), so it works in any units."""
        if "gamma" not in self.active:
            return y
        prm = self.active["gamma"]
        n, c = y.shape[:2]
        u = draws.uniform(n, 1 + c).to(y.dtype)
        on = u[:, :1] < prm["p"]
        gamma = torch.where(on, _lerp(u[:, 1:], prm["gamma"]), torch.ones_like(u[:, 1:])).view(n, c, 1, 1)
        lo = y.amin(dim=(-2, -1), keepdim=True)
        span = y.amax(dim=(-2, -1), keepdim=True) - lo
        flat = span <= 1e-12
        z = lo + span * ((y - lo) / torch.where(flat, torch.ones_like(span), span)).clamp(0.0, 1.0).pow(gamma)
        return torch.where(flat | (gamma == 1.0), y, z)  # skipped samples and flat channels stay bit-exact

    def _blur(self, y: Tensor, draws: _Draws) -> Tensor:
        if "blur" not in self.active:
            return y
        prm = self.active["blur"]
        u = draws.uniform(y.shape[0], 2)
        sigma = torch.where(u[:, 0] < prm["p"], _lerp(u[:, 1], prm["sigma"]), torch.zeros_like(u[:, 1]))
        size = prm["kernel_size"] or 2 * math.ceil(3.0 * prm["sigma"][1]) + 1  # fixed per preset: static shapes
        return gaussian_blur(y, sigma, size)

    def _noise(self, y: Tensor, draws: _Draws) -> Tensor:
        if "noise" not in self.active:
            return y
        prm = self.active["noise"]
        n = y.shape[0]
        u = draws.uniform(n, 2).to(y.dtype)
        std = torch.where(u[:, 0] < prm["p"], _lerp(u[:, 1], prm["std"]), torch.zeros_like(u[:, 1]))
        return y + std.view(n, 1, 1, 1) * draws.normal(tuple(y.shape), y.dtype)

    def _channel_drop(self, y: Tensor, draws: _Draws) -> Tensor:
        n, c = y.shape[:2]
        if "channel_drop" not in self.active or c == 1:
            return y
        u = draws.uniform(n, 2)
        on = u[:, 0] < self.active["channel_drop"]["p"]
        idx = (u[:, 1] * c).long().clamp(max=c - 1)
        drop = F.one_hot(idx, c).to(torch.bool) & on.view(n, 1)
        return y.masked_fill(drop.view(n, c, 1, 1), 0.0)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """Augmentation randomness as a pure function of (seed, step, rank), so a resumed run sees the same views."""
    gen = torch.Generator(device=device)
    gen.manual_seed((int(seed) * 1_000_003 + int(step)) * 64 + int(rank))
    return gen
