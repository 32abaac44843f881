"""Red-team findings (issue #18) on readers and geometry: each test failed before its fix.

Inputs are built here (pydicom, nibabel, SimpleITK, raw headers), a few voxels each.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from napari_spineseg.errors import InputError, ModelFileError, VolumeReadError
from napari_spineseg.io import read_volume, read_volumes, write_labels

MR = "1.2.840.10008.5.1.4.1.1.4"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
UID = "1.2.826.0.1.3680043.8.498."
AXIAL = [1, 0, 0, 0, 1, 0]


def _slice(index: int, position, orientation=AXIAL, series: str = "200", sop_class: str = MR, **extra):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = f"{UID}{series}.{index + 1}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = f"{UID}100"
    ds.SeriesInstanceUID = f"{UID}{series}"
    ds.FrameOfReferenceUID = f"{UID}300"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "ID1"
    ds.Modality = "MR"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
    ds.SeriesDescription = f"series {series}"
    ds.SeriesNumber = int(series)
    ds.InstanceNumber = index + 1
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [0.8, 0.9]
    ds.SliceThickness = 2.5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = 6, 5
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.full(30, 10 * (index + 1), np.uint16).tobytes()
    for keyword, value in extra.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _series(directory: Path, positions, orientations=None, series: str = "200", **extra) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, position in enumerate(positions):
        orientation = orientations[index] if orientations else AXIAL
        path = directory / f"s{series}_{index:03d}.dcm"
        _slice(index, position, orientation, series, **extra).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _z(*values: float) -> list[list[float]]:
    return [[0.0, 0.0, v] for v in values]


# 6: DICOM series on a wrong grid ----------------------------------------------------------------
def test_missing_slice_is_resampled_onto_a_regular_grid_with_one_warning(tmp_path: Path, capfd) -> None:
    _series(tmp_path / "gap", _z(0, 2.5, 5, 10, 12.5))  # the slice at 7.5 is missing
    volume = read_volume(tmp_path / "gap")
    assert volume.shape == (6, 6, 5)  # ITK alone: 5 slices 2.5 mm apart, the last two 2.5 mm off
    assert volume.spacing[2] == pytest.approx(2.5)
    np.testing.assert_allclose(volume.array[:, 0, 0], [10, 20, 30, 35, 40, 50])
    (warning,) = volume.metadata["warnings"]
    assert "uneven" in warning and "1 missing slice" in warning and "\n" not in warning
    assert "WARNING: In" not in capfd.readouterr().err  # ITK's multi-line warning naming C++ files


def test_uneven_spacing_is_resampled(tmp_path: Path) -> None:
    _series(tmp_path / "uneven", _z(0, 2, 5, 7, 10))
    volume = read_volume(tmp_path / "uneven")
    positions = [volume.geometry.index_to_lps([[0, 0, k]])[0, 2] for k in range(volume.shape[0])]
    assert positions[0] == pytest.approx(0) and positions[-1] == pytest.approx(10)
    assert np.allclose(np.diff(positions), volume.spacing[2])
    assert any("uneven" in w for w in volume.metadata["warnings"])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("duplicate", "share a position"),
        ("equal", "share a position"),
        ("mixed", "orientations"),
        ("no position", "ImagePositionPatient"),
        ("no orientation", "ImageOrientationPatient"),
        ("sheared", "shifted within their plane"),
    ],
)
def test_series_without_a_single_grid_are_refused_in_one_line(tmp_path: Path, case: str, message: str) -> None:
    folder = tmp_path / "series"
    tilted = [1, 0, 0, 0, math.cos(0.2), math.sin(0.2)]
    if case == "duplicate":
        _series(folder, _z(0, 2.5, 2.5, 5))
    elif case == "equal":
        _series(folder, _z(3, 3, 3))
    elif case == "mixed":
        _series(folder, _z(0, 2.5, 5, 7.5), [AXIAL, tilted, AXIAL, tilted])
    elif case == "no position":
        paths = _series(folder, _z(0, 2.5, 5))
        _slice(1, None).save_as(paths[1], enforce_file_format=True)
    elif case == "no orientation":
        _series(folder, _z(0, 2.5, 5), [AXIAL, AXIAL, None])
    else:
        _series(folder, [[0, 0, 0], [1, 0, 2.5], [2, 0, 5]])
    with pytest.raises(VolumeReadError, match=message) as caught:
        read_volumes(folder)
    assert "\n" not in str(caught.value)


def test_two_echoes_in_one_series_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "echoes"
    _series(folder, _z(0, 2.5, 5), EchoNumbers=1)
    for index, position in enumerate(_z(0, 2.5, 5)):
        _slice(index + 10, position, EchoNumbers=2).save_as(folder / f"echo2_{index}.dcm", enforce_file_format=True)
    with pytest.raises(VolumeReadError, match="2 values of EchoNumbers"):
        read_volumes(folder)


def test_localizer_inside_a_series_is_skipped_with_a_warning(tmp_path: Path) -> None:
    sagittal = [0, 1, 0, 0, 0, -1]
    _series(tmp_path / "loc", _z(0, 2.5, 40, 5, 7.5), [AXIAL, AXIAL, sagittal, AXIAL, AXIAL])
    volume = read_volume(tmp_path / "loc")
    assert volume.shape[0] == 4 and volume.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert volume.metadata["warnings"] == ["skipped 1 slice(s) of another orientation (a localizer?)"]


def test_missing_pixel_spacing_is_stated(tmp_path: Path) -> None:
    _series(tmp_path / "nospacing", _z(0, 2.5, 5), PixelSpacing=None)
    volume = read_volume(tmp_path / "nospacing")
    assert any("no PixelSpacing" in w for w in volume.metadata["warnings"])


def test_real_series_keeps_its_geometry(data_dir: Path) -> None:
    directory = data_dir / "dicom-sagittal-series" / "series"
    volume = read_volume(directory)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory)))
    image = reader.Execute()
    assert volume.metadata["warnings"] == []
    assert np.array_equal(volume.array, sitk.GetArrayFromImage(image))
    assert np.allclose(volume.spacing, image.GetSpacing()) and np.allclose(volume.origin, image.GetOrigin())
    assert np.allclose(volume.direction, image.GetDirection())


# 7: readable series that were blocked ---------------------------------------------------------
def test_one_slice_localizer_beside_two_series_is_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    _series(folder, _z(0, 2.5, 5), series="201")
    _series(folder, _z(0, 3, 6, 9), series="202")
    _series(folder, [[0, 0, 0]], [[0, 1, 0, 0, 0, -1]], series="203")
    volumes = read_volumes(folder)
    assert sorted(v.shape[0] for v in volumes) == [3, 4]
    assert all(any("one-slice series" in w for w in v.metadata["warnings"]) for v in volumes)


def test_dicomdir_is_followed(tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    files = _series(tmp_path / "plain", _z(0, 2.5, 5, 7.5))
    fileset = FileSet()
    for path in files:
        fileset.add(path)
    fileset.write(tmp_path / "cd")
    assert (tmp_path / "cd" / "DICOMDIR").is_file()
    for target in (tmp_path / "cd", tmp_path / "cd" / "DICOMDIR"):
        volume = read_volume(target)
        assert volume.shape == (4, 6, 5) and volume.spacing[2] == pytest.approx(2.5)


def test_unreadable_dicomdir_falls_back_to_the_folder(tmp_path: Path) -> None:
    _series(tmp_path / "flat", _z(0, 2.5, 5))
    (tmp_path / "flat" / "DICOMDIR").write_bytes(b"not a dicomdir")
    assert read_volume(tmp_path / "flat").shape == (3, 6, 5)


# 8: non-image objects in a series folder ------------------------------------------------------
def test_segmentation_and_report_objects_in_the_folder_are_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    _series(folder, _z(0, 2.5, 5))
    _series(folder, _z(0, 2.5), series="900", sop_class=SEG)  # a DICOM-SEG series of its own
    _slice(7, [0, 0, 7.5], sop_class=SEG).save_as(folder / "seg_in_series.dcm", enforce_file_format=True)
    volumes = read_volumes(folder)
    assert len(volumes) == 1 and volumes[0].shape[0] == 3
    assert any("Segmentation Storage" in w for w in volumes[0].metadata["warnings"])
    with pytest.raises(VolumeReadError, match="no DICOM image series"):
        only_seg = tmp_path / "only"
        _series(only_seg, _z(0, 2.5), series="900", sop_class=SEG)
        read_volumes(only_seg)


# 9: truncated plain NIfTI ------------------------------------------------------------------------
def _nifti(tmp_path: Path, name: str = "x.nii", array=None, affine=None, **header) -> Path:
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) if array is None else array
    image = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    for key, value in header.items():
        image.header[key] = value
    path = tmp_path / name
    nib.save(image, path)
    return path


def test_truncated_plain_nifti_and_far_vox_offset_are_refused(tmp_path: Path) -> None:
    path = _nifti(tmp_path)
    data = path.read_bytes()
    short = tmp_path / "short.nii"
    short.write_bytes(data[:-200])
    with pytest.raises(VolumeReadError, match="truncated voxel data"):
        read_volume(short)
    far = bytearray(data)
    struct.pack_into("<f", far, 108, 1e9)
    (tmp_path / "far.nii").write_bytes(bytes(far))
    with pytest.raises(VolumeReadError, match=r"offset .* past the end"):
        read_volume(tmp_path / "far.nii")


# 11: implausible spacing ----------------------------------------------------------------------
def _mha(path: Path, spacing: str = "1 1 1", matrix: str = "1 0 0 0 1 0 0 0 1") -> Path:
    header = (
        f"ObjectType = Image\nNDims = 3\nDimSize = 4 5 6\nElementType = MET_SHORT\nElementSpacing = {spacing}\n"
        f"TransformMatrix = {matrix}\nOffset = 0 0 0\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + bytes(4 * 5 * 6 * 2))
    return path


def test_implausible_spacings_are_refused(tmp_path: Path) -> None:
    tiny = _nifti(tmp_path, "tiny.nii", affine=np.diag([1e-30, 1, 1, 1]))
    micron = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    micron.header.set_xyzt_units("micron")
    nib.save(micron, tmp_path / "micron.nii")
    for path in (tiny, tmp_path / "micron.nii", _mha(tmp_path / "nano.mha", spacing="1e-9 1e-9 1e-9")):
        with pytest.raises(VolumeReadError, match="implausible") as caught:
            read_volume(path)
        assert "\n" not in str(caught.value)
    with pytest.raises(VolumeReadError, match="micron"):
        read_volume(tmp_path / "micron.nii")
    meters = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([0.001, 0.001, 0.003, 1]))
    meters.header.set_xyzt_units("meter")
    nib.save(meters, tmp_path / "meters.nii")
    assert read_volume(tmp_path / "meters.nii").spacing == pytest.approx((1, 1, 3))  # units converted


# 12: sheared or scaled direction matrices ---------------------------------------------------------
def test_non_orthonormal_directions_are_refused(tmp_path: Path) -> None:
    nrrd = tmp_path / "shear.nrrd"
    nrrd.write_bytes(
        b"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 4 5 6\n"
        b"space directions: (1,0,0) (0.5,1,0) (0,0,1)\nendian: little\nencoding: raw\nspace origin: (0,0,0)\n\n"
        + bytes(240)
    )
    cases = [nrrd, _mha(tmp_path / "shear.mha", matrix="1 0 0 0.5 1 0 0 0 1")]
    cases.append(_mha(tmp_path / "scaled.mha", matrix="2 0 0 0 2 0 0 0 2"))
    for path in cases:
        with pytest.raises(VolumeReadError, match="not orthonormal"):
            read_volume(path)


# 13: qform / sform ----------------------------------------------------------------------------
def _written_affine(volume, tmp_path: Path) -> np.ndarray:
    out = write_labels(np.zeros(volume.shape, np.uint8), tmp_path / "labels.nii.gz", volume)
    return nib.load(out).affine


def test_qform_sform_disagreement_uses_the_sform_and_warns(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    qform = np.eye(4)
    qform[0, 3] = 3.0
    image.set_qform(qform, code=1)  # ITK prefers a scanner qform over an aligned sform
    image.set_sform(np.eye(4), code=2)
    nib.save(image, tmp_path / "qs.nii")
    volume = read_volume(tmp_path / "qs.nii")
    assert np.allclose(_written_affine(volume, tmp_path), nib.load(tmp_path / "qs.nii").affine)
    assert any("qform and sform disagree" in w and "sform" in w for w in volume.metadata["warnings"])


def test_negative_pixdim_does_not_mirror_the_labels(tmp_path: Path, capfd) -> None:
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine)
    image.set_qform(affine, code=1)
    image.header["pixdim"][1] = -2.0
    nib.save(image, tmp_path / "neg.nii")
    volume = read_volume(tmp_path / "neg.nii")
    assert np.allclose(_written_affine(volume, tmp_path), nib.load(tmp_path / "neg.nii").affine)
    assert any("nibabel" in w for w in volume.metadata["warnings"])
    assert "itkNiftiImageIO.cxx" not in capfd.readouterr().err


# 14: NaN/Inf and complex NIfTI ------------------------------------------------------------------
def test_nan_in_nifti_is_reported_like_mha(tmp_path: Path) -> None:
    array = np.ones((4, 5, 6), np.float32)
    array[0, 0, 0], array[1, 1, 1], array[2, 2, 2] = np.nan, np.inf, -np.inf
    for path in (_nifti(tmp_path, "nan.nii", array), _nifti(tmp_path, "nan.nii.gz", array)):
        volume = read_volume(path)
        assert "3 voxels are NaN or infinite: treated as 0" in volume.metadata["warnings"]
        assert np.isfinite(volume.array).all()


def test_complex_nifti_is_refused_without_python_warnings(tmp_path: Path) -> None:
    path = _nifti(tmp_path, "complex.nii", np.ones((4, 5, 6), np.complex64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(VolumeReadError, match="complex-valued"):
            read_volume(path)


# 15: NaN/Inf plane weights ----------------------------------------------------------------------
@pytest.mark.parametrize("weight", ["NaN", "Infinity", "-1"])
def test_non_finite_plane_weights_are_refused_at_load(tmp_path: Path, weight: str) -> None:
    from napari_spineseg.modelfile import load_model
    from test_modelfile import _rewrite_header, tiny_model

    path, _ = tiny_model(tmp_path)

    def edit(header):
        record = json.loads(header["__metadata__"]["spineseg"])
        record["plane_weights"] = {"axial": 1.0, "sagittal": float(weight)}
        header["__metadata__"]["spineseg"] = json.dumps(record)  # NaN / Infinity, as Python's json writes them

    with pytest.raises(ModelFileError, match="plane weights"):
        load_model(_rewrite_header(path, edit))


def test_non_finite_plane_weights_are_refused_in_settings() -> None:
    from napari_spineseg.inference import SegmentationSettings

    for weights in ({"axial": math.nan}, {"axial": math.inf}, {"axial": 0.0}, {"x": 1.0}):
        with pytest.raises(InputError):
            SegmentationSettings(fusion="weighted", plane_weights=weights)
    assert SegmentationSettings(fusion="weighted", plane_weights={"axial": 0.7}).plane_weights == {"axial": 0.7}


# 19: 2-D NIfTI --------------------------------------------------------------------------------
def test_two_d_nifti_is_named_two_d(tmp_path: Path) -> None:
    for name in ("flat.nii", "flat.nii.gz"):
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((5, 4), np.float32)), str(tmp_path / name))
        with pytest.raises(VolumeReadError, match="2-D") as caught:
            read_volume(tmp_path / name)
        assert "truncated" not in str(caught.value)


def test_gdcm_messages_lose_their_source_paths() -> None:
    from napari_spineseg.io import _first_line

    raw = (
        "/tmp/SimpleITK-build/ITK/Modules/ThirdParty/GDCM/src/gdcm/Source/DataStructureAndEncodingDefinition/"
        "gdcmAttribute.h:445 (): An invalid logic behavior occurred"
    )
    assert _first_line(RuntimeError(raw)) == "An invalid logic behavior occurred"


def test_dicom_seg_of_a_resampled_series_is_refused(tmp_path: Path) -> None:
    from napari_spineseg.dicomseg import write_dicom_seg
    from napari_spineseg.errors import GeometryMismatchError

    _series(tmp_path / "gap", _z(0, 2.5, 5, 10, 12.5))
    study = read_volume(tmp_path / "gap")
    labels = np.zeros(study.shape, np.uint8)
    labels[2:4, 1:3, 1:3] = 1
    with pytest.raises(GeometryMismatchError, match="source slices"):
        write_dicom_seg(study.with_array(labels), study, tmp_path / "seg.dcm", algorithm_type="MANUAL")
    assert not (tmp_path / "seg.dcm").exists()
