"""2-D training augmentations applied identically to an image slice and its labels.

Geometric transforms (flips, one combined rotation + scale affine, elastic deformation) move
image and labels with the same sampling coordinates: the image with linear interpolation
(outside filled with 0), the labels with nearest neighbour — so no new label values appear —
and outside-of-image pixels filled with :data:`IGNORE` (255), which the loss ignores.
Intensity transforms (inversion, bias field, gamma, contrast, brightness, noise) touch only
the image.  Values are not clipped afterwards.

All randomness comes from the caller's ``numpy.random.Generator``: the same seed gives the
same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .errors import InputError
from .preprocess import config_from_dict, config_to_dict
from .schema import IGNORE

__all__ = ["IGNORE", "AugmentConfig", "augment_pair", "mirror_left_right"]

"""Label value of pixels without ground truth (here: pixels moved in from outside the slice)."""


@dataclass
class AugmentConfig:
    """Augmentation settings.  Probabilities are per sample.

    * ``flip_prob``: horizontal and vertical flips, each with this probability.
    * ``lr_flip_prob``: a mirror across the patient's left-right axis (lumbar anatomy is nearly
      symmetric; superior/inferior and anterior/posterior stay put).  Applied by the slice dataset,
      which knows the plane: columns of axial/coronal slices, slice order of sagittal ones.
    * ``rotate_prob``: probability of the affine (rotation in ±``rotate_deg`` and isotropic
      scale drawn log-uniformly from ``scale_range``; > 1 zooms in).
    * ``elastic_prob``: Simard-style elastic deformation (``alpha``/``sigma`` in pixels).
    * ``brightness`` / ``contrast``: always applied, additive offset in ±brightness and
      contrast factor in 1 ± contrast around the mean (0 disables).
    * ``gamma_prob``: gamma drawn log-uniformly from ``gamma_range`` (on the image's own range).
    * ``noise_prob``: additive Gaussian noise with standard deviation up to ``noise_std``.
    * ``invert_prob``: intensity inversion within each channel's range (T1 <-> T2-like swap).
    * ``bias_field``: always applied smooth multiplicative field ``exp(b·f)``, ``|f| <= 1``,
      ``b`` uniform in [0, bias_field] (0 disables).
    """

    flip_prob: float = 0.5
    rotate_deg: float = 15.0
    rotate_prob: float = 0.5
    scale_range: tuple[float, float] = (0.85, 1.15)
    elastic_prob: float = 0.2
    elastic_alpha_px: float = 30.0
    elastic_sigma_px: float = 5.0
    brightness: float = 0.1
    contrast: float = 0.2
    gamma_range: tuple[float, float] = (0.7, 1.5)
    gamma_prob: float = 0.5
    noise_std: float = 0.03
    noise_prob: float = 0.3
    invert_prob: float = 0.0
    bias_field: float = 0.2
    lr_flip_prob: float = 0.0

    def __post_init__(self) -> None:
        self.scale_range = tuple(float(v) for v in self.scale_range)  # type: ignore[assignment]
        self.gamma_range = tuple(float(v) for v in self.gamma_range)  # type: ignore[assignment]
        for name in (
            "flip_prob",
            "rotate_prob",
            "elastic_prob",
            "gamma_prob",
            "noise_prob",
            "invert_prob",
            "lr_flip_prob",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"AugmentConfig: {name} must be in [0, 1], got {value}")
        for name in (
            "rotate_deg",
            "elastic_alpha_px",
            "brightness",
            "contrast",
            "noise_std",
            "bias_field",
        ):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise InputError(f"AugmentConfig: {name} must be >= 0, got {value}")
        if not (np.isfinite(self.elastic_sigma_px) and self.elastic_sigma_px > 0):
            raise InputError(f"AugmentConfig: elastic_sigma_px must be > 0, got {self.elastic_sigma_px}")
        if self.contrast >= 1:
            raise InputError(f"AugmentConfig: contrast must be < 1, got {self.contrast}")
        for name in ("scale_range", "gamma_range"):
            low_high = getattr(self, name)
            if len(low_high) != 2 or not (0 < low_high[0] <= low_high[1]) or not all(np.isfinite(low_high)):
                raise InputError(f"AugmentConfig: {name} must be (low, high) with 0 < low <= high, got {low_high}")

    @classmethod
    def identity(cls) -> AugmentConfig:
        """A configuration that changes nothing."""
        return cls(
            flip_prob=0.0,
            rotate_prob=0.0,
            elastic_prob=0.0,
            brightness=0.0,
            contrast=0.0,
            gamma_prob=0.0,
            noise_prob=0.0,
            invert_prob=0.0,
            bias_field=0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys raise InputError."""
        return config_from_dict(cls, data)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed uniform(-1, 1) noise of ``shape`` (Simard statistics), built coarse."""
    factor = max(1, int(sigma // 2))
    coarse_shape = tuple(-(-n // factor) + 1 for n in shape)
    noise = rng.uniform(-1.0, 1.0, size=coarse_shape).astype(np.float32)
    # Each coarse sample stands for factor² pixels: divide to keep the fine-grid amplitude.
    coarse = ndimage.gaussian_filter(noise, sigma / factor, mode="reflect") / factor
    if factor == 1:
        return coarse[: shape[0], : shape[1]]
    rows = np.arange(shape[0], dtype=np.float32) / factor
    cols = np.arange(shape[1], dtype=np.float32) / factor
    return _bilinear_grid(coarse, rows, cols)


def _bilinear_grid(coarse: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Separable bilinear sampling of ``coarse`` at the grid ``rows × cols`` (coarse coordinates)."""
    r0 = np.clip(np.floor(rows).astype(np.intp), 0, coarse.shape[0] - 2)
    c0 = np.clip(np.floor(cols).astype(np.intp), 0, coarse.shape[1] - 2)
    fr = (rows - r0)[:, None]
    fc = (cols - c0)[None, :]
    top = coarse[r0][:, c0] * (1 - fc) + coarse[r0][:, c0 + 1] * fc
    bottom = coarse[r0 + 1][:, c0] * (1 - fc) + coarse[r0 + 1][:, c0 + 1] * fc
    return (top * (1 - fr) + bottom * fr).astype(np.float32)


def mirror_left_right(image: np.ndarray, target: np.ndarray, lr_axis: str) -> tuple[np.ndarray, np.ndarray]:
    """Mirror a sample ``image [C, H, W]`` / ``target [H, W]`` across the patient's left-right axis.

    ``lr_axis`` says where left-right lies in the sample: ``"columns"`` (axial and coronal slices
    of the canonical orientation) or ``"channels"`` (sagittal slices: the context slices).
    """
    if lr_axis == "columns":
        return np.ascontiguousarray(image[:, :, ::-1]), np.ascontiguousarray(target[:, ::-1])
    if lr_axis == "channels":
        return np.ascontiguousarray(image[::-1]), target
    raise InputError(f"mirror_left_right: lr_axis must be 'columns' or 'channels', got {lr_axis!r}")


def _check_inputs(image: np.ndarray, labels: np.ndarray) -> None:
    if image.ndim != 3:
        raise InputError(f"augment_pair expects an image [C, H, W], got shape {image.shape}")
    if labels.ndim != 2 or labels.shape != image.shape[1:]:
        raise InputError(f"augment_pair: labels shape {labels.shape} does not match image {image.shape[1:]}")
    if not np.issubdtype(labels.dtype, np.integer) or np.iinfo(labels.dtype).max < IGNORE:
        raise InputError(f"augment_pair: labels must be an integer type that holds {IGNORE}, got {labels.dtype}")


def augment_pair(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Randomly augment an image ``[C, H, W]`` (float, ~0..1) and its labels ``[H, W]`` together.

    Returns new arrays: the image as float32, the labels in their own dtype.  Label values
    after augmentation are a subset of the input's plus :data:`IGNORE` for pixels sampled
    from outside the slice.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    _check_inputs(image, labels)
    out = image.astype(np.float32, copy=True)
    lab = labels.copy()
    _, height, width = out.shape

    # --- geometry -----------------------------------------------------------------------
    if config.flip_prob > 0:
        if rng.random() < config.flip_prob:
            out, lab = out[:, :, ::-1], lab[:, ::-1]
        if rng.random() < config.flip_prob:
            out, lab = out[:, ::-1, :], lab[::-1, :]
        out, lab = np.ascontiguousarray(out), np.ascontiguousarray(lab)

    matrix = None
    if config.rotate_prob > 0 and rng.random() < config.rotate_prob:
        angle = np.deg2rad(rng.uniform(-config.rotate_deg, config.rotate_deg))
        low, high = config.scale_range
        scale = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        matrix = np.array([[cos, -sin], [sin, cos]], dtype=np.float64)  # output -> input (row, col)

    displacement = None
    if config.elastic_prob > 0 and config.elastic_alpha_px > 0 and rng.random() < config.elastic_prob:
        alpha, sigma = config.elastic_alpha_px, config.elastic_sigma_px
        displacement = (
            _smooth_field(rng, (height, width), sigma) * alpha,
            _smooth_field(rng, (height, width), sigma) * alpha,
        )

    if matrix is not None or displacement is not None:
        centre = np.array([(height - 1) / 2.0, (width - 1) / 2.0])
        if displacement is None:
            offset = centre - matrix @ centre
            warp = {"matrix": matrix, "offset": offset}
            channels = [
                ndimage.affine_transform(c, output_shape=c.shape, order=1, mode="constant", cval=0.0, **warp)
                for c in out
            ]
            lab = ndimage.affine_transform(lab, order=0, mode="constant", cval=IGNORE, **warp)
        else:
            rows, cols = np.meshgrid(
                np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij"
            )
            if matrix is not None:
                r, c = rows - centre[0], cols - centre[1]
                rows = (matrix[0, 0] * r + matrix[0, 1] * c + centre[0]).astype(np.float32)
                cols = (matrix[1, 0] * r + matrix[1, 1] * c + centre[1]).astype(np.float32)
            coords = np.stack([rows + displacement[0], cols + displacement[1]])
            channels = [ndimage.map_coordinates(c, coords, order=1, mode="constant", cval=0.0) for c in out]
            lab = ndimage.map_coordinates(lab, coords, order=0, mode="constant", cval=IGNORE).astype(labels.dtype)
        out = np.stack(channels).astype(np.float32, copy=False)

    # --- intensity (image only) -----------------------------------------------------------
    if config.invert_prob > 0 and rng.random() < config.invert_prob:
        lo = out.min(axis=(1, 2), keepdims=True)
        hi = out.max(axis=(1, 2), keepdims=True)
        out = (lo + hi) - out

    if config.bias_field > 0:
        strength = rng.uniform(0.0, config.bias_field)
        nodes = rng.uniform(-1.0, 1.0, size=(4, 4)).astype(np.float32)
        field = _bilinear_grid(
            nodes, np.linspace(0, 3, height, dtype=np.float32), np.linspace(0, 3, width, dtype=np.float32)
        )
        out = out * np.exp(np.float32(strength) * field)[None]

    if config.gamma_prob > 0 and rng.random() < config.gamma_prob:
        low, high = config.gamma_range
        gamma = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        lo = out.min(axis=(1, 2), keepdims=True)
        span = np.maximum(out.max(axis=(1, 2), keepdims=True) - lo, np.float32(1e-6))
        out = lo + span * ((out - lo) / span) ** np.float32(gamma)

    if config.contrast > 0:
        factor = np.float32(rng.uniform(1.0 - config.contrast, 1.0 + config.contrast))
        mean = out.mean(axis=(1, 2), keepdims=True)
        out = mean + (out - mean) * factor

    if config.brightness > 0:
        out = out + np.float32(rng.uniform(-config.brightness, config.brightness))

    if config.noise_std > 0 and config.noise_prob > 0 and rng.random() < config.noise_prob:
        std = np.float32(rng.uniform(0.0, config.noise_std))
        out = out + rng.standard_normal(out.shape, dtype=np.float32) * std

    return np.ascontiguousarray(out, dtype=np.float32), np.ascontiguousarray(lab)
