"""The device-resident inference path (napari_spineseg.resident) against the host path, on the CPU."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn

from napari_spineseg.errors import Cancelled
from napari_spineseg.inference import FusionMode, Predictor, SegmentationSettings
from napari_spineseg.modelfile import LoadedModel
from napari_spineseg.resident import device_batch_size
from napari_spineseg.volume import Volume
from test_inference import identity_model, labelled_volume


def _pair(model: LoadedModel, **settings) -> tuple[Predictor, Predictor]:
    host = Predictor(SegmentationSettings(resident=False, **settings))
    resident = Predictor(SegmentationSettings(resident=True, **settings))
    host.load(model)
    resident.load(model)
    return host, resident


def soft_model(pixel_spacing_mm: float | None, context_slices: int = 1) -> LoadedModel:
    """A small random network (soft, overlapping class probabilities) with the identity model's metadata."""
    torch.manual_seed(0)
    channels = 2 * context_slices + 1
    network = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 5, 3, padding=1)).eval()
    with torch.no_grad():
        network[2].weight *= 6.0
    metadata = identity_model(context_slices=context_slices).metadata
    metadata.preprocess = {"normalise": True, "pixel_spacing_mm": pixel_spacing_mm}
    return LoadedModel(network, metadata)


def noisy_volume(code: str = "LPS"):
    volume = labelled_volume(code)
    return volume.with_array(volume.array + np.random.default_rng(1).random(volume.shape).astype(np.float32))


def test_automatic_choice_is_the_host_path_on_the_cpu() -> None:
    predictor = Predictor(SegmentationSettings(device="cpu"))
    predictor.load(identity_model())
    assert predictor.settings.resident is None
    from napari_spineseg.preprocess import PreprocessConfig

    assert not predictor._use_resident(PreprocessConfig())
    predictor.settings.resident = True
    assert predictor._use_resident(PreprocessConfig())
    assert not predictor._use_resident(PreprocessConfig(clahe=True))  # per-slice filters stay on the host
    assert device_batch_size("cpu", 7, 256 * 256) == 7


@pytest.mark.parametrize("fusion", list(FusionMode))
@pytest.mark.parametrize("uncertainty", [None, "entropy", "disagreement"])
def test_resident_labels_equal_the_host_path_with_resampling(
    monkeypatch, fusion: FusionMode, uncertainty: str | None
) -> None:
    # 0.8 x 1.3 x 2.5 mm voxels resampled to 0.9 mm pixels in every plane: gather, resampling there
    # and back, accumulation and fusion all differ from the host path's code.
    host, resident = _pair(
        soft_model(0.9), fusion=fusion, uncertainty=uncertainty, batch_size=3, precision="fp32", postprocess=False
    )

    def no_host_batches(*args, **kwargs):
        raise AssertionError("the resident path sliced a batch on the host")

    monkeypatch.setattr(resident, "_infer_batch", no_host_batches)
    volume = noisy_volume()
    expected, got = host.predict(volume), resident.predict(volume)
    assert len(np.unique(expected.labels.array)) > 2
    np.testing.assert_array_equal(got.labels.array, expected.labels.array)
    if uncertainty is None:
        assert got.uncertainty is None and expected.uncertainty is None
    else:
        np.testing.assert_allclose(got.uncertainty.array, expected.uncertainty.array, atol=1e-5)


@pytest.mark.parametrize("code", ["PIR", "LPS", "SAL"])
def test_resident_identity_model_reproduces_labels(code: str) -> None:
    _, resident = _pair(identity_model(context_slices=1), batch_size=4, precision="fp32")
    volume = labelled_volume(code)
    np.testing.assert_array_equal(resident.predict(volume).labels.array, volume.array)


