"""Tests of the paired 2-D training augmentations."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from napari_spineseg.augment import IGNORE, AugmentConfig, augment_pair
from napari_spineseg.errors import InputError


def _square_pair(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((2, size, size), 0.1, dtype=np.float32)
    labels = np.zeros((size, size), dtype=np.uint8)
    image[:, 30:60, 20:50] = 0.9
    labels[30:60, 20:50] = 1
    labels[70:80, 60:90] = 2  # a dark labelled region
    return image, labels


def _only(**changes: float) -> AugmentConfig:
    return dataclasses.replace(AugmentConfig.identity(), **changes)


def test_identity_config_returns_inputs_unchanged() -> None:
    image, labels = _square_pair()
    out_image, out_labels = augment_pair(image, labels, np.random.default_rng(0), AugmentConfig.identity())
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_labels, labels)
    assert out_image.dtype == np.float32 and out_labels.dtype == labels.dtype
    assert out_image is not image and out_labels is not labels


@pytest.mark.parametrize(
    "config",
    [
        _only(flip_prob=1.0),
        _only(rotate_prob=1.0, rotate_deg=40.0, scale_range=(0.7, 1.3)),
        _only(elastic_prob=1.0, elastic_alpha_px=60.0, elastic_sigma_px=6.0),
        AugmentConfig(flip_prob=0.5, rotate_prob=1.0, elastic_prob=1.0, brightness=0.0, contrast=0.0, bias_field=0.0),
    ],
)
def test_geometric_transforms_keep_image_and_labels_aligned(config: AugmentConfig) -> None:
    image, labels = _square_pair()
    rng = np.random.default_rng(7)
    changed = 0
    for _ in range(10):
        out_image, out_labels = augment_pair(image, labels, rng, config)
        assert out_image.shape == image.shape and out_labels.shape == labels.shape
        changed += not np.array_equal(out_labels, labels)
        inside = out_labels == 1
        outside = (out_labels != 1) & (out_labels != IGNORE)
        assert inside.sum() > 300
        # Interpolation blurs the square's edge by at most a pixel: interior stays bright.
        assert out_image[:, inside].mean() > 0.8
        assert out_image[:, outside].mean() < 0.2
        assert np.all(out_image[:, out_labels == 2] < 0.5)
        # No interpolated label values; IGNORE only appears from outside the slice.
        assert set(np.unique(out_labels)) <= {0, 1, 2, IGNORE}
        assert np.all(out_image[:, out_labels == IGNORE] <= 0.1 + 1e-6)  # image fill is 0 there
    assert changed >= 5


def test_flip_is_exact() -> None:
    image, labels = _square_pair()
    out_image, out_labels = augment_pair(image, labels, np.random.default_rng(0), _only(flip_prob=1.0))
    np.testing.assert_array_equal(out_image, image[:, ::-1, ::-1])
    np.testing.assert_array_equal(out_labels, labels[::-1, ::-1])


def test_rotation_fills_outside_with_ignore_and_zero() -> None:
    image, labels = _square_pair()
    image += 0.5  # nothing is 0 inside the slice
    out_image, out_labels = augment_pair(
        image, labels, np.random.default_rng(1), _only(rotate_prob=1.0, rotate_deg=45.0, scale_range=(0.7, 0.7))
    )
    corner = (slice(0, 5), slice(0, 5))
    assert np.all(out_labels[corner] == IGNORE)
    assert np.all(out_image[:, corner[0], corner[1]] == 0.0)
    assert np.count_nonzero(out_labels == IGNORE) > 500


def test_same_seed_same_result() -> None:
    image, labels = _square_pair()
    config = AugmentConfig(flip_prob=0.5, rotate_prob=1.0, elastic_prob=1.0, gamma_prob=1.0, noise_prob=1.0)
    first = augment_pair(image, labels, np.random.default_rng(42), config)
    second = augment_pair(image, labels, np.random.default_rng(42), config)
    third = augment_pair(image, labels, np.random.default_rng(43), config)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], third[0])


@pytest.mark.parametrize(
    "config",
    [
        _only(brightness=0.3),
        _only(contrast=0.5),
        _only(gamma_prob=1.0),
        _only(noise_prob=1.0, noise_std=0.1),
        _only(invert_prob=1.0),
        _only(bias_field=0.5),
    ],
)
def test_intensity_transforms_never_touch_labels(config: AugmentConfig) -> None:
    image, labels = _square_pair()
    image[:, 30:60, 20:50] += np.linspace(0, 0.05, 30, dtype=np.float32)  # a gradient for gamma to bend
    rng = np.random.default_rng(3)
    for _ in range(5):
        out_image, out_labels = augment_pair(image, labels, rng, config)
        np.testing.assert_array_equal(out_labels, labels)
        assert not np.array_equal(out_image, image)
        assert np.all(np.isfinite(out_image))


def test_inversion_swaps_dark_and_bright() -> None:
    image, labels = _square_pair()
    out_image, _ = augment_pair(image, labels, np.random.default_rng(0), _only(invert_prob=1.0))
    np.testing.assert_allclose(out_image, 1.0 - image, atol=1e-6)


def test_labels_must_hold_ignore_and_shapes_must_match() -> None:
    image, labels = _square_pair()
    rng = np.random.default_rng(0)
    with pytest.raises(InputError):
        augment_pair(image, labels.astype(np.int8), rng, AugmentConfig())
    with pytest.raises(InputError):
        augment_pair(image[0], labels, rng, AugmentConfig())
    with pytest.raises(InputError):
        augment_pair(image, labels[:-1], rng, AugmentConfig())


def test_config_round_trip_and_validation() -> None:
    config = AugmentConfig(scale_range=(0.9, 1.2), invert_prob=0.1)
    again = AugmentConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.scale_range == (0.9, 1.2)
    with pytest.raises(InputError, match="mystery"):
        AugmentConfig.from_dict({"mystery": 1})
    with pytest.raises(InputError):
        AugmentConfig.from_dict({"gamma_range": [1.0]})
    with pytest.raises(InputError):
        AugmentConfig(flip_prob=1.5)
    with pytest.raises(InputError):
        AugmentConfig(scale_range=(1.2, 0.8))


def test_left_right_mirror_keeps_superior_inferior_and_anterior_posterior():
    from napari_spineseg.augment import mirror_left_right

    image = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    target = np.arange(20, dtype=np.uint8).reshape(4, 5)
    cols_image, cols_target = mirror_left_right(image, target, "columns")
    assert np.array_equal(cols_image[:, :, 0], image[:, :, -1]) and np.array_equal(cols_image[:, 0], image[:, 0, ::-1])
    assert np.array_equal(cols_target, target[:, ::-1])
    chan_image, chan_target = mirror_left_right(image, target, "channels")
    assert np.array_equal(chan_image[0], image[2]) and np.array_equal(chan_target, target)
