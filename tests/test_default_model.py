"""The bundled default model: metadata, agreement of precisions, and accuracy on a real case."""

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
VALIDATION_CSV = ROOT / "benchmarks" / "results" / f"{DEFAULT_MODEL_NAME}_validation.csv"


def test_bundled_model_exists_and_metadata_matches_schema() -> None:
    metadata = read_metadata(MODEL)
    assert metadata.name == DEFAULT_MODEL_NAME
    assert metadata.classes == list(DEFAULT_CLASSES[: metadata.num_classes])
    assert metadata.num_classes == 4  # no lesion class: no labelled lesion MRI exists (see the model card)
    assert set(metadata.planes) == {"axial", "coronal", "sagittal"}
    assert (
        metadata.training.get("recipe") == "default" or metadata.training.get("config", {}).get("recipe") == "default"
    )
    assert MODEL.stat().st_size < 20 * 1024 * 1024


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


def _card_dice(case: str) -> float:
    with VALIDATION_CSV.open() as handle:
        for row in csv.DictReader(handle):
            if row["case"] == case and row["planes"] == "fused" and row["value"] == "1":
                return float(row["dice"])
    raise AssertionError(f"{case} missing from {VALIDATION_CSV}")


@pytest.mark.slow
def test_vertebral_body_dice_on_a_real_validation_case_matches_the_model_card(data_dir: Path) -> None:
    from napari_spineseg.training.data import load_lumbar_dataset

    (case,) = load_lumbar_dataset(data_dir / "lumbar-mri", datasets=("VB3",), cases=["VB3-01"])
    predictor = Predictor(SegmentationSettings())
    predictor.load(DEFAULT_MODEL_NAME)
    result = predictor.predict(case.image)
    assert result.labels.geometry == case.image.geometry
    (metrics,) = evaluate_labels(
        result.labels.array, case.evaluation_labels(), case.labels.geometry.spacing_zyx, classes=[1], region=case.region
    )
    assert abs(metrics.dice - _card_dice("VB3-01")) <= 0.02
    assert np.count_nonzero(result.labels.array == 2) > 0  # discs found too (unlabelled in VB3)
