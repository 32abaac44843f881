"""Vertebral level identification: numbering, the sacrum anchor, "uncertain", corrections and files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_spineseg.errors import InputError
from napari_spineseg.io import read_volume
from napari_spineseg.levels import (
    identify_levels,
    level_name,
    level_value,
    mark_uncertain,
    read_levels,
    renumber,
    sidecar_path,
    write_levels,
)
from napari_spineseg.phantom import make_phantom
from napari_spineseg.schema import INTERVERTEBRAL_DISC, LESION, VERTEBRAL_BODY
from napari_spineseg.volume import Volume


@pytest.fixture(scope="module")
def phantom():
    """A T2 phantom (T10..S1 in view, lordotic, two lesions) whose lumbosacral junction is recognisable."""
    return make_phantom(seed=0, contrast="T2", lesions=2)


def _centre(phantom, name: str) -> tuple[int, int, int] | None:
    """Array index (z, y, x) of a level's centre, or None outside the grid."""
    x, y, z = (round(c) for c in phantom.labels.metadata["level_centres_index"][name])
    shape = phantom.labels.array.shape
    return (z, y, x) if 0 <= z < shape[0] and 0 <= y < shape[1] and 0 <= x < shape[2] else None


def test_level_values_follow_the_verse_numbering() -> None:
    assert [level_value(n) for n in ("C1", "C7", "T1", "T12", "L1", "L5", "L6", "S1")] == [1, 7, 8, 19, 20, 24, 25, 26]
    assert level_value("L4/L5") == 123 and level_value("L5/S1") == 124 and level_value("T12/L1") == 119
    assert level_name(22) == "L3" and level_name(124) == "L5/S1" and level_name(124, has_l6=True) == "L5/L6"
    assert level_name(125) == "L6/S1" and level_name(107) == "C7/T1"
    with pytest.raises(InputError):
        level_value("X3")
    with pytest.raises(InputError):
        level_name(99)


def test_phantom_levels_are_named_t10_to_s1(phantom) -> None:
    result = identify_levels(phantom.labels)
    assert result.status == "named", result.reason
    bodies = [i.name for i in result.instances if i.kind == "body"]
    assert bodies == phantom.levels  # T10 .. S1, superior -> inferior
    discs = [i.name for i in result.instances if i.kind == "disc"]
    assert discs[-3:] == ["L3/L4", "L4/L5", "L5/S1"]
    checked = 0
    for name in phantom.levels:
        centre = _centre(phantom, name)
        if centre is not None and phantom.labels.array[centre] == VERTEBRAL_BODY:
            assert result.level_map[centre] == level_value(name), name
            checked += 1
    assert checked >= 8
    # Only body and disc voxels carry levels; every one of the bodies and discs in the chain does.
    labels = phantom.labels.array
    assert set(np.unique(labels[result.level_map > 0])) <= {VERTEBRAL_BODY, INTERVERTEBRAL_DISC}
    assert np.all(result.level_map[(labels == LESION)] == 0)
    assert set(np.unique(result.level_map[result.level_map < 100]).tolist()) == {0, *map(level_value, bodies)}
    disc_values = np.unique(result.level_map[labels == INTERVERTEBRAL_DISC])
    assert {level_value(d) for d in discs} <= set(disc_values.tolist())
    # Measurements: lumbar bodies are 20-35 mm tall, discs 5-20 mm.
    l3 = result.instance("L3")
    assert l3 is not None and 20 < l3.height_mm < 35 and l3.confidence > 0.5 and l3.volume_mm3 > 10000
    assert 5 < result.instance("L3/L4").height_mm < 20


def test_lesions_are_located_by_level(phantom) -> None:
    result = identify_levels(phantom.labels)
    lesions, count = ndimage.label(phantom.labels.array == LESION)
    assert count == len(phantom.lesion_levels) == 2
    found = sorted(result.level_of(lesions == k) for k in range(1, count + 1))
    assert found == sorted(phantom.lesion_levels)


def _cropped(phantom, last_row: int) -> Volume:
    """The phantom's labels with the field of view ending at ``last_row`` (PIR: array axis 1 runs inferior)."""
    array = np.ascontiguousarray(phantom.labels.array[:, :last_row, :])
    geometry = phantom.labels.geometry
    return Volume.from_array(array, geometry.spacing, geometry.origin, geometry.direction, name="cropped")


