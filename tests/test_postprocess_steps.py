"""Post-processing restricted to the class's voxels and boxes (#21 item 2): the same labels as the
plain whole-map algorithm, and the seconds of each step reported."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_spineseg.postprocess import default_postprocess, postprocess_labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_postprocess import synthetic_labels


def _plain_filter(out: np.ndarray, value: int, voxel_mm3: float, rule, near) -> None:
    """The whole-map component filter, as it was before the restriction."""
    mask = out == value
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    keep = sizes * voxel_mm3 >= rule.min_component_mm3
    if near is not None:
        keep &= 2 * np.bincount(components[near].ravel(), minlength=count + 1)[1:] >= sizes
    if rule.keep_largest > 0 and keep.sum() > rule.keep_largest:
        order = np.argsort(-sizes, kind="stable")
        kept = order[keep[order]][: rule.keep_largest]
        keep = np.zeros_like(keep)
        keep[kept] = True
    out[mask & ~np.concatenate([[False], keep])[components]] = 0


def test_filtering_on_the_class_voxels_equals_the_whole_map_filter() -> None:
    from napari_spineseg.postprocess import ClassPostprocess, PostprocessConfig, _near_region

    labels, spacing = synthetic_labels((96, 96, 96), spacing=1.0, seed=4)
    rules = {
        1: ClassPostprocess(min_component_mm3=3.0),
        3: ClassPostprocess(min_component_mm3=2.0, keep_largest=1, near_class=1, near_mm=12.0),
        4: ClassPostprocess(keep_largest=3),
    }
    expected = labels.copy()
    for value, rule in rules.items():
        near = _near_region(expected == rule.near_class, spacing, rule.near_mm) if rule.near_class else None
        _plain_filter(expected, value, float(np.prod(spacing)), rule, near)
    got = postprocess_labels(labels, spacing, PostprocessConfig(rules))
    assert (got != labels).sum() > 100  # the rules did remove specks and far canal parts
    np.testing.assert_array_equal(got, expected)


def test_each_step_is_timed() -> None:
    labels, spacing = synthetic_labels((64, 64, 64), spacing=1.0)
    timings: dict[str, float] = {}
    out = postprocess_labels(labels, spacing, default_postprocess(), timings)
    assert set(timings) == {"bbox", "near", "components", "closing", "fill_holes"}
    assert all(v >= 0 for v in timings.values())
    np.testing.assert_array_equal(out, postprocess_labels(labels, spacing, default_postprocess()))
