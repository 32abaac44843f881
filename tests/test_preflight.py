"""Preflight warnings for studies that break spine segmentation."""

from __future__ import annotations

import numpy as np

from napari_spineseg.preflight import preflight
from napari_spineseg.volume import Volume


def codes(volume: Volume) -> set[str]:
    return {w.code for w in preflight(volume)}


def test_clean_study_has_no_warnings() -> None:
    rng = np.random.default_rng(0)
    volume = Volume.from_array(rng.random((20, 30, 30)), spacing=(0.9, 0.9, 3.0), origin=(10, -5, 3))
    assert codes(volume) == set()


def test_each_problem_is_named() -> None:
    rng = np.random.default_rng(0)
    assert "missing-geometry" in codes(Volume.from_array(rng.random((20, 20, 20))))
    assert "anisotropy" in codes(Volume.from_array(rng.random((20, 20, 20)), spacing=(0.5, 0.5, 6.0), origin=(1, 1, 1)))
    angle = np.radians(35)
    tilted = (1, 0, 0, 0, np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle))
    assert "oblique" in codes(Volume.from_array(rng.random((20, 20, 20)), direction=tilted, origin=(1, 1, 1)))
    assert "few-slices" in codes(Volume.from_array(rng.random((3, 20, 20)), origin=(1, 1, 1)))
    assert "constant" in codes(Volume.from_array(np.zeros((10, 10, 10)), origin=(1, 1, 1)))
    reader = Volume.from_array(rng.random((10, 10, 10)), origin=(1, 1, 1), metadata={"warnings": ["4-D image"]})
    assert "reader" in codes(reader)
