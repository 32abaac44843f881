"""Is a segmentation plausible for a spine study?  One-line warnings (Qt-free).

    warnings = plausibility_warnings(review_labels(labels, geometry, classes), body_part="BRAIN")

Used by the Segment widget (a notification), the ``spineseg segment`` command (stderr) and the
report (its warning list).  A brain EPI segmented as a spine gives "spinal canal 15 mL" and no
vertebral body: the numbers look like an answer, so the user must be told they are not one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .review import LabelReview
from .schema import INTERVERTEBRAL_DISC, VERTEBRAL_BODY

__all__ = ["BODY_VOLUME_ML", "DISC_VOLUME_ML", "body_part_of", "plausibility_warnings", "segmentation_warnings"]

#: Median volume (mL) of the vertebral bodies found outside which a result is implausible
#: (adult cervical bodies ~3-8 mL, lumbar ~25-45 mL: a wide margin either side).
BODY_VOLUME_ML = (1.0, 120.0)
#: The same for intervertebral discs (cervical ~1 mL, lumbar ~10-20 mL).
DISC_VOLUME_ML = (0.2, 60.0)
#: DICOM Body Part Examined values (0018,0015) that are, or may contain, the spine.
SPINE_BODY_PARTS = (
    "SPINE",
    "CSPINE",
    "TSPINE",
    "LSPINE",
    "SSPINE",
    "WHOLESPINE",
    "CTSPINE",
    "TLSPINE",
    "LSSPINE",
    "SACRUM",
    "COCCYX",
    "NECK",
    "BACK",
    "WHOLEBODY",
    "CHEST",
    "ABDOMEN",
    "PELVIS",
    "THORAX",
    "CERVICAL",
    "THORACIC",
    "LUMBAR",
)


def body_part_of(metadata: Mapping[str, Any] | None) -> str | None:
    """The DICOM body part recorded in a study's (or layer's) metadata, if any."""
    dicom = (metadata or {}).get("dicom")
    part = dicom.get("body_part") if isinstance(dicom, Mapping) else None
    return (str(part).strip() or None) if part else None


def _is_spine_part(part: str) -> bool:
    compact = "".join(ch for ch in part.upper() if ch.isalpha())
    return any(name in compact for name in SPINE_BODY_PARTS)


def plausibility_warnings(review: LabelReview, body_part: str | None = None, expects_bodies: bool = True) -> list[str]:
    """One-line warnings when ``review`` does not look like a spine segmentation (empty when fine).

    ``expects_bodies=False`` (a model with no vertebral body class) skips the vertebral body checks.
    """
    warnings: list[str] = []
    if body_part and not _is_spine_part(body_part):
        warnings.append(f"the study's DICOM body part is {body_part!r}, not the spine: check that this is a spine MRI")
    present = {c.value for c in review.classes}
    bodies = [s.volume_ml for s in review.levels if s.value == VERTEBRAL_BODY]
    discs = [s.volume_ml for s in review.levels if s.value == INTERVERTEBRAL_DISC]
    if not bodies and expects_bodies:
        found = ", ".join(f"{c.name} {c.volume_ml:.1f} mL" for c in review.classes) or "nothing"
        warnings.append(f"no vertebral body was found ({found}): the result is not a spine segmentation")
        return warnings
    if len(bodies) < 2 and VERTEBRAL_BODY in present:
        warnings.append("only one vertebral body was found: a spine study shows several")
    for kind, volumes, (low, high) in (("vertebral body", bodies, BODY_VOLUME_ML), ("disc", discs, DISC_VOLUME_ML)):
        if not volumes:
            continue
        median = float(np.median(volumes))
        if not low <= median <= high:
            warnings.append(
                f"the median {kind} volume is {median:.2f} mL, far outside {low:g}-{high:g} mL: "
                "check the study and its voxel spacing"
            )
    return warnings


def segmentation_warnings(labels: Any, study: Any = None, classes: Any = None) -> list[str]:
    """:func:`plausibility_warnings` of a label :class:`~napari_spineseg.volume.Volume` made on ``study``.

    ``classes`` are the model's (the schema's when ``None``); the body part comes from the
    study's DICOM metadata when it has any.
    """
    from .review import review_labels
    from .schema import DEFAULT_CLASSES

    classes = list(classes) if classes else list(DEFAULT_CLASSES)
    review = review_labels(labels.array, labels.geometry, classes)
    expects = any(c.value == VERTEBRAL_BODY for c in classes)
    return plausibility_warnings(review, body_part_of(getattr(study, "metadata", None)), expects)