def test_uncertain_when_the_sacrum_is_cropped_away(phantom) -> None:
    l5 = _centre(phantom, "L5")
    s1 = _centre(phantom, "S1")
    for last_row in (l5[1] + 3, (l5[1] + s1[1]) // 2):  # through L5; through the L5/S1 disc
        result = identify_levels(_cropped(phantom, last_row))
        assert result.status == "uncertain"
        assert result.reason
        assert not result.level_map.any()
        assert all(i.value == 0 and i.name == "" and i.confidence == 0 for i in result.instances)
        assert result.instances  # still listed, unnamed


def test_body_only_disc_only_and_empty_maps_are_uncertain(phantom) -> None:
    labels = phantom.labels
    bodies = labels.with_array(np.where(labels.array == VERTEBRAL_BODY, 1, 0).astype(np.uint8))
    discs = labels.with_array(np.where(labels.array == INTERVERTEBRAL_DISC, 2, 0).astype(np.uint8))
    empty = labels.with_array(np.zeros_like(labels.array))
    assert "no intervertebral disc" in identify_levels(bodies).reason
    assert "no vertebral body" in identify_levels(discs).reason
    assert identify_levels(empty).status == "uncertain"
    with pytest.raises(InputError):
        identify_levels(np.zeros((4, 4, 4), np.uint8))  # no geometry


def test_bodies_merged_across_a_disc_are_split(phantom) -> None:
    """A bridge of body voxels through the L3/L4 disc merges L3 and L4: they are split at the disc."""
    array = phantom.labels.array.copy()
    l3, l4 = _centre(phantom, "L3"), _centre(phantom, "L4")
    z, x = l3[0], (l3[2] + l4[2]) // 2
    array[z - 2 : z + 3, l3[1] : l4[1], x - 2 : x + 3] = VERTEBRAL_BODY
    bridged = phantom.labels.with_array(array)
    assert ndimage.label(array == VERTEBRAL_BODY)[0][l3] == ndimage.label(array == VERTEBRAL_BODY)[0][l4]
    result = identify_levels(bridged)
    assert result.status == "named", result.reason
    assert result.level_map[l3] == level_value("L3") and result.level_map[l4] == level_value("L4")
    assert [i.name for i in result.instances if i.kind == "body"] == phantom.levels


def test_renumbering_round_trips_through_the_writer(phantom, tmp_path: Path) -> None:
    result = identify_levels(phantom.labels)
    up = renumber(result, -1)  # every name one level higher: S1 -> L5, L5/S1 -> L4/L5, T10 -> T9
    assert up.status == "named" and "renumbered by -1" in up.reason
    assert [i.name for i in up.instances if i.kind == "body"][-3:] == ["L3", "L4", "L5"]
    assert up.instance("L4/L5") is not None and up.instance("S1") is None
    l5 = _centre(phantom, "L5")
    assert up.level_map[l5] == level_value("L4")
    path = tmp_path / "levels.nii.gz"
    sidecar = write_levels(up, path, phantom.labels)
    assert sidecar == tmp_path / "levels.json" == sidecar_path(path)
    record = json.loads(sidecar.read_text())
    assert record["status"] == "named" and record["uncertain"] is False
    assert record["labels"]["123"] == "L4/L5" and record["labels"]["24"] == "L5"
    back = read_levels(path)
    assert read_volume(path).geometry.is_close(phantom.labels.geometry)
    assert np.array_equal(back.level_map, up.level_map)
    assert [(i.name, i.kind) for i in back.instances] == [(i.name, i.kind) for i in up.instances]
    again = renumber(back, +1)  # and back again
    assert np.array_equal(again.level_map, result.level_map)
    assert [i.name for i in again.instances] == [i.name for i in result.instances]
    with pytest.raises(InputError):
        renumber(result, +1)  # S1 cannot move further down


def test_mark_uncertain_clears_names_and_is_written(phantom, tmp_path: Path) -> None:
    result = mark_uncertain(identify_levels(phantom.labels), "checked by hand: transitional L5")
    assert result.status == "uncertain" and result.reason == "checked by hand: transitional L5"
    assert not result.level_map.any() and not result.names()
    with pytest.raises(InputError):
        renumber(result, 1)
    sidecar = write_levels(result, tmp_path / "levels.mha", phantom.labels)
    record = json.loads(sidecar.read_text())
    assert record["uncertain"] is True and record["reason"] == "checked by hand: transitional L5"
    assert record["labels"] == {} and len(record["instances"]) == len(result.instances)
    assert read_levels(tmp_path / "levels.mha").status == "uncertain"


# --- real data -----------------------------------------------------------------------------------
def test_real_ground_truth_maps_alone_are_uncertain(data_dir: Path) -> None:
    """VB3 labels bodies L1..L5 only, IVD discs only, neither the sacrum: no anchor, so no names."""
    vb3 = read_volume(data_dir / "lumbar-mri" / "VB3" / "01_seg.nii.gz")
    ivd = read_volume(data_dir / "lumbar-mri" / "IVD" / "11_seg.nii.gz")
    bodies = identify_levels(vb3.with_array(np.where(vb3.array > 0, 1, 0).astype(np.uint8)))
    discs = identify_levels(ivd.with_array(np.where(ivd.array > 0, 2, 0).astype(np.uint8)))
    assert bodies.status == discs.status == "uncertain"
    assert len([i for i in bodies.instances if i.kind == "body"]) == 5  # five separate bodies, none merged
    assert len(discs.instances) == 5


@pytest.mark.slow
def test_cli_segment_names_the_levels_of_a_held_out_real_study(data_dir: Path, tmp_path: Path) -> None:
    """The bundled model on VB3-02 (never trained on): L1..L5 named as the ground truth says.

    (Version 4 of the model leaves VB3-01 "uncertain": it does not segment that study's sacrum.)"""
    from napari_spineseg.cli import main

    study = data_dir / "lumbar-mri" / "VB3" / "02_img.nii.gz"
    levels = tmp_path / "out" / "02_levels.nii.gz"
    args = ["segment", str(study), "-o", str(tmp_path / "out" / "02_seg.nii.gz"), "--levels", str(levels)]
    assert main([*args, "--device", "cpu", "-q"]) == 0
    result = read_levels(levels)
    assert result.status == "named", result.reason
    assert read_volume(levels).geometry == read_volume(study).geometry
    truth = read_volume(data_dir / "lumbar-mri" / "VB3" / "02_seg.nii.gz").array
    for label in range(1, 6):  # 1..5 = L1..L5
        values = result.level_map[truth == label]
        assert np.bincount(values[values > 0]).argmax() == 19 + label
    assert json.loads((tmp_path / "out" / "02_levels.json").read_text())["labels"]["124"] == "L5/S1"


@pytest.mark.slow
def test_held_out_ivd_discs_are_named(data_dir: Path) -> None:
    """The bundled model on IVD-11 (never trained on): discs L5/S1..L1/L2 (values 1..5) named."""
    from napari_spineseg.inference import Predictor, SegmentationSettings

    predictor = Predictor(SegmentationSettings(device="cpu"))
    predictor.load("spineseg-default")
    study = read_volume(data_dir / "lumbar-mri" / "IVD" / "11_img.nii.gz")
    result = identify_levels(predictor.predict(study).labels)
    assert result.status == "named", result.reason
    truth = read_volume(data_dir / "lumbar-mri" / "IVD" / "11_seg.nii.gz").array
    for label in range(1, 6):  # 1 = L5/S1 (124) .. 5 = L1/L2 (120)
        values = result.level_map[truth == label]
        assert np.bincount(values[values > 100]).argmax() == 125 - label


def test_report_names_levels_or_says_why_not(phantom) -> None:
    from napari_spineseg.report import build_report

    report = build_report(phantom.image, phantom.labels, overlay=False)
    bodies = [r["name"] for r in report["levels"] if r["value"] == VERTEBRAL_BODY]
    # The review never lists a fragment as a level: the phantom's T10 is a sliver at the edge of view.
    assert bodies == phantom.levels[1:] and phantom.levels[0] == "T10"
    assert "L4/L5" in [r["name"] for r in report["levels"]]
    assert sorted(x["level"] for x in report["lesions"]) == sorted(phantom.lesion_levels)
    assert all(f"in {name}" in report["lesion_summary"] for name in phantom.lesion_levels)
    l5 = _centre(phantom, "L5")
    cropped = _cropped(phantom, l5[1] + 3)
    image = Volume(np.ascontiguousarray(phantom.image.array[:, : l5[1] + 3, :]), cropped.geometry)
    report = build_report(image, cropped, overlay=False)
    assert report["level_identification"]["status"] == "uncertain"
    assert report["level_naming"].startswith("Levels uncertain (")
    assert report["levels"][0]["name"] in ("body 1", "disc above body 1")


def test_cli_segment_levels_writes_map_and_sidecar_even_when_uncertain(phantom, tmp_path: Path, capsys) -> None:
    """A tiny untrained model finds no spine: the level map (study geometry) and an "uncertain" sidecar."""
    import torch

    from napari_spineseg.cli import main
    from napari_spineseg.io import write_volume
    from napari_spineseg.modelfile import ModelMetadata, save_model
    from napari_spineseg.models import build_model

    torch.manual_seed(0)
    network = build_model("unet", in_channels=1, num_classes=5, base=4, depth=2)
    metadata = ModelMetadata("tiny", "unet", network.arch_kwargs, preprocess={"pixel_spacing_mm": 4.0})
    model = save_model(network, metadata, tmp_path / "tiny.safetensors")
    study = write_volume(phantom.image, tmp_path / "study.nrrd")
    common = ["--model", str(model), "--planes", "sagittal", "--device", "cpu", "-q"]
    assert (
        main(["segment", str(study), "-o", str(tmp_path / "seg.nrrd"), "--levels", str(tmp_path / "lv.nrrd"), *common])
        == 0
    )
    assert "levels uncertain" in capsys.readouterr().out
    assert read_volume(tmp_path / "lv.nrrd").geometry.is_close(phantom.image.geometry)
    record = json.loads((tmp_path / "lv.json").read_text())
    assert record["uncertain"] is True and record["reason"] and record["labels"] == {}
    # A file name that is no label format is refused with one line.
    assert (
        main(["segment", str(study), "-o", str(tmp_path / "s2.nrrd"), "--levels", str(tmp_path / "x.txt"), *common])
        == 1
    )
    assert "--levels" in capsys.readouterr().err


def test_dicom_seg_has_one_coded_segment_per_level_and_reads_back(phantom, tmp_path: Path) -> None:
    import pydicom

    from napari_spineseg.dicomseg import read_dicom_seg, write_dicom_series
    from napari_spineseg.io import read_volumes
    from napari_spineseg.levels import level_classes, write_levels_dicom_seg

    write_dicom_series(phantom.image, tmp_path / "series")
    (study,) = read_volumes(tmp_path / "series")
    assert study.geometry.is_close(phantom.labels.geometry)
    result = identify_levels(phantom.labels.array, study.geometry)
    path = write_levels_dicom_seg(result, study, tmp_path / "levels.dcm")
    segments = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0] for s in pydicom.dcmread(path).SegmentSequence}
    assert set(segments) == set(result.names().values())
    assert (segments["L3"].CodeValue, segments["L3"].CodeMeaning) == ("36470004", "L3 vertebra")
    assert segments["L4/L5"].CodeMeaning == "L4/L5 disc" and segments["S1"].CodeMeaning == "Sacrum"
    back = read_dicom_seg(path, study, classes=level_classes(result))
    assert np.array_equal(back.array, result.level_map)
    with pytest.raises(InputError):
        write_levels_dicom_seg(mark_uncertain(result, "unsure"), study, tmp_path / "none.dcm")


