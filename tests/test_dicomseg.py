"""DICOM Segmentation export: read-back on the real series and on series written from a NIfTI study."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from napari_spineseg.cli import main
from napari_spineseg.dicomseg import SEGMENT_CODES, read_dicom_seg, write_dicom_seg, write_dicom_series
from napari_spineseg.errors import GeometryMismatchError, InputError, VolumeWriteError
from napari_spineseg.io import read_volume
from napari_spineseg.modelfile import ModelMetadata, save_model
from napari_spineseg.models import build_model
from napari_spineseg.schema import DEFAULT_CLASSES
from napari_spineseg.volume import Geometry, Volume

SECRET_NAME, SECRET_ID = "SECRETNAME^PATIENT", "SECRET-ID-4711"


@pytest.fixture(scope="module")
def real_series(data_dir: Path) -> Path:
    return data_dir / "dicom-sagittal-series" / "series"


@pytest.fixture(scope="module")
def real_study(real_series: Path) -> Volume:
    return read_volume(real_series)


@pytest.fixture(scope="module")
def nifti_crop(data_dir: Path) -> Volume:
    """A small real-anatomy block (12 × 40 × 40) with anisotropic spacing and a non-zero origin."""
    study = read_volume(data_dir / "lumbar-mri" / "VB3" / "01_img.nii.gz")
    crop = np.ascontiguousarray(study.array[10:70:5, 60:100, 80:120])
    return Volume(crop, Geometry(crop.shape[::-1], (0.9, 1.1, 3.0), (12.5, -30.25, 40.0)), name="crop")


def box_labels(shape: tuple[int, ...]) -> np.ndarray:
    """Classes 1-4 in boxes on some slices; the other slices stay empty."""
    labels = np.zeros(shape, dtype=np.uint8)
    z, y, x = shape
    labels[z // 6 : z // 3, y // 4 : y // 2, x // 4 : x // 2] = 1
    labels[z // 3 : z // 3 + 2, y // 2 : y // 2 + 6, x // 3 : x // 3 + 8] = 2
    labels[z // 2 : z // 2 + 4, 2 : y // 5, x // 2 : x // 2 + 5] = 3
    labels[z // 6 + 1, y // 4 + 2 : y // 4 + 5, x // 4 + 2 : x // 4 + 5] = 4  # inside class 1: overwrites it
    return labels


def source_positions(series: Path) -> dict[str, np.ndarray]:
    """SOP Instance UID -> ImagePositionPatient of every file of a series."""
    positions = {}
    for file in series.iterdir():
        dataset = pydicom.dcmread(file, stop_before_pixels=True)
        positions[str(dataset.SOPInstanceUID)] = np.asarray([float(v) for v in dataset.ImagePositionPatient])
    return positions


def check_frames_on_source_slices(seg_path: Path, series: Path, geometry: Geometry, labels: np.ndarray) -> None:
    """Every frame sits at its referenced source slice's position and holds that slice's class voxels."""
    positions = source_positions(series)
    seg = pydicom.dcmread(seg_path)
    values = {
        int(s.SegmentNumber): next(c.value for c in DEFAULT_CLASSES if c.name == s.SegmentLabel)
        for s in seg.SegmentSequence
    }
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    normal, spacing_z = geometry.direction_matrix[:, 2], geometry.spacing[2]
    expected_frames = sum(int(np.any(labels[k] == v)) for k in range(labels.shape[0]) for v in values.values())
    assert len(frames) == expected_frames  # empty frames omitted
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        position = np.asarray([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        referenced = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(position, positions[str(referenced)], atol=1e-4)
        k = round(float((position - np.asarray(geometry.origin)) @ normal) / spacing_z)
        np.testing.assert_allclose(position, geometry.index_to_lps([[0, 0, k]])[0], atol=1e-3)
        value = values[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        np.testing.assert_array_equal(frame.astype(bool), labels[k] == value)


# (a) the real DICOM series -------------------------------------------------------------------


def test_real_series_export_reads_back_identically(real_series: Path, real_study: Volume, tmp_path: Path) -> None:
    import highdicom as hd

    labels = real_study.with_array(box_labels(real_study.shape), name="labels")
    model = ModelMetadata("spine-test-model", "unet", {}, version="3.1.4")
    out = write_dicom_seg(labels, real_study, tmp_path / "seg.dcm", model_metadata=model)

    seg = hd.seg.segread(out)
    assert seg.SeriesDescription == "spineseg spine-test-model"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == real_study.metadata["dicom"]["series_instance_uid"]
    assert seg.FrameOfReferenceUID == real_study.metadata["dicom"]["frame_of_reference_uid"]
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [c.name for c in DEFAULT_CLASSES[1:]]
    for item, label_class in zip(seg.SegmentSequence, DEFAULT_CLASSES[1:]):
        coding = SEGMENT_CODES[label_class.name]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == coding.type[0]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == coding.category[0]
        rgb = hd.color.CIELabColor.from_dicom_value(tuple(item.RecommendedDisplayCIELabValue)).to_rgb()
        np.testing.assert_allclose(rgb, [255 * c for c in label_class.color[:3]], atol=2)
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("spine-test-model", "3.1.4")
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # DCM Artificial Intelligence
    codes = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert codes == {
        "vertebral body": "3572006",
        "intervertebral disc": "360499006",
        "spinal canal": "61853006",
        "lesion": "52988006",
    }

    # highdicom's own reader, frames looked up by the source instances in our slice order
    order = sorted(
        source_positions(real_series).items(), key=lambda item: item[1] @ real_study.geometry.direction_matrix[:, 2]
    )
    by_source = seg.get_pixels_by_source_instance(
        [uid for uid, _ in order], combine_segments=True, assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(by_source, labels.array)  # segment numbers 1..4 are the class values here
    check_frames_on_source_slices(out, real_series, real_study.geometry, labels.array)
    back = read_dicom_seg(out, real_series)
    assert back.geometry.is_close(real_study.geometry)
    np.testing.assert_array_equal(back.array, labels.array)


def test_segments_only_for_present_classes_and_manual_without_model(real_study: Volume, tmp_path: Path) -> None:
    array = np.zeros(real_study.shape, dtype=np.uint8)
    array[5:9, 10:20, 10:20] = 4
    array[30, 40:50, 40:50] = 2
    array[50, 5:8, 5:8] = 6  # a value outside the schema: generic "Tissue" coding, name "class 6"
    out = write_dicom_seg(real_study.with_array(array), None, tmp_path / "seg.dcm")  # source from labels' metadata
    seg = pydicom.dcmread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["intervertebral disc", "lesion", "class 6"]
    assert seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"
    assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"MANUAL"}
    assert int(seg.NumberOfFrames) == 6  # 4 + 1 + 1 non-empty (slice, segment) frames
    np.testing.assert_array_equal(read_dicom_seg(out, real_study).array, array)
    array[array != 4] = 0  # one segment: highdicom shares its identification across frames
    out = write_dicom_seg(real_study.with_array(array), None, tmp_path / "one.dcm")
    np.testing.assert_array_equal(read_dicom_seg(out, real_study).array, array)


# (b) series written from a NIfTI study in several orientations ------------------------------------

_ROTATION = np.array(  # 20° about x, then 35° about z: a doubly oblique grid
    [[0.819152, -0.573576, 0.0], [0.573576, 0.819152, 0.0], [0.0, 0.0, 1.0]]
) @ np.array([[1.0, 0.0, 0.0], [0.0, 0.939693, -0.342020], [0.0, 0.342020, 0.939693]])

ORIENTATIONS = {
    "axial": np.eye(3),
    "sagittal": np.column_stack([[0, 1, 0], [0, 0, -1], [-1, 0, 0]]),  # P, I, R
    "coronal": np.column_stack([[1, 0, 0], [0, 0, -1], [0, 1, 0]]),  # L, I, P
    "oblique": _ROTATION,
    "left-handed": np.column_stack([[-1, 0, 0], [0, 1, 0], [0, 0, 1]]),  # R, P, S: slices against the normal
}


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_nifti_study_as_dicom_series_and_seg_round_trip(orientation: str, nifti_crop: Volume, tmp_path: Path) -> None:
    direction = ORIENTATIONS[orientation]
    geometry = Geometry(nifti_crop.geometry.size, nifti_crop.spacing, nifti_crop.origin, tuple(direction.ravel()))
    study = Volume(nifti_crop.array, geometry, name=f"crop {orientation}")
    series = tmp_path / "series"
    files = write_dicom_series(study, series, patient_name=SECRET_NAME, patient_id=SECRET_ID)
    assert len(files) == study.shape[0]

    read = read_volume(series)
    if np.linalg.det(direction) > 0:
        expected = study
    else:  # readers sort slices along the row x column normal: k reversed, voxels at the same positions
        flipped = direction * np.array([1, 1, -1])
        origin = geometry.index_to_lps([[0, 0, geometry.size[2] - 1]])[0]
        expected = Volume(study.array[::-1], Geometry(geometry.size, geometry.spacing, tuple(origin), flipped.ravel()))
    assert read.geometry.is_close(expected.geometry), read.geometry.describe_difference(expected.geometry)
    np.testing.assert_array_equal(read.array, expected.array)

    # labels on the study's own grid (left-handed included) and on the grid the series reads back as
    labels = (study.array > np.percentile(study.array, 60)).astype(np.uint8)
    labels[study.array > np.percentile(study.array, 90)] = 4
    labels[:, :3, :] = 3
    out = write_dicom_seg(study.with_array(labels), series, tmp_path / "seg.dcm")
    np.testing.assert_array_equal(read_dicom_seg(out, geometry).array, labels)
    back = read_dicom_seg(out, series)  # grid from the series itself
    assert back.geometry.is_close(read.geometry)
    np.testing.assert_array_equal(back.array, labels if expected is study else labels[::-1])
    check_frames_on_source_slices(out, series, geometry, labels)


def test_float_study_series_keeps_intensities_through_rescale(nifti_crop: Volume, tmp_path: Path) -> None:
    study = nifti_crop.with_array(nifti_crop.array * 0.37 - 5.1)
    write_dicom_series(study, tmp_path / "series")
    read = read_volume(tmp_path / "series")
    value_range = float(study.array.max() - study.array.min())
    np.testing.assert_allclose(read.array, study.array, atol=value_range / 65535)


# (c) errors --------------------------------------------------------------------------------------


def test_labels_on_another_grid_are_refused(real_study: Volume, tmp_path: Path) -> None:
    array = box_labels(real_study.shape)
    origin = real_study.geometry.index_to_lps([[0, 0, 1]])[0]  # one slice off: 62 of 63 slices would match
    shifted = Geometry(real_study.geometry.size, real_study.spacing, tuple(origin), real_study.direction)
    for wrong in (
        Volume(array[1:], Geometry(array[1:].shape[::-1], real_study.spacing, real_study.origin, real_study.direction)),
        Volume(array, shifted),
        Volume(array, Geometry(real_study.geometry.size, (2.0, 2.0, 2.2), real_study.origin, real_study.direction)),
    ):
        with pytest.raises(GeometryMismatchError, match="not on the source DICOM series' grid"):
            write_dicom_seg(wrong, real_study, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_non_dicom_source_and_empty_labels_are_clear_errors(
    nifti_crop: Volume, real_study: Volume, tmp_path: Path
) -> None:
    labels = nifti_crop.with_array(box_labels(nifti_crop.shape))
    with pytest.raises(InputError, match="DICOM-SEG needs a DICOM source series"):
        write_dicom_seg(labels, nifti_crop, tmp_path / "seg.dcm")
    nifti = tmp_path / "study.nii.gz"
    nifti.write_bytes(b"not read")
    with pytest.raises(InputError, match="DICOM-SEG needs a DICOM source series"):
        write_dicom_seg(labels, nifti, tmp_path / "seg.dcm")
    empty = real_study.with_array(np.zeros(real_study.shape, dtype=np.uint8))
    with pytest.raises(InputError, match="no labelled voxels"):
        write_dicom_seg(empty, real_study, tmp_path / "seg.dcm")
    with pytest.raises(VolumeWriteError, match="new or empty directory"):
        write_dicom_series(nifti_crop, tmp_path)
    assert not list(tmp_path.glob("*.dcm"))


def test_cli_refuses_dicom_seg_for_a_nifti_study(
    nifti_crop: Volume, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from napari_spineseg.io import write_volume

    study = write_volume(nifti_crop, tmp_path / "study.nii.gz")
    assert main(["segment", str(study), "-o", str(tmp_path / "out.dcm"), "-q"]) == 1
    assert "DICOM-SEG needs a DICOM source series" in capsys.readouterr().err
    assert not (tmp_path / "out.dcm").exists()


# (d, e) CLI round trip on the real series, with patient identifiers kept out of every log ----------


@pytest.fixture(scope="module")
def cli_runs(real_series: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``segment -o x.nii.gz --dicom-seg`` and ``segment -o x.dcm`` with -v; all output captured."""
    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    network = build_model("unet", in_channels=1, num_classes=5, base=4, depth=2)
    last = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    thresholds = np.array([0.0, 0.0075, 0.009, 0.0105, 0.0112])  # a feature level per class: all 5 appear
    with torch.no_grad():
        last.weight.zero_()
        for c in range(5):
            last.weight[c, 0] = 1e4 * c
            last.bias[c] = -1e4 * thresholds[: c + 1].sum()
    metadata = ModelMetadata("tiny", "unet", network.arch_kwargs, preprocess={"pixel_spacing_mm": 2.0}, version="2.5")
    model = save_model(network, metadata, folder / "tiny.safetensors")
    common = ["--model", str(model), "--planes", "sagittal", "--device", "cpu", "--precision", "fp32"]
    runs = {
        "nifti+seg": ["-o", str(folder / "out.nii.gz"), "--dicom-seg", str(folder / "extra.dcm")],
        "dcm": ["-o", str(folder / "out.dcm")],
    }
    stream, records = io.StringIO(), []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    codes = {}
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stream):
            warnings.simplefilter("always")
            with contextlib.redirect_stderr(stream):
                for name, args in runs.items():
                    codes[name] = main(["-v", "segment", str(real_series), *args, *common])
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    text = stream.getvalue() + "\n".join(r.getMessage() for r in records) + "\n".join(str(w.message) for w in caught)
    return {"folder": folder, "codes": codes, "text": text}


