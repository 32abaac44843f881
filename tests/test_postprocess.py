"""Tests of per-class label post-processing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_spineseg.errors import InputError
from napari_spineseg.postprocess import (
    ClassPostprocess,
    PostprocessConfig,
    default_postprocess,
    ellipsoid_structure,
    postprocess_labels,
)


def _config(**rules: ClassPostprocess) -> PostprocessConfig:
    return PostprocessConfig({int(k[1:]): v for k, v in rules.items()})


def test_small_component_threshold_uses_anisotropic_voxel_volume() -> None:
    labels = np.zeros((10, 40, 40), dtype=np.uint8)
    labels[1:3, 2:7, 2:7] = 1  # 50 voxels
    labels[5:9, 20:35, 20:35] = 1  # 900 voxels
    config = _config(c1=ClassPostprocess(min_component_mm3=100.0))
    # 1 mm³ voxels: 50 mm³ < 100 -> removed.
    small_voxels = postprocess_labels(labels, (1.0, 1.0, 1.0), config)
    assert small_voxels[1:3, 2:7, 2:7].max() == 0
    assert np.all(small_voxels[5:9, 20:35, 20:35] == 1)
    # 3 x 0.5 x 0.5 mm voxels (0.75 mm³): 37.5 mm³ -> removed; 4 x 1 x 1 mm voxels: 200 mm³ -> kept.
    assert postprocess_labels(labels, (3.0, 0.5, 0.5), config)[1:3, 2:7, 2:7].max() == 0
    kept = postprocess_labels(labels, (4.0, 1.0, 1.0), config)
    np.testing.assert_array_equal(kept, labels)
    assert kept.dtype == np.uint8 and kept is not labels


def test_keep_largest_components() -> None:
    labels = np.zeros((20, 20, 20), dtype=np.int32)
    labels[0:2, 0:2, 0:2] = 3  # 8
    labels[5:8, 5:8, 5:8] = 3  # 27
    labels[12:16, 12:16, 12:16] = 3  # 64
    out = postprocess_labels(labels, (1.0, 1.0, 1.0), _config(c3=ClassPostprocess(keep_largest=2)))
    assert out[0:2, 0:2, 0:2].max() == 0
    assert np.all(out[5:8, 5:8, 5:8] == 3) and np.all(out[12:16, 12:16, 12:16] == 3)
    out1 = postprocess_labels(labels, (1.0, 1.0, 1.0), _config(c3=ClassPostprocess(keep_largest=1)))
    assert np.count_nonzero(out1) == 64
    # Diagonal contact counts as connected (26-connectivity).
    diag = np.zeros((5, 5, 5), dtype=np.uint8)
    diag[1, 1, 1] = diag[2, 2, 2] = 1
    diag[4, 4, 0] = 1
    out_diag = postprocess_labels(diag, (1.0, 1.0, 1.0), _config(c1=ClassPostprocess(keep_largest=1)))
    assert out_diag[1, 1, 1] == out_diag[2, 2, 2] == 1 and out_diag[4, 4, 0] == 0


def test_holes_filled_only_into_background() -> None:
    labels = np.zeros((9, 9, 9), dtype=np.uint8)
    labels[1:8, 1:8, 1:8] = 1
    labels[3:6, 3:6, 3:6] = 0  # enclosed cavity
    labels[4, 4, 4] = 4  # a lesion inside the cavity
    out = postprocess_labels(labels, (1.0, 1.0, 1.0), _config(c1=ClassPostprocess(fill_holes=True)))
    expected = labels.copy()
    expected[3:6, 3:6, 3:6] = 1
    expected[4, 4, 4] = 4
    np.testing.assert_array_equal(out, expected)
    # An open cavity (touching the outside) is not a hole.
    open_labels = labels.copy()
    open_labels[3:6, 3:6, 0:6] = 0
    out_open = postprocess_labels(open_labels, (1.0, 1.0, 1.0), _config(c1=ClassPostprocess(fill_holes=True)))
    np.testing.assert_array_equal(out_open, open_labels)


def test_closing_respects_mm_and_other_classes() -> None:
    labels = np.zeros((6, 30, 30), dtype=np.uint8)
    labels[:, 5:25, 5:14] = 1
    labels[:, 5:25, 16:25] = 1  # a 2-pixel (1 mm at 0.5 mm spacing) gap at columns 14, 15
    labels[:, 20:25, 14:16] = 2  # part of the gap belongs to another class
    config = _config(c1=ClassPostprocess(closing_mm=1.5))
    out = postprocess_labels(labels, (3.0, 0.5, 0.5), config)
    assert np.all(out[1:-1, 7:18, 14:16] == 1)  # gap bridged inside the bodies' extent
    np.testing.assert_array_equal(out[labels == 2], 2)  # other class untouched
    assert np.all(out[:, 26:, :] == 0) and np.all(out[:, :, 26:] == 0)  # no growth outwards
    # The same gap in 2 mm pixels (4 mm wide) is too wide for a 1.5 mm closing.
    wide = postprocess_labels(labels, (3.0, 2.0, 2.0), config)
    np.testing.assert_array_equal(wide, labels)


def test_ellipsoid_structure_is_anisotropic() -> None:
    structure = ellipsoid_structure(2.0, (4.0, 1.0, 0.5))
    assert structure.shape == (1, 5, 9)
    assert structure[0, 2, 4] and structure[0, 0, 4] and structure[0, 2, 0] and not structure[0, 0, 0]


def test_other_classes_untouched_and_order_of_config() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(12, 32, 32)).astype(np.uint16)
    config = default_postprocess()
    out = postprocess_labels(labels, (3.0, 1.0, 1.0), config)
    assert out.dtype == labels.dtype
    for value in range(1, 5):
        changed = (labels == value) & (out != value)
        assert np.all(out[changed] == 0)  # removed voxels become background, never another class
        gained = (out == value) & (labels != value)
        assert np.all(labels[gained] == 0)  # added voxels only come from background
    # Classes not in the config are left alone.
    only_lesion = postprocess_labels(labels, (3.0, 1.0, 1.0), _config(c4=ClassPostprocess(min_component_mm3=1e9)))
    assert not np.any(only_lesion == 4)
    np.testing.assert_array_equal(only_lesion[labels != 4], labels[labels != 4])


def test_config_round_trip_and_validation() -> None:
    config = default_postprocess()
    data = json.loads(json.dumps(config.to_dict()))
    assert set(data["per_class"]) == {"1", "2", "3", "4"}
    again = PostprocessConfig.from_dict(data)
    assert again == config and list(again.per_class) == list(config.per_class)
    assert again.per_class[3].keep_largest == 1 and again.per_class[1].fill_holes
    with pytest.raises(InputError):
        PostprocessConfig.from_dict({"per_class": {"1": {"min_component_mm3": 5, "bogus": True}}})
    with pytest.raises(InputError):
        PostprocessConfig.from_dict({"per_class": {}, "extra": 1})
    with pytest.raises(InputError):
        PostprocessConfig.from_dict({"per_class": {"body": {}}})
    with pytest.raises(InputError):
        ClassPostprocess(keep_largest=-1)
    with pytest.raises(InputError):
        postprocess_labels(np.zeros((4, 4), dtype=np.uint8), (1.0, 1.0), config)
    with pytest.raises(InputError):
        postprocess_labels(np.zeros((4, 4, 4), dtype=np.float32), (1.0, 1.0, 1.0), config)


def test_postprocess_on_a_full_size_volume() -> None:
    labels = np.zeros((77, 224, 224), dtype=np.uint8)
    zz, yy, xx = np.ogrid[:77, :224, :224]
    for k in range(5):
        labels[((zz - 38) / 30) ** 2 + ((yy - 20 - 40 * k) / 15) ** 2 + ((xx - 80) / 25) ** 2 <= 1] = 1
        labels[((zz - 38) / 30) ** 2 + ((yy - 40 - 40 * k) / 4) ** 2 + ((xx - 80) / 25) ** 2 <= 1] = 2
    canal = (((zz - 38) / 30) ** 2 + ((xx - 127) / 6) ** 2 <= 1) & (yy >= 0)
    labels[canal] = 3
    rng = np.random.default_rng(1)
    noise = rng.random(labels.shape) < 0.002
    labels[noise] = rng.integers(1, 5, size=int(noise.sum()))
    out = postprocess_labels(labels, (3.0, 0.6, 0.6), default_postprocess())
    assert np.count_nonzero(out[noise & (labels == 4)]) == 0  # isolated lesion speckles removed


def test_canal_far_from_every_vertebral_body_is_removed_even_when_largest() -> None:
    labels = np.zeros((60, 70, 80), np.uint8)
    labels[25:35, 30:40, 35:45] = 1  # a vertebral body
    labels[25:35, 42:50, 35:45] = 3  # canal right behind it (800 voxels)
    labels[0:10, 0:10, 0:20] = 3  # a bigger false "canal" 30+ mm away (2000 voxels)
    rule = ClassPostprocess(keep_largest=1, near_class=1, near_mm=20.0)
    out = postprocess_labels(labels, (1.0, 1.0, 1.0), PostprocessConfig({3: rule}))
    assert (out[25:35, 42:50, 35:45] == 3).all()
    assert not (out[0:10, 0:10, 0:20] == 3).any()
    # a large false region that grazes the body (most of it far away) goes too
    grazing = labels.copy()
    grazing[0:10, 0:10, 0:20] = 0
    grazing[20:60, 0:28, 35:80] = 3  # 50 400 voxels; the part within 20 mm of the body is a minority
    out = postprocess_labels(grazing, (1.0, 1.0, 1.0), PostprocessConfig({3: rule}))
    assert (out[25:35, 42:50, 35:45] == 3).all() and not (out[20:60, 0:28, 35:80] == 3).any()
    # without the prior the bigger, false component wins
    plain = postprocess_labels(labels, (1.0, 1.0, 1.0), PostprocessConfig({3: ClassPostprocess(keep_largest=1)}))
    assert (plain[0:10, 0:10, 0:20] == 3).all() and not (plain[25:35, 42:50, 35:45] == 3).any()
    # no body in the map: the prior does not apply (nothing is removed for lack of a reference)
    no_body = np.where(labels == 1, 0, labels).astype(np.uint8)
    rule_only = ClassPostprocess(near_class=1, near_mm=20.0)
    assert np.array_equal(postprocess_labels(no_body, (1.0, 1.0, 1.0), PostprocessConfig({3: rule_only})), no_body)
    assert ClassPostprocess.from_dict(rule.to_dict()) == rule


def test_near_region_never_misses_a_voxel_within_the_distance() -> None:
    from napari_spineseg.postprocess import _near_region

    reference = np.zeros((40, 50, 30), bool)
    reference[20, 25, 15] = True
    spacing = (2.0, 0.7, 1.3)
    near = _near_region(reference, spacing, 12.0)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(reference.shape, spacing)], indexing="ij"))
    distance = np.sqrt(((grid - np.array([20 * 2.0, 25 * 0.7, 15 * 1.3])[:, None, None, None]) ** 2).sum(axis=0))
    assert near[distance <= 12.0].all()
    assert not near[distance > 40.0].any()
