"""napari contributions: manifest, reader, writer and sample data (need a display: xvfb-run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import requires_display
from napari_spineseg._reader import napari_get_reader
from napari_spineseg.io import read_volume

pytestmark = [pytest.mark.gui]


def test_manifest_validates() -> None:
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-spineseg")
    assert manifest.name == "napari-spineseg"
    readers = manifest.contributions.readers
    assert readers and readers[0].accepts_directories


def test_get_reader_never_raises(tmp_path: Path) -> None:
    assert napari_get_reader(str(tmp_path / "missing.txt")) is None
    assert napari_get_reader(12345) is None
    assert napari_get_reader(str(tmp_path)) is None  # empty dir: not DICOM
    assert napari_get_reader(str(tmp_path / "x.nii.gz")) is not None


@requires_display
def test_vb3_image_and_labels_open_with_identical_geometry(make_napari_viewer, data_dir: Path) -> None:
    viewer = make_napari_viewer()
    path = data_dir / "lumbar-mri" / "VB3" / "01_img.nii.gz"
    layers = viewer.open(str(path), plugin="napari-spineseg")
    kinds = sorted(type(layer).__name__ for layer in layers)
    assert kinds == ["Image", "Labels"]
    image = next(la for la in layers if type(la).__name__ == "Image")
    labels = next(la for la in layers if type(la).__name__ == "Labels")
    np.testing.assert_allclose(image.scale, labels.scale)
    np.testing.assert_allclose(image.translate, labels.translate)
    assert image.metadata["spineseg_geometry"] == labels.metadata["spineseg_geometry"]
    assert image.data.shape == labels.data.shape == read_volume(path).shape
    # VB3 labels hold level ids L1..L5 (1..5), not schema classes: never named "lesion" etc.
    assert list(labels.features["name"]) == ["background"] + [f"label {k}" for k in range(1, 6)]
    assert labels.metadata["spineseg_schema"] is False


@requires_display
def test_schema_label_maps_get_class_names_and_colours(make_napari_viewer, tmp_path: Path) -> None:
    from napari_spineseg.io import write_labels
    from napari_spineseg.volume import Volume

    study = Volume.from_array(np.zeros((6, 8, 10), np.float32), spacing=(0.5, 0.6, 3.0))
    labels = np.zeros(study.shape, np.uint8)
    labels[1:3, 2:5, 2:6] = 1
    labels[4, 2:5, 2:6] = 2
    path = write_labels(labels, tmp_path / "case_seg.nii.gz", study)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="napari-spineseg")
    assert list(layer.features["name"][:3]) == ["background", "vertebral body", "intervertebral disc"]
    colour = layer.colormap.map(np.array([1]))[0]
    np.testing.assert_allclose(colour[:3], (0.90, 0.75, 0.20), atol=1e-3)
    np.testing.assert_allclose(layer.scale, (3.0, 0.6, 0.5))


@requires_display
def test_writer_round_trip_is_bit_exact(make_napari_viewer, data_dir: Path, tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    seg_path = data_dir / "lumbar-mri" / "VB3" / "01_seg.nii.gz"
    (labels,) = viewer.open(str(seg_path), plugin="napari-spineseg")
    labels.data[40, 100, 100] = 7  # an edit
    out = tmp_path / "edited_seg.nii.gz"
    from napari_spineseg._writer import write_labels_layer

    written = write_labels_layer(str(out), labels.data, labels.as_layer_data_tuple()[1])
    assert written == [str(out)]
    original, back = read_volume(seg_path), read_volume(out)
    assert back.geometry == original.geometry
    expected = original.array.copy()
    expected[40, 100, 100] = 7
    np.testing.assert_array_equal(back.array, expected)


@requires_display
def test_dicom_directory_opens_as_one_layer(make_napari_viewer, data_dir: Path) -> None:
    viewer = make_napari_viewer()
    layers = viewer.open(str(data_dir / "dicom-sagittal-series" / "series"), plugin="napari-spineseg")
    assert len(layers) == 1 and layers[0].data.shape == (63, 86, 86)
    np.testing.assert_allclose(layers[0].scale, (2.2, 2.23256, 2.23256), atol=1e-4)


@requires_display
def test_corrupt_file_gives_a_notification_not_a_crash(make_napari_viewer, tmp_path: Path) -> None:
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    bad = tmp_path / "broken.mha"
    bad.write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 10 10 10\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
    )
    seen = []
    notification_manager.notification_ready.connect(lambda n: seen.append(str(n.message)))
    layers = viewer.open(str(bad), plugin="napari-spineseg")
    assert layers == []
    assert len(viewer.layers) == 0
    assert any(str(bad) in message for message in seen)


@requires_display
def test_sample_data_opens_with_labels(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-spineseg", "lumbar-phantom-t1")
    kinds = sorted(type(layer).__name__ for layer in layers)
    assert kinds == ["Image", "Labels"]
    labels = next(la for la in layers if type(la).__name__ == "Labels")
    assert set(np.unique(labels.data)) <= {0, 1, 2, 3, 4}
    assert {1, 2, 3} <= set(np.unique(labels.data))
