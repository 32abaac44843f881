"""2-D segmentation architectures and the slice-level lesion classifier (pure torch/MONAI, no Qt)."""

from napari_spineseg.models.common import extend_output_classes
from napari_spineseg.models.penn import PennNet
from napari_spineseg.models.pretrained import (
    adapt_first_conv,
    init_from_torchvision,
    load_mapped_weights,
    map_resnet50_state_dict,
    map_vgg19_state_dict,
)
from napari_spineseg.models.registry import ARCHITECTURES, ArchitectureSpec, architecture_names, build_model
from napari_spineseg.models.resnet import LesionClassifier, gate_slices

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "LesionClassifier",
    "PennNet",
    "adapt_first_conv",
    "architecture_names",
    "build_model",
    "extend_output_classes",
    "gate_slices",
    "init_from_torchvision",
    "load_mapped_weights",
    "map_resnet50_state_dict",
    "map_vgg19_state_dict",
]