def test_resident_eight_bit_accumulator_equals_the_host_path(monkeypatch) -> None:
    import napari_spineseg.inference as inference

    monkeypatch.setattr(inference, "ACCUMULATOR_BYTES", 0)
    host, resident = _pair(soft_model(None), fusion="weighted", plane_weights={"axial": 0.7}, precision="fp32")
    volume = noisy_volume()
    np.testing.assert_array_equal(resident.predict(volume).labels.array, host.predict(volume).labels.array)


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_resident_test_time_mirror(plane: str) -> None:
    volume = labelled_volume("LPS")
    # The identity network commutes with the mirror: a wrong flip on the resident path would show.
    _, mirrored = _pair(identity_model(context_slices=1), planes=[plane], precision="fp32", test_time_mirror=True)
    assert mirrored.test_time_mirror
    np.testing.assert_array_equal(mirrored.predict(volume).labels.array, volume.array)
    host, resident = _pair(soft_model(0.9), planes=[plane], precision="fp32", test_time_mirror=True, postprocess=False)
    noisy = noisy_volume()
    np.testing.assert_array_equal(resident.predict(noisy).labels.array, host.predict(noisy).labels.array)


def test_resident_cancel_stops_within_one_batch() -> None:
    _, resident = _pair(identity_model(), batch_size=2, precision="fp32")
    cancel = threading.Event()
    events = []
    with pytest.raises(Cancelled):
        for event in resident.run(labelled_volume(), cancel):
            events.append(event)
            if event.stage == "plane":
                cancel.set()
    assert [e.stage for e in events].count("plane") == 1
    progress = [e for e in resident.run(labelled_volume()) if e.stage == "plane"]
    assert progress[-1].fraction == pytest.approx(1.0) and progress[-1].done == progress[-1].total


def test_resident_default_model_on_the_phantom() -> None:
    from napari_spineseg.phantom import make_phantom

    phantom = make_phantom(size=(96, 96, 40), seed=3)
    host, resident = _pair("spineseg-default", precision="fp32", uncertainty="entropy")
    expected, got = host.predict(phantom.image), resident.predict(phantom.image)
    assert (expected.labels.array > 0).mean() > 0.01
    np.testing.assert_array_equal(got.labels.array, expected.labels.array)
    np.testing.assert_allclose(got.uncertainty.array, expected.uncertainty.array, atol=1e-5)


def test_resident_default_model_on_a_real_case_crop(data_dir) -> None:
    from napari_spineseg.io import read_volume

    path = data_dir / "lumbar-mri" / "VB3" / "01_img.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    volume = read_volume(path)
    z, y, x = (n // 2 for n in volume.shape)
    array = np.ascontiguousarray(volume.array[z - 24 : z + 24, y - 40 : y + 40, x - 48 : x + 48])
    crop = Volume.from_array(array, spacing=volume.spacing, direction=volume.direction, name="VB3-01 crop")
    host, resident = _pair("spineseg-default", precision="bf16")  # the CPU default precision where native
    expected, got = host.predict(crop), resident.predict(crop)
    assert (expected.labels.array > 0).mean() > 0.01
    np.testing.assert_array_equal(got.labels.array, expected.labels.array)


def test_inference_and_packed_training_import_without_simpleitk() -> None:
    """A GPU server may have torch but no SimpleITK: segmenting a Volume and training from a packed
    .npz must not need it."""
    code = (
        "import sys; sys.modules['SimpleITK'] = None\n"
        "import numpy as np\n"
        "from napari_spineseg.inference import Predictor, SegmentationSettings\n"
        "from napari_spineseg.volume import Volume\n"
        "import napari_spineseg.training.loop, napari_spineseg.training.packed, napari_spineseg.training.commands\n"
        "from napari_spineseg.models import build_model\n"
        "from napari_spineseg.modelfile import LoadedModel, ModelMetadata\n"
        "net = build_model('unet', in_channels=3, num_classes=5, base=8, depth=2).eval()\n"
        "meta = ModelMetadata('t', 'unet', net.arch_kwargs, context_slices=1, preprocess={'pixel_spacing_mm': 1.0})\n"
        "p = Predictor(SegmentationSettings(device='cpu', resident=True, precision='fp32'))\n"
        "p.load(LoadedModel(net, meta))\n"
        "v = Volume.from_array(np.random.default_rng(0).random((12, 20, 16), dtype=np.float32), spacing=(1.5, 1, 1))\n"
        "print(p.predict(v).labels.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(12, 20, 16)" in result.stdout
