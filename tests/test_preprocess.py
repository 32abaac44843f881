"""Tests of intensity pre-processing and in-plane resampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_spineseg.errors import InputError
from napari_spineseg.preprocess import (
    PreprocessConfig,
    inplane_target_shape,
    normalise_intensity,
    preprocess_slice,
    preprocess_volume,
    resample_back,
    resample_slices,
)


def test_normalise_maps_percentiles_to_unit_range() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(100.0, 20.0, size=(10, 30, 30))
    out = normalise_intensity(data, 1.0, 99.0)
    assert out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    low, high = np.percentile(data, [1.0, 99.0])
    # Voxels below/above the percentiles are clipped; the fraction matches the percentiles.
    assert np.mean(out == 0.0) == pytest.approx(0.01, abs=0.002)
    assert np.mean(out == 1.0) == pytest.approx(0.01, abs=0.002)
    mid = (data > low) & (data < high)
    np.testing.assert_allclose(out[mid], (data[mid] - low) / (high - low), atol=1e-5)


def test_normalise_ignores_nans_and_sets_them_to_zero() -> None:
    data = np.arange(1000, dtype=np.float64).reshape(10, 10, 10)
    reference = normalise_intensity(data, 0.0, 100.0)
    with_nan = np.concatenate([data, np.full((5, 10, 10), np.nan)])
    with_nan[-1, 0, 0] = np.inf
    out = normalise_intensity(with_nan, 0.0, 100.0)
    np.testing.assert_allclose(out[:10], reference, atol=1e-6)
    assert np.all(out[10:] == 0.0)
    assert np.all(np.isfinite(out))


def test_normalise_ignores_zero_background_when_it_dominates() -> None:
    data = np.zeros((10, 20, 20), dtype=np.int16)
    data[:, 5:10, 5:10] = np.arange(250).reshape(10, 5, 5) + 1000  # 1000..1249, 6% of voxels
    out = normalise_intensity(data, 0.0, 100.0)
    assert out[:, 5:10, 5:10].min() == 0.0 and out[:, 5:10, 5:10].max() == 1.0
    assert np.all(out[data == 0] == 0.0)  # clipped below the foreground's lowest percentile


def test_normalise_constant_gives_zeros_and_all_nan_raises() -> None:
    assert np.all(normalise_intensity(np.full((3, 4, 5), 7.0)) == 0)
    with pytest.raises(InputError):
        normalise_intensity(np.full((3, 4, 5), np.nan))


def test_preprocess_volume_without_normalisation_keeps_values() -> None:
    data = np.array([[[1.0, np.nan], [3.0, 4.0]]])
    out = preprocess_volume(data, (3.0, 1.0, 1.0), PreprocessConfig(normalise=False))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[[1.0, 0.0], [3.0, 4.0]]])
    with pytest.raises(InputError):
        preprocess_volume(data[0], (1.0, 1.0), PreprocessConfig())


def test_config_round_trip_and_validation() -> None:
    config = PreprocessConfig(clahe=True, clahe_kernel_mm=40.0, pixel_spacing_mm=None, gaussian_sigma_mm=0.5)
    again = PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()
    assert PreprocessConfig.from_dict({"pixel_spacing_mm": 1}).pixel_spacing_mm == 1.0
    with pytest.raises(InputError, match="bogus"):
        PreprocessConfig.from_dict({"bogus": 1})
    with pytest.raises(InputError):
        PreprocessConfig.from_dict({"clahe": "yes"})
    with pytest.raises(InputError):
        PreprocessConfig(lower_percentile=90, upper_percentile=10)


def test_preprocess_slice_filters() -> None:
    rng = np.random.default_rng(1)
    clean = np.full((64, 64), 0.2, dtype=np.float32)
    clean[16:48, 16:48] = 0.8
    noisy = clean + rng.normal(0, 0.08, clean.shape).astype(np.float32)
    untouched = preprocess_slice(noisy, (1.0, 1.0), PreprocessConfig())
    np.testing.assert_array_equal(untouched, noisy)
    base_error = np.abs(noisy - clean).mean()
    for config in (
        PreprocessConfig(denoise_nlmeans=True, nlmeans_h=0.08),
        PreprocessConfig(bilateral=True, bilateral_sigma_color=0.2, bilateral_sigma_spatial_mm=1.0),
        PreprocessConfig(gaussian_sigma_mm=1.0),
    ):
        out = preprocess_slice(noisy, (1.0, 1.0), config)
        assert out.dtype == np.float32 and out.shape == noisy.shape
        assert np.abs(out - clean).mean() < 0.8 * base_error, config
    # Gaussian sigma in mm: a coarser pixel grid means fewer pixels of blur.
    impulse = np.zeros((41, 41), dtype=np.float32)
    impulse[20, 20] = 1.0
    fine = preprocess_slice(impulse, (0.5, 0.5), PreprocessConfig(gaussian_sigma_mm=2.0))
    coarse = preprocess_slice(impulse, (2.0, 2.0), PreprocessConfig(gaussian_sigma_mm=2.0))
    assert fine[20, 20] < coarse[20, 20]
    # CLAHE raises local contrast of a low-contrast slice; a constant slice passes through.
    low_contrast = 0.4 + 0.1 * clean
    equalised = preprocess_slice(low_contrast, (1.0, 1.0), PreprocessConfig(clahe=True, clahe_kernel_mm=16.0))
    assert np.ptp(equalised) > np.ptp(low_contrast)
    flat = preprocess_slice(np.full((20, 20), 0.3), (1.0, 1.0), PreprocessConfig(clahe=True))
    np.testing.assert_allclose(flat, 0.3)


def test_inplane_target_shape() -> None:
    assert inplane_target_shape((224, 200), (0.5, 0.8), (1.0, 1.0)) == (112, 160)
    assert inplane_target_shape((3, 3), (0.1, 0.1), (1.0, 1.0)) == (1, 1)
    with pytest.raises(InputError):
        inplane_target_shape((10, 10), (0.0, 1.0), (1.0, 1.0))


@pytest.mark.parametrize("shape", [(5, 37, 41), (5, 2, 37, 41)])
def test_resample_there_and_back_shapes(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(2)
    stack = rng.random(shape).astype(np.float32)
    down = resample_slices(stack, (0.7, 0.9), (1.0, 1.0), order=1)
    assert down.shape == (*shape[:-2], round(37 * 0.7), round(41 * 0.9))
    assert down.dtype == np.float32
    back = resample_back(down, shape[-2:], order=1)
    assert back.shape == shape
    labels = rng.integers(0, 5, size=shape).astype(np.uint8)
    labels_back = resample_back(resample_slices(labels, (0.7, 0.9), (1.0, 1.0), order=0), shape[-2:], order=0)
    assert labels_back.shape == shape and labels_back.dtype == np.uint8
    assert set(np.unique(labels_back)) <= set(np.unique(labels))


def test_resample_bilinear_preserves_smooth_images_and_constants() -> None:
    xx = np.mgrid[0:64, 0:64][1].astype(np.float32)
    ramp = (xx / 63.0)[None]
    back = resample_back(resample_slices(ramp, (1.0, 1.0), (0.5, 0.5), order=1), (64, 64), order=1)
    np.testing.assert_allclose(back[:, 2:-2, 2:-2], ramp[:, 2:-2, 2:-2], atol=1e-5)
    const = np.full((2, 30, 30), 0.25, dtype=np.float32)
    np.testing.assert_allclose(resample_slices(const, (0.6, 0.6), (1.0, 1.0), order=1), 0.25, atol=1e-6)


def test_integer_ratio_label_round_trip_is_exact() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=(4, 30, 42)).astype(np.int64)
    # Up-sampling by an integer factor and back: exact for arbitrary labels.
    up = resample_slices(labels, (2.0, 3.0), (1.0, 1.0), order=0)
    assert up.shape == (4, 60, 126)
    np.testing.assert_array_equal(resample_back(up, (30, 42), order=0), labels)
    # Each source pixel becomes an exact block of identical pixels.
    np.testing.assert_array_equal(up, np.repeat(np.repeat(labels, 2, axis=1), 3, axis=2))
    # Down-sampling by an integer factor and back: exact for block-constant labels.
    down = resample_slices(up, (1.0, 1.0), (2.0, 3.0), order=0)
    np.testing.assert_array_equal(down, labels)
    np.testing.assert_array_equal(resample_back(down, up.shape[-2:], order=0), up)


def test_resample_rejects_bad_arguments() -> None:
    with pytest.raises(InputError):
        resample_slices(np.zeros((4, 4)), (1.0, 1.0), (1.0, 1.0), order=0)
    with pytest.raises(InputError):
        resample_slices(np.zeros((1, 4, 4)), (1.0, 1.0), (1.0, 1.0), order=3)
