"""Intensity pre-processing and in-plane resampling of slices.

Pipeline (each step optional, the configuration is stored in the model file):

1. :func:`preprocess_volume` — volume-level robust intensity normalisation: the
   ``[lower_percentile, upper_percentile]`` percentiles of the finite voxels are mapped to
   ``[0, 1]`` and the result is **clipped** to ``[0, 1]`` (so outliers such as fat or flow
   artefacts cannot stretch the range seen by the network).  When more than half the voxels
   are exactly 0 (zero-padding / masked background) the percentiles are taken over the
   non-zero voxels only.  NaN and ±inf voxels become 0.
2. :func:`preprocess_slice` — per-slice filters on an already-normalised slice, applied in
   the order NL-means → bilateral → Gaussian → CLAHE (denoise first so CLAHE does not amplify
   noise).  Filter sizes are given in millimetres and converted with the slice's pixel spacing.
3. :func:`resample_slices` / :func:`resample_back` — in-plane resampling of a slice stack to
   the model's pixel spacing and exactly back to the original grid.

Spacings of a slice are ``(row, column)`` in millimetres, i.e. the spacings of the last two
array axes.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError

__all__ = [
    "PreprocessConfig",
    "check_spacing",
    "config_from_dict",
    "config_to_dict",
    "inplane_target_shape",
    "normalise_intensity",
    "preprocess_slice",
    "preprocess_volume",
    "resample_back",
    "resample_slices",
]


# ------------------------------------------------------------------------------------------
# Dataclass <-> JSON dict helpers (shared with augment.py and postprocess.py)
# ------------------------------------------------------------------------------------------
def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a JSON value to ``annotation`` (bool, int, float, str, X | None, tuple[...])."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None:
            if type(None) in args:
                return None
            raise InputError(f"{where}: must not be null")
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for arg in non_none:
            try:
                return _coerce(value, arg, where)
            except InputError as exc:
                errors.append(str(exc))
        raise InputError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise InputError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if annotation is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise InputError(f"{where}: expected true/false, got {value!r}")
        return bool(value)
    if annotation is int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise InputError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise InputError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def config_to_dict(obj: Any) -> dict[str, Any]:
    """Plain JSON-able dict of a flat configuration dataclass (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(cls: type, data: Any) -> Any:
    """Build flat configuration dataclass ``cls`` from ``data``; unknown keys raise InputError."""
    if not isinstance(data, dict):
        raise InputError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{cls.__name__}: unknown key(s) {', '.join(map(repr, unknown))}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{cls.__name__}.{k}") for k, v in data.items()}
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------
@dataclass
class PreprocessConfig:
    """Pre-processing of images before they reach a network (stored in the model file).

    Millimetre sizes are converted to pixels with each slice's spacing.  ``pixel_spacing_mm``
    is the model's isotropic in-plane pixel spacing (``None`` keeps the native spacing).
    """

    normalise: bool = True
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    clahe: bool = False
    clahe_clip_limit: float = 0.01
    clahe_kernel_mm: float | None = None
    denoise_nlmeans: bool = False
    nlmeans_h: float = 0.05
    bilateral: bool = False
    bilateral_sigma_color: float = 0.05
    bilateral_sigma_spatial_mm: float = 2.0
    gaussian_sigma_mm: float = 0.0
    pixel_spacing_mm: float | None = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise InputError(
                f"PreprocessConfig: need 0 <= lower_percentile < upper_percentile <= 100, got "
                f"{self.lower_percentile}, {self.upper_percentile}"
            )
        if not 0.0 < self.clahe_clip_limit <= 1.0:
            raise InputError(f"PreprocessConfig: clahe_clip_limit must be in (0, 1], got {self.clahe_clip_limit}")
        for name in ("clahe_kernel_mm", "pixel_spacing_mm"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise InputError(f"PreprocessConfig: {name} must be positive or null, got {value}")
        for name in ("nlmeans_h", "bilateral_sigma_color", "bilateral_sigma_spatial_mm"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise InputError(f"PreprocessConfig: {name} must be positive, got {value}")
        if not (np.isfinite(self.gaussian_sigma_mm) and self.gaussian_sigma_mm >= 0):
            raise InputError(f"PreprocessConfig: gaussian_sigma_mm must be >= 0, got {self.gaussian_sigma_mm}")
        # Model files carry these: absurd millimetre sizes would make absurd kernels (found by fuzzing).
        for name, low, high in (
            ("pixel_spacing_mm", 1e-3, 1e3),
            ("clahe_kernel_mm", 0.0, 1e3),
            ("gaussian_sigma_mm", 0.0, 100.0),
            ("bilateral_sigma_spatial_mm", 0.0, 100.0),
        ):
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise InputError(f"PreprocessConfig: {name} must be in {low:g}..{high:g} mm, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys raise InputError."""
        return config_from_dict(cls, data)


# ------------------------------------------------------------------------------------------
# Volume-level steps
# ------------------------------------------------------------------------------------------
MAX_PERCENTILE_SAMPLES = 4_000_000


def robust_range(
    array: np.ndarray, lower_percentile: float = 0.5, upper_percentile: float = 99.5
) -> tuple[float, float]:
    """The ``[lower, upper]`` percentiles of the finite voxels (zero background ignored when >50 %).

    Large arrays are sampled on a regular stride (at most ``MAX_PERCENTILE_SAMPLES`` values), so a
    512³ study costs no full-size copy.  Raises :class:`InputError` if no voxel is finite.
    """
    array = np.asarray(array)
    if array.size == 0:
        raise InputError("cannot normalise an empty array")
    if not 0.0 <= lower_percentile < upper_percentile <= 100.0:
        raise InputError(f"need 0 <= lower < upper <= 100 percentiles, got {lower_percentile}, {upper_percentile}")
    if array.size > MAX_PERCENTILE_SAMPLES and array.ndim > 1:
        # A regular grid of voxels, taken through the (possibly transposed, flipped) view: flattening
        # a non-contiguous view first would copy the whole study.
        step = max(1, math.ceil((array.size / MAX_PERCENTILE_SAMPLES) ** (1.0 / array.ndim)))
        values = array[(slice(None, None, step),) * array.ndim].astype(np.float32).reshape(-1)
    else:
        flat = array.reshape(-1)
        values = flat[:: max(1, flat.size // MAX_PERCENTILE_SAMPLES)].astype(np.float32)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise InputError("cannot normalise: the image has no finite values (all NaN/inf)")
    nonzero = values[values != 0]
    if 0 < nonzero.size < 0.5 * values.size:
        values = nonzero
    low, high = np.percentile(values, [lower_percentile, upper_percentile])
    if not high > low:  # (near-)constant over the sample: fall back to the full finite range
        low, high = float(values.min()), float(values.max())
    return float(low), float(high)


def normalise_intensity(
    array: np.ndarray,
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Map the robust percentile range of ``array`` (see :func:`robust_range`) to ``[0, 1]``, clipped.

    Non-finite voxels become 0; a constant array gives zeros.  Works in slabs along axis 0, so
    the only full-size allocation is the output (``dtype``: float32, or float16 to halve memory).
    """
    array = np.asarray(array)
    low, high = robust_range(array, lower_percentile, upper_percentile)
    out = np.zeros(array.shape, dtype=dtype)
    if not high > low:
        return out
    width = np.float32(high - low)
    rows = max(1, (1 << 22) // max(1, int(np.prod(array.shape[1:]))))
    for start in range(0, array.shape[0] if array.ndim else 1, rows):
        part = array[start : start + rows].astype(np.float32)
        invalid = ~np.isfinite(part)
        part -= np.float32(low)
        part /= width
        np.clip(part, 0.0, 1.0, out=part)
        part[invalid] = 0.0
        out[start : start + rows] = part
    return out


def check_spacing(spacing: Any, ndim: int, what: str) -> tuple[float, ...]:
    """``spacing`` as ``ndim`` positive finite floats, else an InputError naming ``what``."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise InputError(f"{what}: spacing must be {ndim} numbers, got {spacing!r}") from None
    if len(values) != ndim or not all(np.isfinite(values)) or min(values) <= 0:
        raise InputError(f"{what}: spacing must be {ndim} positive numbers, got {spacing!r}")
    return values


def preprocess_volume(
    array: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    config: PreprocessConfig,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Volume-level pre-processing of a ``(z, y, x)`` image: normalisation; returns float32.

    Without normalisation the image is only converted to float32 with non-finite voxels set
    to 0.  The slice-wise filters are in :func:`preprocess_slice` (they depend on the plane).
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise InputError(f"preprocess_volume expects a 3-D (z, y, x) array, got shape {array.shape}")
    check_spacing(spacing_zyx, 3, "preprocess_volume")
    if config.normalise:
        return normalise_intensity(array, config.lower_percentile, config.upper_percentile, dtype)
    out = array.astype(dtype, copy=True)
    out[~np.isfinite(out)] = 0.0
    return out


# ------------------------------------------------------------------------------------------
# Slice-level steps
# ------------------------------------------------------------------------------------------
def _odd(n: float, low: int, high: int) -> int:
    n = int(np.clip(round(n), low, high))
    return n if n % 2 else n + 1


def preprocess_slice(slice2d: np.ndarray, pixel_spacing: tuple[float, float], config: PreprocessConfig) -> np.ndarray:
    """Per-slice filters (NL-means → bilateral → Gaussian → CLAHE) of a normalised 2-D slice.

    ``pixel_spacing`` is ``(row, column)`` in mm.  Intensity parameters (``nlmeans_h``,
    ``bilateral_sigma_color``) are relative to the ``[0, 1]`` normalised range (to the slice's
    value range when ``config.normalise`` is off).  Returns float32; a slice with no enabled
    filter is returned as a float32 copy.
    """
    from scipy import ndimage
    from skimage import exposure, restoration

    image = np.asarray(slice2d)
    if image.ndim != 2:
        raise InputError(f"preprocess_slice expects a 2-D slice, got shape {image.shape}")
    spacing = np.asarray(check_spacing(pixel_spacing, 2, "preprocess_slice"))
    out = image.astype(np.float32, copy=True)
    out[~np.isfinite(out)] = 0.0
    lo, hi = float(out.min()), float(out.max())
    if hi <= lo:  # constant slice: nothing to filter
        return out
    value_range = 1.0 if config.normalise else hi - lo
    mean_spacing = float(spacing.mean())

    if config.denoise_nlmeans:
        # ~5 mm patches searched within ~6 mm, clamped to keep the cost bounded.
        patch_size = _odd(5.0 / mean_spacing, 3, 7)
        patch_distance = int(np.clip(round(6.0 / mean_spacing), 2, 7))
        out = restoration.denoise_nl_means(
            out,
            patch_size=patch_size,
            patch_distance=patch_distance,
            h=config.nlmeans_h * value_range,
            fast_mode=True,
            preserve_range=True,
        ).astype(np.float32)

    if config.bilateral:
        sigma_spatial = config.bilateral_sigma_spatial_mm / mean_spacing
        shift = min(0.0, float(out.min()))  # denoise_bilateral wants non-negative input
        out = restoration.denoise_bilateral(
            (out - shift).astype(np.float64),
            sigma_color=config.bilateral_sigma_color * value_range,
            sigma_spatial=sigma_spatial,
            win_size=_odd(4 * sigma_spatial + 1, 3, 31),
            mode="reflect",
        ).astype(np.float32) + np.float32(shift)

    if config.gaussian_sigma_mm > 0:
        out = ndimage.gaussian_filter(out, sigma=tuple(config.gaussian_sigma_mm / spacing), mode="nearest")

    if config.clahe:
        kernel = None
        if config.clahe_kernel_mm is not None:
            kernel = tuple(max(2, round(config.clahe_kernel_mm / s)) for s in spacing)
        lo, hi = float(out.min()), float(out.max())
        if hi > lo:
            scaled = np.clip((out - lo) / (hi - lo), 0.0, 1.0) if not config.normalise else np.clip(out, 0.0, 1.0)
            equalised = exposure.equalize_adapthist(scaled, kernel_size=kernel, clip_limit=config.clahe_clip_limit)
            out = equalised.astype(np.float32)
            if not config.normalise:
                out = out * np.float32(hi - lo) + np.float32(lo)
    return out.astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------
# In-plane resampling
# ------------------------------------------------------------------------------------------
MAX_RESAMPLED_PIXELS = 8192 * 8192  # one resampled slice (bounds memory whatever the model's pixel spacing)


def inplane_target_shape(
    hw: tuple[int, int], from_spacing: tuple[float, float], to_spacing: tuple[float, float]
) -> tuple[int, int]:
    """Shape ``(round(H * from_r / to_r), round(W * from_c / to_c))`` (at least 1 pixel each)."""
    fr, fc = check_spacing(from_spacing, 2, "inplane_target_shape")
    tr, tc = check_spacing(to_spacing, 2, "inplane_target_shape")
    h, w = (int(v) for v in hw)
    if h < 1 or w < 1:
        raise InputError(f"inplane_target_shape: empty slice shape {hw}")
    rows, columns = h * fr / tr, w * fc / tc
    if not rows * columns <= MAX_RESAMPLED_PIXELS:  # also catches inf / nan
        raise InputError(
            f"resampling {h} x {w} pixels of {fr:g} x {fc:g} mm to {tr:g} x {tc:g} mm pixels would give "
            f"{rows:.3g} x {columns:.3g} pixels per slice (at most {MAX_RESAMPLED_PIXELS} allowed)"
        )
    return max(1, round(rows)), max(1, round(columns))


def _nearest_exact_index(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of nearest-exact (pixel-centre) resampling, as torch's ``nearest-exact``."""
    scale = n_in / n_out
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * scale).astype(np.intp), n_in - 1)


def _resize_stack(stack: np.ndarray, out_hw: tuple[int, int], order: int) -> np.ndarray:
    stack = np.asarray(stack)
    if stack.ndim not in (3, 4):
        raise InputError(f"expected a slice stack [N, H, W] or [N, C, H, W], got shape {stack.shape}")
    if order not in (0, 1):
        raise InputError(f"resampling order must be 0 (labels) or 1 (images/probabilities), got {order}")
    h, w = stack.shape[-2:]
    oh, ow = (int(v) for v in out_hw)
    if min(h, w, oh, ow) < 1:
        raise InputError(f"cannot resample between slice shapes {(h, w)} and {(oh, ow)}")
    if order == 0:
        if (oh, ow) == (h, w):
            return stack.copy()
        rows = _nearest_exact_index(h, oh)
        cols = _nearest_exact_index(w, ow)
        return np.ascontiguousarray(stack[..., rows[:, None], cols[None, :]])

    import torch
    import torch.nn.functional as F

    data = np.ascontiguousarray(stack, dtype=np.float32)
    if (oh, ow) == (h, w):
        return data.copy() if data is stack else data
    shape = data.shape
    tensor = torch.from_numpy(data.reshape(-1, 1, h, w) if data.ndim == 3 else data)
    with torch.no_grad():
        # antialias only acts when shrinking (avoids aliasing when going to a coarser grid).
        result = F.interpolate(tensor, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)
    result = result.numpy()
    return result.reshape(*shape[:-2], oh, ow)


def resample_slices(
    stack: np.ndarray, from_spacing: tuple[float, float], to_spacing: tuple[float, float], order: int
) -> np.ndarray:
    """Resample a stack ``[N, H, W]`` or ``[N, C, H, W]`` in-plane from one pixel spacing to another.

    ``order=0`` (labels): nearest-exact (pixel centres), dtype kept — up-sampling by an integer
    factor and back reproduces labels exactly.  ``order=1`` (images, probabilities): bilinear
    with pixel-area alignment (``align_corners=False``, anti-aliased when shrinking); float32.
    The output shape is :func:`inplane_target_shape`.
    """
    stack = np.asarray(stack)
    if stack.ndim not in (3, 4):
        raise InputError(f"expected a slice stack [N, H, W] or [N, C, H, W], got shape {stack.shape}")
    target = inplane_target_shape(stack.shape[-2:], from_spacing, to_spacing)
    return _resize_stack(stack, target, order)


def resample_back(stack: np.ndarray, original_hw: tuple[int, int], order: int) -> np.ndarray:
    """Resample a stack back to the original slice shape ``original_hw`` (inverse of :func:`resample_slices`)."""
    return _resize_stack(stack, tuple(original_hw), order)
