"""Volume IO on real studies: geometry exactness, DICOM series, round trips and bad files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from napari_spineseg.errors import InputError, VolumeReadError
from napari_spineseg.io import find_label_file, read_volume, read_volumes, write_labels, write_volume
from napari_spineseg.volume import Volume


def test_nifti_matches_simpleitk_and_nibabel(data_dir: Path) -> None:
    path = data_dir / "spinal-cord-t2" / "t2.nii.gz"
    volume = read_volume(path)
    image = sitk.ReadImage(str(path))
    assert volume.geometry.size == image.GetSize()
    assert volume.spacing == image.GetSpacing()
    assert volume.origin == image.GetOrigin()
    assert volume.direction == image.GetDirection()
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    # nibabel stores voxels (i, j, k) = ITK (x, y, z); our array is (z, y, x); affines agree (RAS vs LPS).
    nifti = nib.load(str(path))
    np.testing.assert_array_equal(volume.array, np.asarray(nifti.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(volume.geometry.affine_ras(), nifti.affine, atol=1e-4)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"])
def test_label_round_trip_is_bit_exact(data_dir: Path, tmp_path: Path, suffix: str) -> None:
    labels = read_volume(data_dir / "spinal-cord-t2" / "t2_seg-manual.nii.gz")
    out = write_labels(labels.array, tmp_path / f"cord_seg{suffix}", labels.geometry)
    back = read_volume(out)
    assert back.geometry == labels.geometry
    np.testing.assert_array_equal(back.array, labels.array)
    assert back.array.dtype == np.uint8
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]


def test_label_written_back_reads_identically_in_nibabel(data_dir: Path, tmp_path: Path) -> None:
    source = data_dir / "spinal-cord-t2" / "t2.nii.gz"
    study = read_volume(source)
    labels = (study.array > np.percentile(study.array, 90)).astype(np.uint8)
    out = write_labels(labels, tmp_path / "t2_seg.nii.gz", study)
    written, original = nib.load(str(out)), nib.load(str(source))
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(original.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), labels)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), labels)


def test_uint16_labels_and_non_integer_rejected(tmp_path: Path) -> None:
    volume = Volume.from_array(np.zeros((4, 5, 6)), spacing=(0.5, 0.7, 3.0))
    labels = np.zeros(volume.shape, np.int32)
    labels[1, 2, 3] = 300
    back = read_volume(write_labels(labels, tmp_path / "big.mha", volume))
    assert back.array.dtype == np.uint16 and back.array[1, 2, 3] == 300
    with pytest.raises(InputError, match="non-integer"):
        write_labels(labels + 0.5, tmp_path / "bad.mha", volume)
    with pytest.raises(InputError, match="shape"):
        write_labels(np.zeros((2, 2, 2), np.uint8), tmp_path / "bad.mha", volume)


def test_nifti_sibling_with_other_compression_is_not_confused(tmp_path: Path) -> None:
    # ITK's NIfTI reader given x.nii.gz reads the voxels of x.nii when both exist.
    a = Volume.from_array(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    b = a.with_array(a.array[::-1].copy())
    write_volume(a, tmp_path / "x.nii")
    write_volume(b, tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(read_volume(tmp_path / "x.nii.gz").array, b.array)
    np.testing.assert_array_equal(read_volume(tmp_path / "x.nii").array, a.array)


def test_dicom_series_is_one_volume_like_simpleitk(data_dir: Path) -> None:
    directory = data_dir / "dicom-sagittal-series" / "series"
    volumes = read_volumes(directory)
    assert len(volumes) == 1
    volume = volumes[0]
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(directory))
    reader.SetFileNames(files)
    reference = reader.Execute()
    assert volume.geometry.size == reference.GetSize() == (86, 86, 63)
    np.testing.assert_allclose(volume.spacing, reference.GetSpacing())
    np.testing.assert_allclose(volume.direction, reference.GetDirection())
    np.testing.assert_allclose(volume.origin, reference.GetOrigin())
    assert len(volume.metadata["dicom_files"]) == 63
    assert "patient_name" not in str(volume.metadata).lower()
    # One file of the series opens the whole series.
    one = read_volume(sorted(directory.iterdir())[10])
    np.testing.assert_array_equal(one.array, volume.array)


def test_directory_with_two_series_yields_two_volumes(data_dir: Path, tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    source = sorted((data_dir / "dicom-sagittal-series" / "series").iterdir())
    new_series = generate_uid()
    for index, path in enumerate(source[:20]):
        shutil.copy(path, tmp_path / f"a{index:03d}.dcm")
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = new_series
        dataset.SeriesDescription = "copy"
        dataset.SeriesNumber = 99
        dataset.SOPInstanceUID = generate_uid()
        dataset.save_as(tmp_path / f"b{index:03d}.dcm")
    volumes = read_volumes(tmp_path)
    assert len(volumes) == 2
    assert sorted(v.geometry.size[2] for v in volumes) == [20, 20]
    assert any(v.name.startswith("copy") for v in volumes)
    with pytest.raises(InputError, match="2 DICOM series"):
        read_volume(tmp_path)


def test_label_file_found_next_to_image(data_dir: Path) -> None:
    image = data_dir / "lumbar-mri" / "VB3" / "01_img.nii.gz"
    assert find_label_file(image) == image.with_name("01_seg.nii.gz")


def _corruptions(tmp_path: Path, data_dir: Path) -> dict[str, Path]:
    volume = read_volume(data_dir / "spinal-cord-t2" / "t2.nii.gz")
    cases: dict[str, Path] = {}
    for suffix in (".mha", ".nrrd", ".nii", ".nii.gz", ".mhd"):
        good = write_volume(volume, tmp_path / f"good{suffix}", compress=False)
        if suffix == ".mhd":
            raw = next(p for p in tmp_path.iterdir() if p.name.startswith("good.") and p.suffix == ".raw")
            raw.write_bytes(raw.read_bytes()[:1000])
            cases["truncated .mhd data"] = good
            continue
        data = good.read_bytes()
        truncated = tmp_path / f"truncated{suffix}"
        if suffix == ".nii.gz":
            truncated.write_bytes(gzip.compress(gzip.decompress(data)[:5000]))
        else:
            truncated.write_bytes(data[: len(data) // 3])
        cases[f"truncated {suffix}"] = truncated
        garbage = tmp_path / f"garbage{suffix}"
        garbage.write_bytes(b"this is not a medical image\n" * 20)
        cases[f"corrupt {suffix}"] = garbage
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    cases["empty"] = empty
    (tmp_path / "nodicom").mkdir()
    cases["empty dicom dir"] = tmp_path / "nodicom"
    (tmp_path / "textdir").mkdir()
    (tmp_path / "textdir" / "notes.txt").write_text("hello")
    cases["dir without dicom"] = tmp_path / "textdir"
    fake_dicom = tmp_path / "fake.dcm"
    fake_dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\x01" * 50)
    cases["corrupt dicom"] = fake_dicom
    cases["missing"] = tmp_path / "missing.nii.gz"
    cases["unknown format"] = tmp_path / "notes.txt"
    (tmp_path / "notes.txt").write_text("x")
    return cases


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path: Path, data_dir: Path) -> None:
    for case, path in _corruptions(tmp_path, data_dir).items():
        with pytest.raises(VolumeReadError) as info:
            read_volume(path)
        message = str(info.value)
        assert str(path) in message, case
        assert "\n" not in message and len(message) < 400, case


def test_four_d_and_rgb_are_reduced_with_a_warning(tmp_path: Path) -> None:
    four_d = sitk.JoinSeries([sitk.Image([5, 6, 7], sitk.sitkFloat32) for _ in range(3)])
    sitk.WriteImage(four_d, str(tmp_path / "fourd.nii.gz"))
    volume = read_volume(tmp_path / "fourd.nii.gz")
    assert volume.shape == (7, 6, 5)
    assert any("4-D" in w for w in volume.metadata["warnings"])
    rgb = sitk.Image([5, 6, 7], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    assert any("RGB" in w for w in read_volume(tmp_path / "rgb.mha").metadata["warnings"])
    flat = sitk.Image([5, 6], sitk.sitkUInt8)
    sitk.WriteImage(flat, str(tmp_path / "flat.mha"))
    with pytest.raises(VolumeReadError, match="2-D"):
        read_volume(tmp_path / "flat.mha")


def test_write_into_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    import os

    from napari_spineseg.errors import VolumeWriteError

    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    volume = Volume.from_array(np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(VolumeWriteError, match="cannot write"):
        write_labels(volume, locked / "x.nii.gz")