def test_cli_dicom_seg_outputs_match_the_nifti_labels(cli_runs: dict, real_series: Path, real_study: Volume) -> None:
    folder = cli_runs["folder"]
    assert cli_runs["codes"] == {"nifti+seg": 0, "dcm": 0}
    labels = read_volume(folder / "out.nii.gz")
    assert set(np.unique(labels.array)) >= {0, 1, 4}
    for name in ("extra.dcm", "out.dcm"):
        back = read_dicom_seg(folder / name, real_series)
        assert back.geometry.is_close(real_study.geometry)
        np.testing.assert_array_equal(back.array, labels.array)
        seg = pydicom.dcmread(folder / name)
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("tiny", "2.5")
    assert "DICOM-SEG" in cli_runs["text"]  # -v logged the export


def test_patient_identifiers_never_reach_logs(cli_runs: dict, real_series: Path) -> None:
    source = pydicom.dcmread(next(real_series.iterdir()), stop_before_pixels=True)
    name, patient_id = str(source.PatientName), str(source.PatientID)
    assert name and patient_id
    text = cli_runs["text"].lower()
    assert name.lower() not in text and patient_id.lower() not in text
    assert name.split()[0].lower() not in text  # not even a part of it
    seg = pydicom.dcmread(cli_runs["folder"] / "out.dcm")
    # copied only because the Segmentation belongs to the source's patient and study (Patient/Study modules)
    assert (str(seg.PatientName), seg.PatientID, seg.StudyInstanceUID) == (name, patient_id, source.StudyInstanceUID)


