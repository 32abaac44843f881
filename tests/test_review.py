"""Label review (Qt-free): volumes, components, levels superior → inferior, lesions, slice ranking."""

from __future__ import annotations

import numpy as np
import pytest

from napari_spineseg.errors import GeometryMismatchError
from napari_spineseg.orientation import reorient
from napari_spineseg.review import review_labels, uncertain_slices
from napari_spineseg.volume import Volume

# Identity direction: ITK z (array axis 0) points superior (LPS +S), so index 0 is most inferior.
LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def spine(shape=(40, 12, 12)) -> np.ndarray:
    """Three bodies with discs between them along array axis 0; a lesion in the top body."""
    labels = np.zeros(shape, np.uint8)
    for start in (2, 14, 26):  # bodies of 8 slices, discs of 4 slices in between
        labels[start : start + 8, 2:10, 2:10] = 1
    for start in (10, 22):
        labels[start : start + 4, 3:9, 3:9] = 2
    labels[28:30, 5:7, 5:7] = 4  # inside the body at index 26..33 = the most superior one
    return labels


def test_levels_run_superior_to_inferior_whatever_the_axis_order() -> None:
    volume = Volume.from_array(spine(), spacing=(1.0, 1.0, 2.0), direction=LPS, name="spine")
    review = review_labels(volume.array, volume.geometry)
    assert [s.name for s in review.levels] == ["body 1", "disc 1-2", "body 2", "disc 2-3", "body 3"]
    superior = [s.superior_mm for s in review.levels]
    assert superior == sorted(superior, reverse=True)
    assert review.lesions[0].host == "body 1"
    assert review.lesion_message().startswith("1 lesion")
    body = next(c for c in review.classes if c.value == 1)
    assert body.components == 3
    assert body.volume_ml == pytest.approx(body.voxels * 2.0 / 1000.0)
    assert review.levels[0].height_mm == pytest.approx(16.0)

    # The same anatomy stored sagittally (PIR): the names and order do not change.
    pir, _ = reorient(volume, "PIR")
    again = review_labels(pir.array, pir.geometry)
    assert [s.name for s in again.levels] == [s.name for s in review.levels]
    assert [round(s.volume_ml, 6) for s in again.levels] == [round(s.volume_ml, 6) for s in review.levels]
    assert again.lesions[0].host == "body 1"


def test_no_lesion_and_fragments() -> None:
    labels = spine()
    labels[labels == 4] = 1
    labels[0, 0, 0] = 1  # a one-voxel fragment
    volume = Volume.from_array(labels, spacing=(1.0, 1.0, 2.0), direction=LPS)
    review = review_labels(volume.array, volume.geometry)
    assert review.lesion_message() == "No lesion detected."
    assert review.fragments[1] == 1
    assert sum(1 for s in review.levels if s.value == 1) == 3
    with pytest.raises(GeometryMismatchError):
        review_labels(labels[:-1], volume.geometry)


def test_uncertain_slices_rank_by_mean() -> None:
    array = np.zeros((5, 4, 4), np.float32)
    array[3] = 0.9
    array[1] = 0.5
    array[4, 0, 0] = 1.0
    assert list(uncertain_slices(array, 0))[:3] == [3, 1, 4]


def test_review_and_finetune_job_import_without_qt() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari'):\n"
        "    sys.modules[name] = None\n"
        "import napari_spineseg.review, napari_spineseg.widgets._finetune_job\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
