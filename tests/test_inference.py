"""Three-plane inference: exactness of the plane logic, fusion modes, cancellation, devices."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from napari_spineseg.errors import Cancelled, InputError
from napari_spineseg.inference import FusionMode, Predictor, SegmentationSettings, resolve_device
from napari_spineseg.modelfile import LoadedModel, ModelMetadata
from napari_spineseg.orientation import ALL_PLANES, Plane
from napari_spineseg.volume import Volume


class IdentityNet(nn.Module):
    """Returns the (centre-channel) input label values as one-hot logits."""

    def __init__(self, num_classes: int, context_slices: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.centre = context_slices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x[:, self.centre].round().long().clamp(0, self.num_classes - 1)
        return 20.0 * nn.functional.one_hot(values, self.num_classes).permute(0, 3, 1, 2).float()


def identity_model(num_classes: int = 5, context_slices: int = 0) -> LoadedModel:
    metadata = ModelMetadata(
        name="identity",
        architecture="identity",
        architecture_kwargs={},
        context_slices=context_slices,
        preprocess={"normalise": False, "pixel_spacing_mm": None},
        postprocess={},
    )
    return LoadedModel(IdentityNet(num_classes, context_slices), metadata)


def labelled_volume(direction_code: str = "PIR", seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    labels = np.zeros((9, 14, 11), np.uint8)  # (z, y, x)
    labels[2:7, 3:10, 2:9] = 1
    labels[4, 5:8, 3:6] = 2
    labels[1:3, 10:13, 8:10] = 3
    labels[rng.random(labels.shape) > 0.97] = 4
    direction = sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation(direction_code)
    return Volume.from_array(labels, spacing=(0.8, 1.3, 2.5), origin=(5, -7, 11), direction=direction)


@pytest.mark.parametrize("code", ["PIR", "LPS", "RAS", "SAL", "IRP"])
@pytest.mark.parametrize("fusion", list(FusionMode))
def test_identity_model_reproduces_labels_exactly(code: str, fusion: FusionMode) -> None:
    volume = labelled_volume(code)
    for planes in [ALL_PLANES, (Plane.SAGITTAL,), (Plane.AXIAL, Plane.CORONAL)]:
        predictor = Predictor(SegmentationSettings(planes=planes, fusion=fusion, batch_size=4, precision="fp32"))
        predictor.load(identity_model())
        result = predictor.predict(volume)
        np.testing.assert_array_equal(result.labels.array, volume.array)
        assert result.labels.geometry == volume.geometry


def test_context_slices_and_uncertainty_shapes() -> None:
    volume = labelled_volume("PIR")
    for mode in ("entropy", "disagreement"):
        predictor = Predictor(SegmentationSettings(uncertainty=mode, batch_size=5, precision="fp32"))
        predictor.load(identity_model(context_slices=1))
        result = predictor.predict(volume)
        np.testing.assert_array_equal(result.labels.array, volume.array)
        assert result.uncertainty is not None
        assert result.uncertainty.array.shape == volume.shape
        assert float(result.uncertainty.array.max()) < 0.05  # planes agree everywhere


def test_disagreement_marks_voxels_where_planes_differ() -> None:
    class PlaneBiased(IdentityNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = super().forward(x)
            if x.shape[-2] == 14 and x.shape[-1] == 11:  # one plane's slice shape: push class 0 to 1
                logits[:, 1] += 25.0 * (logits[:, 0] > 0)
            return logits

    volume = labelled_volume("LPS")  # canonical-ish: slice shapes differ per plane
    predictor = Predictor(SegmentationSettings(uncertainty="disagreement", precision="fp32"))
    model = identity_model()
    predictor.load(LoadedModel(PlaneBiased(5, 0), model.metadata))
    result = predictor.predict(volume)
    np.testing.assert_array_equal(result.labels.array, volume.array)  # 2 of 3 planes still agree
    background = volume.array == 0
    assert result.uncertainty.array[background].mean() > 0.3
    assert result.uncertainty.array[~background].max() == 0


def test_cancel_stops_within_one_batch() -> None:
    volume = labelled_volume()
    predictor = Predictor(SegmentationSettings(batch_size=2, precision="fp32"))
    predictor.load(identity_model())
    cancel = threading.Event()
    events = []
    with pytest.raises(Cancelled):
        for event in predictor.run(volume, cancel):
            events.append(event)
            if event.stage == "plane" and len(events) == 3:
                cancel.set()
    assert len(events) == 3  # no further batch ran after the cancel


def test_progress_reaches_all_slices() -> None:
    volume = labelled_volume()
    predictor = Predictor(SegmentationSettings(batch_size=3, precision="fp32"))
    predictor.load(identity_model())
    events = [e for e in predictor.run(volume) if e.stage == "plane"]
    per_plane = {plane: max(e.done for e in events if e.plane == plane) for plane in ("axial", "coronal", "sagittal")}
    assert per_plane == {"axial": 14, "coronal": 11, "sagittal": 9}
    assert events[-1].fraction == pytest.approx(1.0)


def test_bad_settings_and_inputs_are_clear_errors() -> None:
    with pytest.raises(InputError, match="fusion"):
        SegmentationSettings(fusion="median")
    with pytest.raises(InputError, match="plane"):
        SegmentationSettings(planes=["transverse"])
    with pytest.raises(InputError, match="not available"):
        resolve_device("cuda" if not torch.cuda.is_available() else "mps")
    predictor = Predictor(SegmentationSettings(precision="fp32"))
    predictor.load(identity_model())
    bad = Volume.from_array(np.full((4, 4, 4), np.nan, np.float32))
    with pytest.raises(InputError, match="NaN"):
        predictor.predict(bad)


def test_all_48_orientations_with_identity() -> None:
    base = labelled_volume("LPS")
    letters = [("L", "R"), ("P", "A"), ("S", "I")]
    codes = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((0, 1), repeat=3):
            codes.append("".join(letters[perm[i]][signs[i]] for i in range(3)))
    predictor = Predictor(SegmentationSettings(batch_size=16, precision="fp32"))
    predictor.load(identity_model())
    for code in codes:
        direction = sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation(code)
        volume = Volume.from_array(base.array, spacing=base.spacing, direction=direction)
        np.testing.assert_array_equal(predictor.predict(volume).labels.array, volume.array)


@pytest.mark.parametrize("fusion", [FusionMode.MEAN, FusionMode.WEIGHTED])
def test_eight_bit_accumulator_of_large_studies(monkeypatch, fusion: FusionMode) -> None:
    """Large studies fuse in an 8-bit accumulator: exact for confident planes, ≥ 99 % equal otherwise."""
    import napari_spineseg.inference as inference

    volume = labelled_volume("LPS")
    settings = SegmentationSettings(fusion=fusion, batch_size=4, precision="fp32", plane_weights={"axial": 0.7})
    exact = Predictor(settings)
    exact.load(identity_model())
    float16 = exact.predict(volume).labels.array
    torch.manual_seed(0)
    soft = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 5, 3, padding=1)).eval()
    with torch.no_grad():  # as confident as a trained model away from boundaries
        soft[2].weight *= 6.0
    soft_model = LoadedModel(soft, identity_model().metadata)
    noisy = volume.with_array(volume.array + np.random.default_rng(1).random(volume.shape).astype(np.float32))
    reference = Predictor(settings)
    reference.load(soft_model)
    soft_float16 = reference.predict(noisy).labels.array

    monkeypatch.setattr(inference, "ACCUMULATOR_BYTES", 0)
    quantised = Predictor(settings)
    quantised.load(identity_model())
    np.testing.assert_array_equal(quantised.predict(volume).labels.array, float16)
    quantised.load(soft_model)
    agreement = float((quantised.predict(noisy).labels.array == soft_float16).mean())
    # (the default model on a real 224x224x77 study: 99.98 % of voxels equal, 99.95 % of foreground)
    assert len(np.unique(soft_float16)) > 2 and agreement >= 0.99, agreement


@pytest.mark.parametrize("code", ["PIR", "LPS", "SAL"])
@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_test_time_mirror_maps_the_mirrored_prediction_back_onto_the_study(code: str, plane: str) -> None:
    # The identity network commutes with mirroring, so a correct mirror (and its way back) changes
    # nothing; a wrong axis or a missing flip-back would average two different label maps.
    volume = labelled_volume(code)
    # One plane at a time: a fusion over three planes could outvote a wrong one.
    plain = Predictor(SegmentationSettings([plane], postprocess=False, precision="fp32", test_time_mirror=False))
    plain.load(identity_model(context_slices=1))
    mirrored = Predictor(SegmentationSettings([plane], postprocess=False, precision="fp32", test_time_mirror=True))
    mirrored.load(identity_model(context_slices=1))
    assert mirrored.test_time_mirror and not plain.test_time_mirror
    assert np.array_equal(mirrored.predict(volume).labels.array, plain.predict(volume).labels.array)


def test_model_file_asks_for_the_test_time_mirror() -> None:
    model = identity_model()
    model.metadata.extra["inference"] = {"test_time_mirror": True}
    predictor = Predictor(SegmentationSettings(postprocess=False))
    predictor.load(model)
    assert predictor.test_time_mirror
    overridden = Predictor(SegmentationSettings(postprocess=False, test_time_mirror=False))
    overridden.load(model)
    assert not overridden.test_time_mirror
