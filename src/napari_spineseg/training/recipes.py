"""Named training recipes: a :class:`TrainConfig` plus data choices, recorded in the model file.

========================  ===================================================================
``default``               U-Net (base 16, depth 4), 2.5-D (3 slices), schema classes 0–3 (no
                          lesion class), CE+Dice with partial labels, all three planes at 1 mm,
                          strong intensity (gamma, T1↔T2 inversion, bias field, noise) and
                          geometric augmentation, crop 192, bf16 + channels_last, class-balanced
                          slice sampling, a few phantoms to teach the class the real data lacks
                          (canal).
``accurate``              the default recipe with a U-Net of base 32, 5 context slices, 20000
                          steps of batch 16: sized for a GPU (minutes there, a day on 2 cores).
``unet-bce``              U-Net, one-vs-rest BCE, Adam 1e-4, no augmentation, constant lr.
``fcn-resnet50``          FCN-ResNet50, CLAHE + NL-means + bilateral pre-processing,
                          BCE-with-logits, best-by-validation-Dice, 5-fold by patient,
                          morphological post-processing (closing + hole filling).
``penn``                  Patch network: 32×32 patches (stride 16), positive when ≥ 60 % of
                          the patch is one structure, background undersampled to 0.6/0.4,
                          Gaussian σ = 2 mm smoothing (in the pre-processing, so inference
                          smooths too).
``unet-focal-dice``       LeakyReLU U-Net, focal + Dice, slice filtration (foreground slices,
                          no extreme imbalance).
``resunet-tversky``       Residual U-Net, Tversky (α 0.3, β 0.7), with the lesion-presence gate.
``vgg19-unet-tversky``    VGG-19 U-Net, Tversky (α 0.3, β 0.7), with the lesion-presence gate.
========================  ===================================================================

The Tversky recipes come with a slice-level lesion-presence classifier (``lesion-classifier``,
ResNet-50 style, width 0.125, global average + max pool), trained after the segmenter as a second stage of
``spineseg train`` (:mod:`.lesion_gate_trainer`) and stored in the same model file; at inference it zeroes the
lesion class on slices it is confident are lesion-free (:mod:`napari_spineseg.lesion_gate`).  No
labelled lesion MRI exists: the gate learns from SIMULATED hemangioma-like lesions planted in the
real VB3/VB1 studies (:mod:`napari_spineseg.lesion_sim`), and its record says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..augment import AugmentConfig
from ..errors import InputError
from ..postprocess import ClassPostprocess, default_postprocess
from ..preprocess import PreprocessConfig
from ..schema import INTERVERTEBRAL_DISC, VERTEBRAL_BODY, default_classes
from .lesion_gate_trainer import GateConfig
from .loop import TrainConfig

__all__ = ["Recipe", "get_recipe", "recipe_names"]


@dataclass
class Recipe:
    """A named training configuration and the data it expects."""

    name: str
    description: str
    config: TrainConfig
    datasets: tuple[str, ...] = ("VB3", "VB1", "IVD")
    phantoms: int = 0  # synthetic phantoms added to the training set
    folds: int | None = None  # recommended k-fold cross-validation (by patient)
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    gate: GateConfig | None = None  # lesion-presence gate trained after the segmenter (SIMULATED lesions)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "description": self.description,
            "datasets": list(self.datasets),
            "phantoms": self.phantoms,
            "folds": self.folds,
            "notes": self.notes,
            **self.extra,
        }
        if self.gate is not None:
            out["gate"] = self.gate.to_dict()
        return out


def _strong_augment() -> AugmentConfig:
    # No free flips: every study is sliced in canonical orientation, so orientation is a useful
    # prior; only the left-right mirror, which keeps superior/inferior and anterior/posterior.
    return AugmentConfig(
        flip_prob=0.0,
        lr_flip_prob=0.5,
        rotate_deg=15.0,
        rotate_prob=0.5,
        scale_range=(0.8, 1.2),
        elastic_prob=0.15,
        elastic_alpha_px=30.0,
        elastic_sigma_px=6.0,
        brightness=0.1,
        contrast=0.25,
        gamma_range=(0.6, 1.6),
        gamma_prob=0.5,
        noise_std=0.05,
        noise_prob=0.3,
        invert_prob=0.3,
        bias_field=0.3,
    )


def _default() -> Recipe:
    config = TrainConfig(
        architecture="unet",
        architecture_kwargs={"base": 16, "depth": 4, "dropout": 0.0},
        context_slices=1,
        # No lesion class: no labelled lesion MRI exists; lesions are added by fine-tuning on the
        # user's own annotations (phantom lesions are labelled as vertebral body here).
        classes=default_classes()[:4],
        loss="ce+dice",
        lr=1e-3,
        weight_decay=1e-5,
        schedule="cosine",
        warmup_steps=100,
        steps=10000,  # ~45 min at ~3.8 steps/s (batch 8, crop 192, bf16, 2 cores) + validations
        batch_size=8,
        val_every=1000,
        mixed_precision="auto",
        crop_size=192,
        preprocess=PreprocessConfig(pixel_spacing_mm=1.0),
        augment=_strong_augment(),
        sampling="balanced",
        foreground_only=True,
        keep_empty_fraction=0.15,
        model_name="spineseg-default",
        description=(
            "2.5-D U-Net (base 16, depth 4, 3 slices) on axial, coronal and sagittal slices at 1 mm, "
            "trained with partial labels on lumbar MRI (VB3, VB1, IVD) plus synthetic phantoms."
        ),
        recipe="default",
    )
    return Recipe(
        "default",
        "Our bundled model: fast 2.5-D U-Net, all planes, CE+Dice with partial labels, strong augmentation.",
        config,
        phantoms=8,
        notes="Canal (3) is learned from phantoms only: no real canal labels exist. No lesion class (see model card).",
    )


def _accurate() -> Recipe:
    """The default recipe with twice the width, five context slices and a longer schedule (GPU-sized)."""
    recipe = _default()
    recipe.config = dataclasses.replace(
        recipe.config,
        architecture_kwargs={"base": 32, "depth": 4, "dropout": 0.0},
        context_slices=2,
        steps=20000,
        batch_size=16,
        val_every=2000,
        model_name="spineseg-accurate",
        description=(
            "2.5-D U-Net (base 32, depth 4, 5 slices) on axial, coronal and sagittal slices at 1 mm, "
            "trained with partial labels on lumbar MRI (VB3, VB1, IVD) plus synthetic phantoms."
        ),
        recipe="accurate",
    )
    recipe.name = "accurate"
    recipe.description = (
        "The default recipe, twice as wide, 5 context slices, 20000 steps of batch 16 (train on a GPU)."
    )
    return recipe


def _unet_bce() -> Recipe:
    config = TrainConfig(
        architecture="unet",
        architecture_kwargs={"base": 16, "depth": 4, "dropout": 0.0},
        context_slices=0,
        loss="bce",
        lr=1e-4,
        schedule="none",
        steps=6000,
        batch_size=8,
        augment=None,
        model_name="spineseg-unet-bce",
        description="U-Net trained with one-vs-rest BCE, Adam 1e-4, no augmentation.",
        recipe="unet-bce",
    )
    return Recipe("unet-bce", "U-Net, BCE, Adam 1e-4, no augmentation.", config)


def _fcn_resnet50() -> Recipe:
    postprocess = default_postprocess()
    postprocess.per_class[VERTEBRAL_BODY] = ClassPostprocess(min_component_mm3=500.0, fill_holes=True, closing_mm=2.0)
    postprocess.per_class[INTERVERTEBRAL_DISC] = ClassPostprocess(
        min_component_mm3=200.0, fill_holes=True, closing_mm=1.0
    )
    config = TrainConfig(
        architecture="fcn-resnet50",
        architecture_kwargs={"width": 0.25, "dilated": True, "dropout": 0.1},
        context_slices=1,
        loss="bce",
        lr=1e-4,
        schedule="cosine",
        steps=6000,
        batch_size=8,
        preprocess=PreprocessConfig(
            pixel_spacing_mm=1.0, clahe=True, clahe_clip_limit=0.01, denoise_nlmeans=True, bilateral=True
        ),
        augment=AugmentConfig(flip_prob=0.0, elastic_prob=0.0, invert_prob=0.0),
        postprocess=postprocess.to_dict(),
        model_name="spineseg-fcn-resnet50",
        description="FCN-ResNet50 with CLAHE + NL-means + bilateral pre-processing, BCE, best by validation Dice.",
        recipe="fcn-resnet50",
    )
    return Recipe(
        "fcn-resnet50",
        "FCN-ResNet50, CLAHE+NL-means+bilateral, BCE-with-logits, best-by-val-Dice, 5-fold, morphological clean-up.",
        config,
        folds=5,
    )


def _penn() -> Recipe:
    config = TrainConfig(
        architecture="penn",
        architecture_kwargs={"patch_size": 32, "stride": 8, "hidden": [200, 200, 200], "dense": False},
        context_slices=0,
        loss="ce",
        lr=1e-3,
        schedule="cosine",
        steps=6000,
        batch_size=128,
        planes=["sagittal"],
        preprocess=PreprocessConfig(pixel_spacing_mm=1.0, gaussian_sigma_mm=2.0),
        augment=None,
        patches={"patch_size": 32, "stride": 16, "positive_fraction": 0.6, "positive_ratio": 0.6},
        model_name="spineseg-penn",
        description="PENN patch network (32x32 patches, SSAE-style encoder), Gaussian sigma 2 mm smoothing.",
        recipe="penn",
    )
    return Recipe(
        "penn",
        "Patch network: 32x32 patches, >=60 % foreground = positive, 0.6/0.4 undersampling, Gaussian smoothing.",
        config,
        notes="The layer-wise auto-encoder pre-training of the original is not done (end-to-end training).",
    )


def _unet_focal_dice() -> Recipe:
    config = TrainConfig(
        architecture="unet-leaky",
        architecture_kwargs={"base": 16, "depth": 4, "dropout": 0.1, "negative_slope": 0.1},
        context_slices=0,
        loss="focal+dice",
        loss_kwargs={"alpha": 0.6, "gamma": 2.0},
        lr=1e-4,
        schedule="cosine",
        steps=6000,
        batch_size=8,
        foreground_only=True,
        keep_empty_fraction=0.0,
        min_foreground_fraction=0.01,
        augment=AugmentConfig(flip_prob=0.0),
        model_name="spineseg-unet-focal-dice",
        description="LeakyReLU U-Net with focal + Dice loss and slice filtration.",
        recipe="unet-focal-dice",
    )
    return Recipe("unet-focal-dice", "unet-leaky, focal+Dice, slice filtration.", config)


def _tversky(name: str, architecture: str, kwargs: dict[str, Any]) -> Recipe:
    config = TrainConfig(
        architecture=architecture,
        architecture_kwargs=kwargs,
        context_slices=1,
        loss="tversky",
        loss_kwargs={"alpha": 0.3, "beta": 0.7},
        lr=1e-4,
        schedule="cosine",
        steps=6000,
        batch_size=8,
        augment=AugmentConfig(flip_prob=0.0),
        sampling="balanced",
        foreground_only=True,
        model_name=f"spineseg-{name}",
        description=f"{architecture} trained with the Tversky loss (alpha 0.3, beta 0.7).",
        recipe=name,
    )
    gate = GateConfig(
        architecture_kwargs={"width": 0.125, "dropout": 0.0, "pool": "avgmax"},
        context_slices=config.context_slices,
        planes=list(config.planes),
        preprocess=config.preprocess,
        steps=1500,
        batch_size=16,
        crop_size=96,
    )
    return Recipe(
        name,
        f"{architecture}, Tversky loss, then a slice-level lesion-presence gate (ResNet-50 style).",
        config,
        phantoms=4,
        notes=(
            "Lesion class learned from phantoms only (no labelled lesion MRI). The lesion-presence gate is a "
            "second stage trained on SIMULATED lesions planted in real VB3/VB1 studies (lesion_sim); "
            "`spineseg train --no-gate` skips it."
        ),
        gate=gate,
    )


_RECIPES = {
    "default": _default,
    "accurate": _accurate,
    "unet-bce": _unet_bce,
    "fcn-resnet50": _fcn_resnet50,
    "penn": _penn,
    "unet-focal-dice": _unet_focal_dice,
    "resunet-tversky": lambda: _tversky("resunet-tversky", "resunet", {"base": 16, "depth": 4, "dropout": 0.0}),
    "vgg19-unet-tversky": lambda: _tversky("vgg19-unet-tversky", "vgg19-unet", {"width": 0.25, "batch_norm": True}),
}


def recipe_names() -> list[str]:
    return list(_RECIPES)


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """A fresh :class:`Recipe`; ``overrides`` replace fields of its :class:`TrainConfig`."""
    key = str(name).strip().lower()
    if key not in _RECIPES:
        raise InputError(f"unknown recipe {name!r}; choose one of {', '.join(_RECIPES)}")
    recipe = _RECIPES[key]()
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise InputError(f"recipe {name!r}: unknown setting(s) {', '.join(unknown)}")
        recipe.config = dataclasses.replace(recipe.config, **overrides)
    return recipe
