"""Tests of the synthetic lumbar spine phantom."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_spineseg.errors import InputError
from napari_spineseg.phantom import PHANTOM_DIRECTION, PhantomConfig, make_phantom, sample_study
from napari_spineseg.schema import INTERVERTEBRAL_DISC, LESION, SPINAL_CANAL, VERTEBRAL_BODY

LUMBAR = ["L1", "L2", "L3", "L4", "L5"]
# Same field of view as the default, coarser grid: fast but anatomically complete.
SMALL = {"size": (112, 112, 28), "spacing": (2.4, 2.4, 4.0)}


@pytest.fixture(scope="module")
def t1():
    return make_phantom(contrast="T1", lesions=2, seed=5, **SMALL)


@pytest.fixture(scope="module")
def t2():
    return make_phantom(contrast="T2", lesions=2, seed=5, **SMALL)


def _centre_index(phantom, level):
    x, y, z = phantom.labels.metadata["level_centres_index"][level]
    return round(z), round(y), round(x)


def test_deterministic_and_seeded():
    a = make_phantom(PhantomConfig(size=(48, 48, 10), spacing=(5.6, 5.6, 8.0), seed=3, lesions=1))
    b = make_phantom(PhantomConfig(size=(48, 48, 10), spacing=(5.6, 5.6, 8.0), seed=3), lesions=1)
    assert np.array_equal(a.image.array, b.image.array)
    assert np.array_equal(a.labels.array, b.labels.array)
    assert a.levels == b.levels and a.lesion_levels == b.lesion_levels
    c = make_phantom(size=(48, 48, 10), spacing=(5.6, 5.6, 8.0), seed=4, lesions=1)
    assert not np.array_equal(a.image.array, c.image.array)


def test_types_values_and_geometry(t1):
    image, labels = t1.image, t1.labels
    assert image.array.dtype == np.float32 and labels.array.dtype == np.uint8
    assert set(np.unique(labels.array)) <= {0, 1, 2, 3, 4}
    assert {VERTEBRAL_BODY, INTERVERTEBRAL_DISC, SPINAL_CANAL, LESION} <= set(np.unique(labels.array))
    assert image.geometry == labels.geometry
    assert image.geometry.size == SMALL["size"] and image.array.shape == (28, 112, 112)
    assert image.geometry.spacing == SMALL["spacing"]
    assert image.geometry.direction == PHANTOM_DIRECTION
    assert image.name == "spine phantom T1" and labels.name == "spine phantom T1 labels"
    assert np.isfinite(image.array).all() and image.array.min() >= 0
    assert 300 < np.percentile(image.array, 99) < 2000  # scanner-like intensity range
    # Air outside the body (posterior edge) is dark; the body interior is not.
    assert image.array[:, :, -3:].mean() < 0.2 * image.array[:, :, 40:70].mean()


def test_lumbar_bodies_are_separate_and_stacked(t1):
    labels = t1.labels.array
    assert [lv for lv in t1.levels if lv in LUMBAR] == LUMBAR
    assert t1.levels[-1] == "S1" and t1.levels.index("L1") > 0 and "T12" in t1.levels
    components, _ = ndimage.label(np.isin(labels, (VERTEBRAL_BODY, LESION)))
    ids = []
    for level in LUMBAR:
        ident = components[_centre_index(t1, level)]
        assert ident > 0, f"{level} centre is not inside a vertebral body"
        ids.append(ident)
    assert len(set(ids)) == 5
    centroid_y = [np.nonzero(components == i)[1].mean() for i in ids]
    assert np.all(np.diff(centroid_y) > 15 / 2.4)  # superior -> inferior, > 15 mm apart
    # Body sizes are anatomical: 30-48 mm AP, 20-34 mm SI in the mid-sagittal slice.
    for level, ident in zip(LUMBAR, ids):
        z = _centre_index(t1, level)[0]
        ys, xs = np.nonzero(components[z] == ident)
        assert 30 <= (xs.max() - xs.min() + 1) * 2.4 <= 48, level
        assert 20 <= (ys.max() - ys.min() + 1) * 2.4 <= 36, level


def test_discs_between_consecutive_bodies(t1):
    labels = t1.labels.array
    body = np.isin(labels, (VERTEBRAL_BODY, LESION))
    for upper, lower in zip(t1.levels[:-1], t1.levels[1:]):
        if upper not in LUMBAR:
            continue
        a, b = np.array(_centre_index(t1, upper)), np.array(_centre_index(t1, lower))
        mid = tuple(np.round((a + b) / 2).astype(int))
        assert labels[mid] == INTERVERTEBRAL_DISC, f"no disc between {upper} and {lower}"
        disc, _ = ndimage.label(labels == INTERVERTEBRAL_DISC)
        this = disc == disc[mid]
        touching = ndimage.binary_dilation(this, iterations=2) & body
        ys = np.nonzero(touching)[1]
        assert ys.min() < mid[1] < ys.max()  # bodies above and below it
        height_mm = (np.ptp(np.nonzero(this[mid[0], :, mid[2]])[0]) + 1) * 2.4
        assert 4 <= height_mm <= 20


def test_canal_is_posterior_to_bodies(t1):
    labels = t1.labels.array
    z = _centre_index(t1, "L3")[0]
    rows = range(_centre_index(t1, "L1")[1], _centre_index(t1, "L5")[1] + 1)
    checked = 0
    for y in rows:
        canal = np.nonzero(labels[z, y] == SPINAL_CANAL)[0]
        body = np.nonzero(np.isin(labels[z, y], (VERTEBRAL_BODY, LESION, INTERVERTEBRAL_DISC)))[0]
        if len(canal) and len(body):
            assert canal.min() > body.max() - 1  # larger x = posterior
            checked += 1
    assert checked > 20


def test_t1_t2_contrast(t1, t2):
    assert np.array_equal(t1.labels.array, t2.labels.array)
    lab = t1.labels.array
    canal, body = lab == SPINAL_CANAL, lab == VERTEBRAL_BODY
    assert t1.image.array[canal].mean() < 0.6 * t1.image.array[body].mean()
    assert t2.image.array[canal].mean() > 1.5 * t2.image.array[body].mean()


def test_lesions_inside_bodies_and_bright(t1, t2):
    lab = t1.labels.array
    lesion = lab == LESION
    assert len(t1.lesion_levels) == 2 and all(level in t1.levels for level in t1.lesion_levels)
    assert lesion.sum() > 0
    body = ndimage.binary_dilation(np.isin(lab, (VERTEBRAL_BODY, LESION)) & ~lesion, iterations=1)
    assert not np.any(lesion & ~ndimage.binary_fill_holes(body))
    for ph in (t1, t2):
        assert ph.image.array[lesion].mean() > 1.15 * ph.image.array[lab == VERTEBRAL_BODY].mean()
    no_lesion = make_phantom(contrast="T1", lesions=0, seed=5, **SMALL)
    assert not np.any(no_lesion.labels.array == LESION) and no_lesion.lesion_levels == []


def test_small_grid_and_anisotropic_spacing():
    ph = make_phantom(size=(64, 64, 16), spacing=(3.5, 3.5, 8.0), lesions=2, snr=10.0, bias_field=0.4)
    assert ph.image.array.shape == (16, 64, 64) and ph.labels.geometry.spacing == (3.5, 3.5, 8.0)
    assert all(level in ph.levels for level in LUMBAR)
    assert np.count_nonzero(ph.labels.array == LESION) >= 2  # each lesion owns at least its centre voxel


def test_sample_study():
    ph = sample_study()
    assert ph.image.geometry.size == (224, 224, 77) and ph.image.name == "spine phantom T1"
    assert len(ph.lesion_levels) == 1 and np.any(ph.labels.array == LESION)


@pytest.mark.parametrize(
    "bad",
    [{"contrast": "PD"}, {"size": (0, 10, 10)}, {"spacing": (1, -1, 1)}, {"lesions": -1}, {"snr": 0}, {"colour": 1}],
)
def test_invalid_config(bad):
    with pytest.raises(InputError):
        make_phantom(**bad)
