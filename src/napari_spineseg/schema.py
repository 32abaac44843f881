"""The one label schema used by models, readers, writers, widgets and reports.

Values are fixed promises: 0 background, 1 vertebral body, 2 intervertebral disc,
3 spinal canal, 4 lesion.  Models may add classes with higher values; they carry
their own :class:`LabelClass` records in their metadata.  In training targets,
:data:`IGNORE` (255) marks voxels that are unlabelled or outside the image (the loss skips them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

BACKGROUND = 0
VERTEBRAL_BODY = 1
INTERVERTEBRAL_DISC = 2
SPINAL_CANAL = 3
LESION = 4
IGNORE = 255  # training targets: not labelled / outside the image (never a class value)


@dataclass(frozen=True)
class LabelClass:
    """One class of a label map: its integer value, a name and an RGBA colour (0..1)."""

    value: int
    name: str
    color: tuple[float, float, float, float]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> LabelClass:
        value = int(data["value"])
        name = str(data["name"])
        color = tuple(float(c) for c in data["color"])
        if value < 0 or value > 65535:
            raise ValueError(f"label value {value} outside 0..65535")
        if len(color) == 3:
            color = (*color, 1.0)
        if len(color) != 4 or not all(0.0 <= c <= 1.0 for c in color):
            raise ValueError(f"label {name!r}: colour must be 3 or 4 numbers in 0..1")
        return cls(value, name, color)  # type: ignore[arg-type]


DEFAULT_CLASSES: tuple[LabelClass, ...] = (
    LabelClass(BACKGROUND, "background", (0.0, 0.0, 0.0, 0.0)),
    LabelClass(VERTEBRAL_BODY, "vertebral body", (0.90, 0.75, 0.20, 1.0)),
    LabelClass(INTERVERTEBRAL_DISC, "intervertebral disc", (0.20, 0.60, 1.00, 1.0)),
    LabelClass(SPINAL_CANAL, "spinal canal", (0.30, 0.85, 0.40, 1.0)),
    LabelClass(LESION, "lesion", (0.95, 0.20, 0.25, 1.0)),
)

# Colours for classes a user adds (e.g. a painted new label value) without choosing one.
_EXTRA_COLOURS = (
    (0.75, 0.35, 0.95, 1.0),
    (1.00, 0.55, 0.10, 1.0),
    (0.10, 0.85, 0.85, 1.0),
    (0.95, 0.45, 0.70, 1.0),
    (0.55, 0.55, 0.55, 1.0),
)


def default_classes() -> list[LabelClass]:
    """A fresh list of the default schema's classes."""
    return list(DEFAULT_CLASSES)


def class_for_value(value: int, classes: Iterable[LabelClass] = DEFAULT_CLASSES) -> LabelClass:
    """The class with ``value``; an unnamed value gets a generated name and colour."""
    for label_class in classes:
        if label_class.value == value:
            return label_class
    colour = _EXTRA_COLOURS[(value - len(DEFAULT_CLASSES)) % len(_EXTRA_COLOURS)]
    return LabelClass(int(value), f"class {value}", colour)


def extend_classes(
    classes: Iterable[LabelClass], values: Iterable[int], names: Mapping[int, str] | None = None
) -> list[LabelClass]:
    """``classes`` plus a class for every value in ``values`` it does not know yet."""
    result = list(classes)
    known = {c.value for c in result}
    for value in sorted({int(v) for v in values} - known):
        generated = class_for_value(value, result)
        name = (names or {}).get(value, generated.name)
        result.append(LabelClass(value, name, generated.color))
    return result


def color_dict(classes: Iterable[LabelClass] = DEFAULT_CLASSES) -> dict[int | None, tuple[float, float, float, float]]:
    """A ``{value: rgba}`` mapping for napari's ``DirectLabelColormap`` (``None`` = unknown values)."""
    colours: dict[int | None, tuple[float, float, float, float]] = {c.value: c.color for c in classes}
    colours[None] = (0.6, 0.6, 0.6, 1.0)
    return colours
