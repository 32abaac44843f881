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


# Issue 19: fragments and merges, models without a lesion class, uncertain-slice ranking, plausibility ----
def tall_spine() -> np.ndarray:
    """Five bodies of 8 slices with discs; the lowest two touch (one 20-slice "body"); a 2-slice sliver."""
    labels = np.zeros((80, 12, 12), np.uint8)
    for start in (2, 14, 26, 38):
        labels[start : start + 8, 2:10, 2:10] = 1
    labels[50:70, 2:10, 2:10] = 1  # two vertebrae merged into one component
    labels[74:76, 2:10, 2:10] = 1  # a few painted slices of a body: a fragment, not a level
    for start in (10, 22, 34, 46):
        labels[start : start + 4, 3:9, 3:9] = 2
    return labels


def test_fragments_are_never_levels_and_merged_bodies_are_flagged() -> None:
    volume = Volume.from_array(tall_spine(), spacing=(1.0, 1.0, 2.0), direction=LPS)
    review = review_labels(volume.array, volume.geometry)
    bodies = [s for s in review.levels if s.value == 1]
    assert len(bodies) == 5 and review.fragments[1] == 1  # the 2-slice sliver is not "body 1"
    assert [s.note for s in bodies] == ["possibly merged", "", "", "", ""]  # superior first: index 50..69
    assert bodies[0].height_mm == pytest.approx(40.0)  # 20 slices of 2 mm


def test_a_model_without_a_lesion_class_cannot_detect_lesions() -> None:
    from napari_spineseg.schema import DEFAULT_CLASSES

    labels = spine()
    labels[labels == 4] = 1
    volume = Volume.from_array(labels, spacing=(1.0, 1.0, 2.0), direction=LPS)
    no_lesion_class = [c for c in DEFAULT_CLASSES if c.value != 4]
    review = review_labels(volume.array, volume.geometry, no_lesion_class)
    assert not review.detects_lesions
    assert review.lesion_message() == "This model cannot detect lesions (it has no lesion class)."
    assert review_labels(volume.array, volume.geometry).lesion_message() == "No lesion detected."


def test_uncertain_slices_only_inside_the_anatomy_and_spread_out() -> None:
    from napari_spineseg.review import rank_uncertain_slices

    uncertainty = np.zeros((30, 20, 20), np.float32)
    uncertainty[0] = 1.0  # background at the edge of the field of view: the most "uncertain" slice
    anatomy = np.zeros(uncertainty.shape, np.uint8)
    anatomy[8:24, 5:15, 5:15] = 1
    uncertainty[15, 5:15, 5:15] = 0.8
    uncertainty[16, 5:15, 5:15] = 0.79  # its neighbour: proposed only after the spread-out ones
    uncertainty[21, 5:15, 5:15] = 0.5
    order, scores = rank_uncertain_slices(uncertainty, 0, anatomy, margin_voxels=2, min_gap=3)
    assert list(order[:2]) == [15, 21]
    assert 0 not in order and set(order) == set(range(6, 26))  # anatomy 8..23 plus 2 slices either side
    assert list(order).index(16) > list(order).index(21)
    assert np.isnan(scores[0]) and scores[15] > scores[21]

    # a study resampled from thick slices: the best slice of each run of resampled slices first
    runs = [range(13, 16), range(17, 20), range(21, 24)]
    uncertainty[18, 5:15, 5:15] = 0.6
    uncertainty[20, 5:15, 5:15] = 0.7  # an acquired slice between two runs: a correction there stays alone
    order, _ = rank_uncertain_slices(uncertainty, 0, anatomy, margin_voxels=2, min_gap=3, runs=runs)
    assert list(order[:3]) == [15, 18, 21]
    order, _ = rank_uncertain_slices(uncertainty, 0, anatomy, margin_voxels=2, min_gap=3)
    assert list(order[:2]) == [15, 20]


def test_plausibility_warns_for_a_brain_and_is_quiet_for_a_spine() -> None:
    from napari_spineseg.plausibility import body_part_of, plausibility_warnings

    spacing = (4.0, 4.0, 4.0)  # bodies of 8x8x8 voxels at 4 mm: ~33 mL each, discs ~9 mL
    volume = Volume.from_array(tall_spine()[:48], spacing=spacing, direction=LPS)
    assert plausibility_warnings(review_labels(volume.array, volume.geometry), "LSPINE") == []
    brain = np.zeros((40, 40, 40), np.uint8)
    brain[10:30, 10:30, 10:30] = 3  # "spinal canal 15 mL" and nothing else
    brain_volume = Volume.from_array(brain, spacing=(1.2, 1.2, 1.6), direction=LPS)
    warnings = plausibility_warnings(review_labels(brain_volume.array, brain_volume.geometry), "BRAIN")
    assert len(warnings) == 2
    assert "'BRAIN', not the spine" in warnings[0] and "no vertebral body was found" in warnings[1]
    canal_model = plausibility_warnings(review_labels(brain_volume.array, brain_volume.geometry), None, False)
    assert canal_model == []  # a model with no vertebral body class is not asked for bodies
    huge = Volume.from_array(tall_spine()[:48], spacing=(20.0, 20.0, 20.0), direction=LPS)  # wrong spacing
    assert any("far outside" in w for w in plausibility_warnings(review_labels(huge.array, huge.geometry)))
    assert body_part_of({"dicom": {"body_part": "BRAIN"}}) == "BRAIN" and body_part_of({}) is None
