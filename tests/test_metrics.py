"""Tests of the segmentation metrics (hand-computed cases and MONAI / skimage references)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from napari_spineseg.errors import GeometryMismatchError, InputError
from napari_spineseg.metrics import (
    ClassMetrics,
    dice_score,
    evaluate_labels,
    evaluate_volumes,
    format_table,
    labelled_span_region,
    per_plane_dice,
    ssim,
    summarise,
)
from napari_spineseg.volume import Volume


def _ball(shape: tuple[int, ...], radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2


def test_dice_iou_of_two_boxes():
    pred = np.zeros((10, 20, 20), np.uint8)
    truth = np.zeros_like(pred)
    pred[2:6, 0:10, 0:10] = 1  # 400 voxels
    truth[2:6, 5:15, 0:10] = 1  # 400 voxels, overlap 4*5*10 = 200
    (m,) = evaluate_labels(pred, truth, (1.0, 1.0, 1.0), surface=False)
    assert m.value == 1 and m.name == "vertebral body"
    assert m.dice == pytest.approx(2 * 200 / 800)
    assert m.iou == pytest.approx(200 / 600)
    assert m.precision == pytest.approx(0.5) and m.recall == pytest.approx(0.5)
    assert m.f1 == pytest.approx(m.dice)
    assert m.accuracy == pytest.approx((pred.size - 400) / pred.size)
    assert dice_score(pred == 1, truth == 1) == pytest.approx(0.5)
    assert math.isnan(m.asd_mm) and m.to_dict()["asd_mm"] is None


def test_multiclass_defaults_names_and_classes():
    pred = np.zeros((8, 8), np.int16)
    truth = np.zeros_like(pred)
    pred[0:4, 0:4] = 2
    truth[0:4, 0:4] = 2
    truth[6:8, 6:8] = 4
    metrics = evaluate_labels(pred, truth, (1.0, 1.0), class_names={4: "tumour"})
    assert [m.value for m in metrics] == [2, 4]
    assert metrics[0].name == "intervertebral disc" and metrics[0].dice == 1.0 and metrics[0].asd_mm == 0.0
    assert metrics[1].name == "tumour" and metrics[1].empty_pred and not metrics[1].empty_truth


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((40, 40, 40), (1.0, 1.0, 1.0)), ((24, 56, 56), (2.0, 0.7, 0.7))],
)
def test_concentric_spheres_two_mm_apart(shape, spacing):
    truth = _ball(shape, 12.0, spacing).astype(np.uint8)
    pred = _ball(shape, 14.0, spacing).astype(np.uint8)
    (m,) = evaluate_labels(pred, truth, spacing)
    assert m.asd_mm == pytest.approx(2.0, abs=0.3)
    assert m.hd95_mm == pytest.approx(2.0, abs=0.3 if spacing[0] == 1.0 else 1.1)
    assert m.volume_truth_ml == pytest.approx(4 / 3 * math.pi * 12**3 / 1000, rel=0.05)
    # symmetric metric: swapping pred and truth changes nothing
    (swapped,) = evaluate_labels(truth, pred, spacing)
    assert swapped.asd_mm == pytest.approx(m.asd_mm) and swapped.hd95_mm == pytest.approx(m.hd95_mm)


def test_nsd_tolerance_on_isotropic_spheres():
    spacing = (1.0, 1.0, 1.0)
    truth = _ball((40, 40, 40), 12.0, spacing).astype(np.uint8)
    pred = _ball((40, 40, 40), 14.0, spacing).astype(np.uint8)
    (tight,) = evaluate_labels(pred, truth, spacing, nsd_tolerance_mm=1.0)
    (loose,) = evaluate_labels(pred, truth, spacing, nsd_tolerance_mm=3.0)
    assert tight.nsd < 0.1
    assert loose.nsd == 1.0
    assert loose.to_dict()["nsd_tolerance_mm"] == 3.0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own internal deprecation notice
def test_surface_metrics_match_monai_functions():
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(0)
    spacing = (2.5, 0.8, 1.1)
    truth = _ball((20, 50, 40), 10.0, spacing)
    pred = _ball((20, 50, 40), 11.0, spacing) & (rng.random((20, 50, 40)) > 0.1)
    pred[2:4, 2:5, 2:5] = True  # an outlier blob far away
    (m,) = evaluate_labels(pred.astype(np.uint8), truth.astype(np.uint8), spacing, nsd_tolerance_mm=1.5)
    p = torch.from_numpy(pred)[None, None].float()
    t = torch.from_numpy(truth)[None, None].float()
    kw = {"include_background": True, "spacing": spacing}
    assert m.asd_mm == pytest.approx(float(compute_average_surface_distance(p, t, symmetric=True, **kw)), rel=1e-5)
    assert m.hd95_mm == pytest.approx(float(compute_hausdorff_distance(p, t, percentile=95, **kw)), rel=1e-5)
    assert m.nsd == pytest.approx(float(compute_surface_dice(p, t, [1.5], **kw)), rel=1e-5)


def test_empty_conventions_and_json():
    truth = np.zeros((6, 6, 6), np.uint8)
    pred = np.zeros_like(truth)
    (both,) = evaluate_labels(pred, truth, (1.0, 1.0, 1.0), classes=[3])
    assert both.empty_both and both.dice == 1.0 and both.iou == 1.0
    assert both.asd_mm == 0.0 and both.hd95_mm == 0.0 and both.nsd == 1.0
    assert both.to_dict()["empty_both"] is True

    truth[1:3, 1:3, 1:3] = 3
    (missed,) = evaluate_labels(pred, truth, (1.0, 1.0, 1.0), classes=[3])
    (spurious,) = evaluate_labels(truth, pred, (1.0, 1.0, 1.0), classes=[3])
    for m in (missed, spurious):
        assert m.dice == 0.0 and m.iou == 0.0 and m.nsd == 0.0 and not m.empty_both
        assert math.isinf(m.asd_mm) and math.isinf(m.hd95_mm)
        data = json.loads(json.dumps(m.to_dict(), allow_nan=False))
        assert data["asd_mm"] is None and data["hd95_mm"] is None and data["dice"] == 0.0
    assert missed.empty_pred and not missed.empty_truth
    assert spurious.empty_truth and not spurious.empty_pred


def test_region_restricts_evaluation():
    truth = np.zeros((10, 8, 8), np.uint8)
    pred = np.zeros_like(truth)
    truth[2:5, 2:6, 2:6] = 1
    pred[2:5, 2:6, 2:6] = 1
    pred[8:10, 2:6, 2:6] = 1  # prediction on unlabelled levels
    (everything,) = evaluate_labels(pred, truth, (1.0, 1.0, 1.0))
    assert everything.dice < 1.0 and everything.hd95_mm > 0
    region = labelled_span_region(truth, axis=0)
    assert region[2:5].all() and not region[:2].any() and not region[5:].any()
    (restricted,) = evaluate_labels(pred, truth, (1.0, 1.0, 1.0), region=region)
    assert restricted.dice == 1.0 and restricted.asd_mm == 0.0 and restricted.nsd == 1.0
    assert restricted.accuracy == 1.0
    assert restricted.volume_pred_ml == pytest.approx(48 / 1000)
    grown = labelled_span_region(truth, axis=0, margin=4)
    assert grown[0:9].all() and not grown[9].any()
    assert not labelled_span_region(np.zeros((3, 3)), axis=1).any()
    with pytest.raises(InputError):
        evaluate_labels(pred, truth, (1.0, 1.0, 1.0), region=np.zeros(truth.shape, bool))
    with pytest.raises(GeometryMismatchError):
        evaluate_labels(pred, truth, (1.0, 1.0, 1.0), region=region[:5])


def test_anisotropic_volumes_in_ml():
    labels = np.zeros((4, 10, 10), np.uint8)
    labels[0:2, 0:5, 0:4] = 1  # 40 voxels
    spacing_zyx = (5.0, 0.5, 0.25)  # 0.625 mm³ per voxel
    (m,) = evaluate_labels(labels, labels, spacing_zyx, surface=False)
    assert m.volume_pred_ml == pytest.approx(40 * 0.625 / 1000)
    assert m.volume_truth_ml == pytest.approx(40 * 0.625 / 1000)


def test_evaluate_volumes_uses_zyx_spacing_and_checks_grid():
    truth_arr = np.zeros((12, 30, 30), np.uint8)
    truth_arr[4:8, 10:20, 10:20] = 1
    pred_arr = np.zeros_like(truth_arr)
    pred_arr[5:9, 10:20, 10:20] = 1  # shifted one slice along z
    truth = Volume.from_array(truth_arr, spacing=(0.5, 0.5, 4.0))  # ITK (x, y, z)
    pred = truth.with_array(pred_arr)
    (m,) = evaluate_volumes(pred, truth)
    assert m.volume_truth_ml == pytest.approx(400 * 0.5 * 0.5 * 4.0 / 1000)
    # the faces moved by one 4 mm slice: the largest surface distance is 4 mm, not 0.5 mm
    assert m.hd95_mm == pytest.approx(4.0)
    other = Volume.from_array(pred_arr, spacing=(0.5, 0.5, 3.0))
    with pytest.raises(GeometryMismatchError):
        evaluate_volumes(other, truth)


def test_bad_inputs():
    with pytest.raises(GeometryMismatchError):
        evaluate_labels(np.zeros((3, 3)), np.zeros((3, 4)), (1.0, 1.0))
    with pytest.raises(InputError):
        evaluate_labels(np.zeros((3, 3)), np.zeros((3, 3)), (1.0, 1.0, 1.0))
    with pytest.raises(InputError):
        evaluate_labels(np.full((3, 3), 0.5), np.zeros((3, 3)), (1.0, 1.0))


def test_ssim_equals_skimage():
    rng = np.random.default_rng(1)
    a = rng.random((32, 32)) * 100
    b = a + rng.normal(0, 10, a.shape)
    assert ssim(a, b, data_range=100.0) == pytest.approx(structural_similarity(a, b, data_range=100.0))
    vol_a, vol_b = rng.random((9, 16, 16)), rng.random((9, 16, 16))
    assert ssim(vol_a, vol_b, data_range=1.0) == pytest.approx(structural_similarity(vol_a, vol_b, data_range=1.0))
    assert ssim(a, a) == pytest.approx(1.0)
    masks_a, masks_b = a > 50, b > 50
    expected = structural_similarity(masks_a.astype(float), masks_b.astype(float), data_range=1.0)
    assert ssim(masks_a, masks_b) == pytest.approx(expected)
    with pytest.raises(GeometryMismatchError):
        ssim(a, a[:10])


def test_per_plane_dice():
    pred = np.zeros((3, 4, 4), np.uint8)
    truth = np.zeros_like(pred)
    truth[0, :2, :2] = 1
    pred[0, :2, :2] = 1  # slice 0: Dice 1
    truth[1, :2, :2] = 1  # slice 1: missed, Dice 0 ; slice 2 empty in both: skipped
    result = per_plane_dice(pred, truth, axis=0, classes=[1, 2])
    assert result[1] == pytest.approx(0.5)
    assert result[2] == 1.0
    # along another axis the slices differ: axis-1 slices 0 and 1 each hold 2 truth / 1 pred voxels
    assert per_plane_dice(pred, truth, axis=1, classes=[1])[1] == pytest.approx(2 / 3)


def test_table_and_summary():
    pred = np.zeros((6, 6, 6), np.uint8)
    truth = np.zeros_like(pred)
    pred[1:3, 1:3, 1:3] = 1
    truth[1:3, 1:3, 1:4] = 1
    truth[4:5, 4:5, 4:5] = 2
    metrics = evaluate_labels(pred, truth, (1.0, 1.0, 1.0), classes=[0, 1, 2])
    table = format_table(metrics)
    lines = table.splitlines()
    assert len(lines) == 5 and "Dice" in lines[0] and "inf" in lines[4] and "empty pred" in lines[4]
    end = lines[0].index("Dice") + len("Dice")  # right-aligned numeric column
    assert [line[end - 5 : end + 1] for line in lines[2:]] == ["0.988 ", "0.800 ", "0.000 "]
    summary = summarise(metrics)
    json.dumps(summary, allow_nan=False)
    assert summary["n_classes"] == 2 and summary["classes"] == [1, 2]
    assert summary["mean"]["dice"] == pytest.approx((0.8 + 0.0) / 2)
    assert summary["mean"]["asd_mm"] == pytest.approx(metrics[1].asd_mm)  # class 2 infinite: left out
    assert summary["n_infinite_distance"] == 1
    assert isinstance(metrics[0], ClassMetrics) and metrics[0].name == "background"


def test_merge_instance_labels_and_say_what_was_evaluated(tmp_path, capsys) -> None:
    from napari_spineseg.cli import main
    from napari_spineseg.io import write_labels
    from napari_spineseg.metrics import merge_labels, parse_merge
    from napari_spineseg.volume import Volume

    assert parse_merge("1-3=1") == {1: 1, 2: 1, 3: 1}
    assert parse_merge(["1,5=2", "7=0"]) == {1: 2, 5: 2, 7: 0}
    with pytest.raises(InputError, match="1-7=1"):
        parse_merge("1-7")
    instances = np.zeros((30, 10, 10), np.uint8)
    for value, start in enumerate((4, 12, 20), start=1):  # one value per vertebra along the S-I axis
        instances[start : start + 6, 2:8, 2:8] = value
    np.testing.assert_array_equal(merge_labels(instances, {1: 1, 2: 1, 3: 1}), (instances > 0).astype(np.uint8))

    truth = Volume.from_array(instances, spacing=(1.0, 1.0, 2.0))
    write_labels(instances, tmp_path / "truth.nii.gz", truth.geometry)
    write_labels((instances > 0).astype(np.uint8), tmp_path / "pred.nii.gz", truth.geometry)
    args = ["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "truth.nii.gz"), "--no-surface", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["classes"][0]["dice"] < 0.6 and "--merge 1-7=1" in captured.err  # the hint
    assert main([*args, "--merge", "1-3=1"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [c["dice"] for c in record["classes"]] == [1.0]
    assert record["evaluated"].startswith("labelled span of the truth only: slices 4-25 of 30")
    assert main([*args[:-1], "--merge", "1-3=1"]) == 0
    assert capsys.readouterr().out.startswith("evaluated: labelled span")