def test_napari_levels_layer_names_levels_on_hover(phantom) -> None:
    from napari.layers import Labels

    from napari_spineseg._napari_layers import LEVELS_KEY, levels_layer_data

    result = identify_levels(phantom.labels)
    data, kwargs, kind = levels_layer_data(result, "study levels")
    layer = Labels(data, **kwargs)
    assert kind == "labels" and np.array_equal(layer.data, result.level_map)
    names = dict(zip(layer.features["index"], layer.features["name"]))
    assert names[22] == "L3" and names[123] == "L4/L5" and names[0] == "background"
    assert kwargs["metadata"][LEVELS_KEY]["status"] == "named"
    l3 = _centre(phantom, "L3")
    assert names[int(layer.data[l3])] == "L3"  # hover shows the features name of the value under the cursor
    assert np.allclose(layer.scale, phantom.labels.geometry.spacing_zyx)


def test_a_renumbered_result_carries_to_the_report(phantom) -> None:
    from napari_spineseg.report import build_report

    shifted = renumber(identify_levels(phantom.labels), -1)
    report = build_report(phantom.image, phantom.labels, overlay=False, levels=shifted)
    bodies = [r["name"] for r in report["levels"] if r["value"] == VERTEBRAL_BODY]
    assert bodies[-2:] == ["L4", "L5"]  # was L5, S1
    assert "renumbered by -1" in report["level_naming"]