def test_synthetic_patient_identifiers_stay_out_of_logs(
    nifti_crop: Volume, tmp_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    caplog.set_level(logging.DEBUG)
    write_dicom_series(nifti_crop, tmp_path / "series", patient_name="Lonely", patient_id=SECRET_ID)
    study = read_volume(tmp_path / "series")
    write_dicom_seg(study.with_array(box_labels(study.shape)), study, tmp_path / "seg.dcm")
    text = caplog.text + " ".join(str(w.message) for w in recwarn)
    assert "Lonely" not in text and SECRET_ID not in text  # highdicom warns about such one-part names: swallowed


# napari writer (no display needed: the writer is a plain function) ---------------------------------


def test_napari_writer_exports_a_labels_layer_of_a_dicom_study(
    real_series: Path, real_study: Volume, tmp_path: Path
) -> None:
    from napari_spineseg._napari_layers import CLASSES_KEY, GEOMETRY_KEY
    from napari_spineseg._writer import write_dicom_seg_layer

    array = box_labels(real_study.shape)
    meta = {
        "name": "segmentation",
        "scale": real_study.geometry.spacing_zyx,
        "translate": real_study.geometry.origin_zyx,
        "metadata": {
            GEOMETRY_KEY: real_study.geometry.to_dict(),
            CLASSES_KEY: [c.to_dict() for c in DEFAULT_CLASSES],
            "source": str(real_series),
            "spineseg_result": {"kind": "labels", "model": "spineseg-default"},
            "spineseg_prediction": np.zeros_like(array),  # the painted labels differ: corrected
        },
    }
    (written,) = write_dicom_seg_layer(str(tmp_path / "layer.dcm"), array, meta)
    np.testing.assert_array_equal(read_dicom_seg(written, real_series).array, array)
    segment = pydicom.dcmread(written).SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "spineseg-default"
    del meta["metadata"]["source"]
    assert write_dicom_seg_layer(str(tmp_path / "none.dcm"), array, meta) == []  # clear notification instead
    assert not (tmp_path / "none.dcm").exists()


def test_a_class_name_with_a_caveat_keeps_its_coding():
    from napari_spineseg.dicomseg import segment_coding
    from napari_spineseg.schema import LabelClass

    caveated = LabelClass(3, "spinal canal (experimental: learned from synthetic data)", (0.3, 0.85, 0.4, 1.0))
    assert segment_coding(caveated).type[0] == "61853006"
