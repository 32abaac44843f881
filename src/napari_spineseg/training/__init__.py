"""Training and fine-tuning engine (Qt-free): data, datasets, the training loop and recipes."""

from .data import (
    TrainingCase,
    kfold_by_patient,
    load_lumbar_dataset,
    lumbar_patient_id,
    patient_split,
    phantom_cases,
)
from .loop import TrainConfig, TrainEvent, TrainResult, run_training, train, validate
from .recipes import Recipe, get_recipe, recipe_names

__all__ = [
    "Recipe",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "TrainingCase",
    "get_recipe",
    "kfold_by_patient",
    "load_lumbar_dataset",
    "lumbar_patient_id",
    "patient_split",
    "phantom_cases",
    "recipe_names",
    "run_training",
    "train",
    "validate",
]
