"""The bundled models (default and accurate): metadata, agreement of precisions, accuracy on a real case."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from napari_spineseg.inference import Predictor, SegmentationSettings, cpu_supports_bf16
from napari_spineseg.metrics import evaluate_labels
from napari_spineseg.modelfile import DEFAULT_MODEL_NAME, bundled_model_dir, load_model, read_metadata
from napari_spineseg.schema import DEFAULT_CLASSES

ROOT = Path(__file__).resolve().parents[1]
MODEL = bundled_model_dir() / f"{DEFAULT_MODEL_NAME}.safetensors"
ACCURATE_MODEL_NAME = "spineseg-accurate"
BUNDLED = [DEFAULT_MODEL_NAME, ACCURATE_MODEL_NAME]
CANAL_CAVEAT = "spinal canal (experimental: learned from synthetic data)"


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_exists_and_metadata_matches_schema(name: str) -> None:
    metadata = read_metadata(bundled_model_dir() / f"{name}.safetensors")
    assert metadata.name == name
    assert [c.value for c in metadata.classes] == [0, 1, 2, 3]
    assert [c.name for c in metadata.classes[:3]] == [c.name for c in DEFAULT_CLASSES[:3]]
    assert metadata.classes[3].name == CANAL_CAVEAT  # learned from phantoms only: said wherever it is shown
    assert metadata.num_classes == 4  # no lesion class: no labelled lesion MRI exists (see the model card)
    assert set(metadata.planes) == {"axial", "coronal", "sagittal"}
    assert (
        metadata.training.get("recipe") == "default" or metadata.training.get("config", {}).get("recipe") == "default"
    )
    assert metadata.metrics.get("held_out_fused")  # the card's figures travel in the file
    # the card check below segments VB3-01: it must be a study the model never trained on
    assert "VB3-01" in metadata.validation_cases and "VB3-01" not in metadata.training["train_cases"]
    assert bool((metadata.extra.get("inference") or {}).get("test_time_mirror")) == (name == ACCURATE_MODEL_NAME)


def test_bundled_models_stay_small() -> None:
    assert sum((bundled_model_dir() / f"{n}.safetensors").stat().st_size for n in BUNDLED) < 40 * 1024 * 1024


def test_bf16_and_fp32_agree_on_the_sample_study() -> None:
    from napari_spineseg.phantom import sample_study

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    study = sample_study().image
    model = load_model(DEFAULT_MODEL_NAME)
    labels = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor(SegmentationSettings(precision=precision, postprocess=False))
        predictor.load(model)
        labels[precision] = predictor.predict(study).labels.array
    agreement = float((labels["fp32"] == labels["bf16"]).mean())
    assert agreement >= 0.999


def _card_dice(case: str, name: str) -> float:
    with (ROOT / "benchmarks" / "results" / f"{name}_validation.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row["case"] == case and row["planes"] == "fused" and row["value"] == "1":
                return float(row["dice"])
    raise AssertionError(f"{case} missing from the validation CSV of {name}")


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLED)
def test_vertebral_body_dice_on_a_real_validation_case_matches_the_model_card(data_dir: Path, name: str) -> None:
    from napari_spineseg.training.data import load_lumbar_dataset

    (case,) = load_lumbar_dataset(data_dir / "lumbar-mri", datasets=("VB3",), cases=["VB3-01"])
    predictor = Predictor(SegmentationSettings())
    predictor.load(name)
    assert predictor.test_time_mirror == (name == ACCURATE_MODEL_NAME)
    result = predictor.predict(case.image)
    assert result.labels.geometry == case.image.geometry
    (metrics,) = evaluate_labels(
        result.labels.array, case.evaluation_labels(), case.labels.geometry.spacing_zyx, classes=[1], region=case.region
    )
    assert abs(metrics.dice - _card_dice("VB3-01", name)) <= 0.02
    assert np.count_nonzero(result.labels.array == 2) > 0  # discs found too (unlabelled in VB3)