def test_nothing_is_named_above_a_gap_in_the_alternation(phantom) -> None:
    """Without the T11/T12 disc the count cannot cross it: T12..S1 named, the bodies above not."""
    array = phantom.labels.array.copy()
    t11, t12 = _centre(phantom, "T11"), _centre(phantom, "T12")
    discs, _ = ndimage.label(array == INTERVERTEBRAL_DISC)
    between = discs[:, t11[1] : t12[1], :]
    (gap,) = [v for v in np.unique(between[between > 0]) if (between == v).sum() > 0.5 * (discs == v).sum()]
    array[discs == gap] = 0
    result = identify_levels(phantom.labels.with_array(array))
    assert result.status == "named" and "not named" in result.reason
    bodies = [i.name for i in result.instances if i.kind == "body"]
    assert bodies == ["", "", *phantom.levels[2:]]  # T10, T11 unnamed; T12 .. S1
    assert result.level_map[t11] == 0 and result.level_map[t12] == level_value("T12")


def test_cli_report_names_levels_from_a_corrected_level_map(phantom, tmp_path: Path) -> None:
    """`spineseg report --levels` takes a level map corrected by hand (here renumbered by -1)."""
    from napari_spineseg.cli import main
    from napari_spineseg.io import write_labels, write_volume

    study = write_volume(phantom.image, tmp_path / "study.nii.gz")
    seg = write_labels(phantom.labels, tmp_path / "study_seg.nii.gz")
    write_levels(renumber(identify_levels(phantom.labels), -1), tmp_path / "levels.nii.gz", phantom.labels.geometry)
    out = tmp_path / "report.json"
    assert (
        main(
            [
                "report",
                str(study),
                str(seg),
                "-o",
                str(out),
                "--model",
                "none",
                "--levels",
                str(tmp_path / "levels.nii.gz"),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    bodies = [r["name"] for r in report["levels"] if r["value"] == VERTEBRAL_BODY]
    assert bodies[-2:] == ["L4", "L5"]  # the automatic naming says L5, S1


def test_sacrum_missing_from_the_segmentation_is_anchored_on_the_l5s1_disc(phantom) -> None:
    """No sacrum body under the L5/S1 disc: counted up from L5 when that disc leans like L5/S1."""
    full = identify_levels(phantom.labels)
    labels = phantom.labels.array.copy()
    labels[full.level_map == level_value("S1")] = 0
    result = identify_levels(phantom.labels.with_array(labels))
    assert result.status == "named", result.reason
    assert [i.name for i in result.instances if i.kind == "body"] == phantom.levels[:-1]  # T10 .. L5
    assert [i.name for i in result.instances if i.kind == "disc"][-1] == "L5/S1"
    assert "sacrum is not in the segmentation" in result.reason
    assert result.instance("L3").confidence < full.instance("L3").confidence
    # Without the L5 body too, the lowest disc is L4/L5 under L4: it does not lean like L5/S1.
    labels[full.level_map == level_value("L5")] = 0
    assert identify_levels(phantom.labels.with_array(labels)).status == "uncertain"


@pytest.mark.slow
def test_held_out_vb3_study_with_a_segmented_sacral_remnant_is_named(data_dir: Path) -> None:
    """VB3-01: the model marks the small S1/S2 disc inside the sacrum; L1..L5 still named as the truth says."""
    from napari_spineseg.inference import Predictor, SegmentationSettings

    predictor = Predictor(SegmentationSettings(device="cpu"))
    predictor.load("spineseg-default")
    result = identify_levels(predictor.predict(read_volume(data_dir / "lumbar-mri" / "VB3" / "01_img.nii.gz")).labels)
    assert result.status == "named", result.reason
    truth = read_volume(data_dir / "lumbar-mri" / "VB3" / "01_seg.nii.gz").array
    for label in range(1, 6):  # 1..5 = L1..L5
        values = result.level_map[truth == label]
        assert np.bincount(values[(values > 0) & (values < 100)]).argmax() == 19 + label
