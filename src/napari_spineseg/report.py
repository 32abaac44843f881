"""Structured segmentation report (Qt-free): JSON and a one-page HTML with a mid-sagittal overlay.

    report = build_report(study, labels, model_metadata=read_metadata(resolve_model("spineseg-default")))
    write_report(report, "report.html")   # one self-contained page (inline CSS, embedded PNG)
    write_report(report, "report.json")   # the same record without the image bytes

The record holds per-class volumes (mL), vertebral bodies and discs superior → inferior, lesions
with their volume and level (or ``"no lesion detected"``), the model and its validation figures,
preflight warnings, the software version and a timestamp.  Study information is picked field by
field (name, size, spacing, orientation, a few acquisition tags): paths, UIDs and any other
metadata are never copied, so no patient identifier reaches the report.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, VolumeWriteError
from .orientation import orientation_code, reorientation_to, tilt_degrees
from .preflight import PreflightWarning, preflight
from .provenance import json_safe
from .review import LabelReview, review_labels
from .schema import BACKGROUND, DEFAULT_CLASSES, LESION, VERTEBRAL_BODY, LabelClass, class_for_value
from .volume import Geometry, Volume, check_same_grid

__all__ = [
    "DISCLAIMER",
    "NO_LESION",
    "SagittalView",
    "build_report",
    "mid_sagittal",
    "render_overlay",
    "report_to_html",
    "report_to_json",
    "write_report",
]

DISCLAIMER = "Research use only. Not a medical device: not for diagnosis or treatment decisions."
NO_LESION = "no lesion detected"
LEVEL_NAMING = (
    "Levels are counted from the most superior labelled vertebral body (body 1) downwards; they are "
    "not anatomically identified (the field of view may start at any vertebra)."
)
_SAFE_DICOM_FIELDS = ("modality", "series_description", "body_part", "field_strength")
_OVERLAY_ALPHA = 0.45


def _integer_labels(labels: Volume) -> np.ndarray:
    array = np.asarray(labels.array)
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind in "iu":
        if array.size and array.min() < 0:
            raise InputError(f"{labels.name}: label values must not be negative (found {int(array.min())})")
        return array
    if array.dtype.kind != "f" or not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
        raise InputError(f"{labels.name}: not a label map (values must be whole numbers, got {array.dtype})")
    if array.size and array.min() < 0:
        raise InputError(f"{labels.name}: label values must not be negative (found {array.min():g})")
    return array.astype(np.int64)


def _report_classes(model_metadata: Any, values: Sequence[int]) -> list[LabelClass]:
    """The model's classes, the schema's missing ones, then generated classes for other values."""
    classes = list(model_metadata.classes) if model_metadata is not None else []
    known = {c.value for c in classes}
    classes += [c for c in DEFAULT_CLASSES if c.value not in known]
    known = {c.value for c in classes}
    classes += [class_for_value(v, classes) for v in sorted(set(values) - known)]
    return classes


def _study_info(study: Volume) -> dict[str, Any]:
    geometry = study.geometry
    info: dict[str, Any] = {
        "name": study.name,
        "size": list(geometry.size),
        "spacing_mm": [round(s, 6) for s in geometry.spacing],
        "orientation": orientation_code(geometry.direction),
        "tilt_degrees": round(tilt_degrees(geometry.direction), 2),
    }
    dicom = study.metadata.get("dicom") if isinstance(study.metadata.get("dicom"), dict) else {}
    info.update({key: str(dicom[key]) for key in _SAFE_DICOM_FIELDS if dicom.get(key)})
    return info


def _model_info(model_metadata: Any) -> dict[str, Any]:
    if model_metadata is None:
        return {"name": None, "note": "no model described"}
    training = model_metadata.training or {}
    values = {c.value for c in model_metadata.classes}
    return {
        "name": model_metadata.name,
        "version": model_metadata.version,
        "architecture": model_metadata.architecture,
        "description": model_metadata.description,
        "classes": [c.name for c in model_metadata.classes if c.value != BACKGROUND],
        "detects_lesions": LESION in values,
        "validation": json_safe(model_metadata.metrics),
        "validation_cases": json_safe(training.get("val_cases", [])),
        "training_cases": len(training.get("train_cases", [])),
        "trained": training.get("started") or training.get("saved"),
    }


def _nearest_body(review: LabelReview, superior_mm: float) -> str | None:
    bodies = [s for s in review.levels if s.value == VERTEBRAL_BODY]
    if not bodies:
        return None
    return min(bodies, key=lambda s: abs(s.superior_mm - superior_mm)).name


def build_report(
    study: Volume,
    labels: Volume,
    model_metadata: Any = None,
    warnings: Sequence[PreflightWarning | str] | None = None,
    overlay: bool = True,
    model_note: str | None = None,
    levels: Any = None,
) -> dict[str, Any]:
    """The report of ``labels`` (a label map on ``study``'s grid) as a JSON-safe dict.

    ``model_metadata`` (a :class:`~napari_spineseg.modelfile.ModelMetadata`) describes the model;
    ``warnings`` defaults to :func:`~napari_spineseg.preflight.preflight` of ``study``.  With
    ``overlay`` the mid-sagittal PNG is kept under ``report["overlay"]["png_base64"]`` (the JSON
    writer leaves it out).  ``levels`` (a :class:`~napari_spineseg.levels.LevelResult`, e.g. renumbered by
    hand) names the levels; by default they are identified from ``labels``.  Raises
    :class:`GeometryMismatchError` when the grids differ.
    """
    check_same_grid(study, labels, what=f"study {study.name!r} and segmentation {labels.name!r}")
    array = _integer_labels(labels)
    present = [int(v) for v in np.unique(array) if v != BACKGROUND]
    classes = _report_classes(model_metadata, present)
    review = review_labels(array, labels.geometry, classes)
    from .levels import identify_levels, name_review

    level_result = levels if levels is not None else identify_levels(array, labels.geometry)  # corrected levels
    review, level_naming = name_review(review, level_result)
    by_value = {c.value: c for c in review.classes}
    voxel_ml = float(np.prod(labels.geometry.spacing)) / 1000.0
    class_rows = []
    for label_class in classes:
        if label_class.value == BACKGROUND or (label_class.value not in by_value and label_class.value > LESION):
            continue
        summary = by_value.get(label_class.value)
        class_rows.append(
            {
                "value": label_class.value,
                "name": label_class.name,
                "voxels": summary.voxels if summary else 0,
                "volume_ml": round(summary.volume_ml, 4) if summary else 0.0,
                "components": summary.components if summary else 0,
                "color": list(label_class.color),
            }
        )
    class_names = {c.value: c.name for c in classes}
    levels = [
        {
            "order": i,
            "name": s.name,
            "structure": class_names[s.value],
            "value": s.value,
            "volume_ml": round(s.volume_ml, 4),
            "height_mm": round(s.height_mm, 2),
            "superior_mm": round(s.superior_mm, 2),
            "note": s.note,
        }
        for i, s in enumerate(review.levels, start=1)
    ]
    lesions = [
        {
            "number": lesion.number,
            "volume_ml": round(lesion.volume_ml, 4),
            "level": lesion.host,
            "nearest_level": lesion.host or _nearest_body(review, lesion.superior_mm),
            "superior_mm": round(lesion.superior_mm, 2),
        }
        for lesion in review.lesions
    ]
    for number, lesion in enumerate(lesions, start=1):
        lesion["number"] = number  # numbered superior -> inferior, as listed

    if warnings is None:
        warnings = preflight(study)
    warning_rows = [{"source": "study", "code": getattr(w, "code", "preflight"), "message": str(w)} for w in warnings]
    warning_rows += [
        {"source": "segmentation", "code": "reader", "message": str(w)} for w in labels.metadata.get("warnings", [])
    ]
    if not present:
        warning_rows.append({"source": "segmentation", "code": "empty", "message": "the segmentation is empty"})
    else:
        from .plausibility import body_part_of, plausibility_warnings

        warning_rows += [
            {"source": "segmentation", "code": "plausibility", "message": message}
            for message in plausibility_warnings(
                review, body_part_of(study.metadata), any(c.value == VERTEBRAL_BODY for c in classes)
            )
        ]
    model = _model_info(model_metadata)
    if model_metadata is not None:
        unknown = sorted(set(present) - set(model_metadata.class_values))
        if unknown:
            warning_rows.append(
                {
                    "source": "segmentation",
                    "code": "classes",
                    "message": f"label values {unknown} are not classes of model {model_metadata.name!r}: "
                    "the segmentation was edited or comes from another model",
                }
            )
    if model_note:
        model["note"] = model_note

    from . import __version__

    report: dict[str, Any] = {
        "report": "napari-spineseg segmentation report",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": {"name": "napari-spineseg", "version": __version__},
        "disclaimer": DISCLAIMER,
        "study": _study_info(study),
        "segmentation": {"name": labels.name, "label_values": present, "voxel_ml": voxel_ml},
        "classes": class_rows,
        "levels": levels,
        "level_naming": level_naming,
        "level_identification": {"status": level_result.status, "reason": level_result.reason},
        "fragments": {class_names[v]: n for v, n in review.fragments.items() if n},
        "lesions": lesions,
        "lesion_summary": NO_LESION if not lesions else review.lesion_message(),
        "model": model,
        "warnings": warning_rows,
    }
    if not lesions and model_metadata is not None and not model["detects_lesions"] and LESION not in present:
        report["lesion_note"] = (
            f"model {model_metadata.name!r} has no lesion class: it cannot detect lesions, so their absence "
            "here says nothing about the patient"
        )
    if overlay:
        png, info = render_overlay(study, Volume(array, labels.geometry, labels.name), review, classes)
        report["overlay"] = {**info, "png_base64": base64.b64encode(png).decode("ascii")}
    return json_safe(report)


# --- mid-sagittal overlay ----------------------------------------------------------------------


@dataclass(frozen=True)
class SagittalView:
    """One sagittal slice for display: rows run superior → inferior, columns anterior → posterior."""

    image: np.ndarray
    labels: np.ndarray
    body_projection: np.ndarray  # vertebral body in any sagittal slice (rows × columns)
    lesion_projection: np.ndarray  # lesion in any sagittal slice
    index: int  # the slice, counted from the patient's right (canonical LPI order)
    slices: int
    row_mm: float
    col_mm: float
    geometry: Geometry  # the canonical (LPI) grid the slice is taken from


def mid_sagittal(study: Volume, labels: Volume) -> SagittalView:
    """The sagittal slice through the L-R centroid of the vertebral bodies (of all labels if none).

    Works from the direction cosines (any storage order, no resampling): the canonical LPI array
    ``[I, P, L]`` puts superior at the top and anterior on the left of each sagittal slice.
    """
    check_same_grid(study, labels, what="study and segmentation")
    transform, canonical = reorientation_to(study.geometry)
    image = transform.forward(np.asarray(study.array))
    label_array = transform.forward(np.asarray(labels.array))
    bodies = label_array == VERTEBRAL_BODY
    weights = bodies.sum(axis=(0, 1)) if bodies.any() else (label_array > 0).sum(axis=(0, 1))
    slices = label_array.shape[2]
    index = round(float(np.average(np.arange(slices), weights=weights))) if weights.any() else slices // 2
    return SagittalView(
        image=np.asarray(image[:, :, index]),
        labels=np.asarray(label_array[:, :, index]),
        body_projection=bodies.any(axis=2),
        lesion_projection=(label_array == LESION).any(axis=2),
        index=int(index),
        slices=int(slices),
        row_mm=float(canonical.spacing_zyx[0]),
        col_mm=float(canonical.spacing_zyx[1]),
        geometry=canonical,
    )


def render_overlay(
    study: Volume,
    labels: Volume,
    review: LabelReview | None = None,
    classes: Sequence[LabelClass] = DEFAULT_CLASSES,
    height_inches: float = 5.5,
    dpi: int = 110,
) -> tuple[bytes, dict[str, Any]]:
    """PNG of the sagittal slice through the labelled spine (superior up, anterior left, true aspect).

    The slice is the one nearest the L-R centroid of the vertebral bodies (of all labels when there
    are none).  Labels are translucent class colours; lesions anywhere in the volume are also
    outlined by their L-R projection.  Returns the PNG bytes and where the slice lies.
    """
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    view = mid_sagittal(study, labels)
    if review is None:
        review = review_labels(labels.array, labels.geometry, classes)
    picture = np.asarray(view.image, dtype=np.float64)
    slab, index, canonical = view.labels, view.index, view.geometry
    row_mm, col_mm = view.row_mm, view.col_mm
    rows, cols = picture.shape
    height_mm, width_mm = rows * row_mm, cols * col_mm
    extent = (0.0, width_mm, height_mm, 0.0)

    aspect = width_mm / height_mm
    width_inches = min(max(height_inches * aspect, 2.5), 2.2 * height_inches)  # margins stay black, never stretch
    figure = Figure(figsize=(width_inches, height_inches), dpi=dpi, facecolor="black")
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_axis_off()
    finite = picture[np.isfinite(picture)]
    low, high = np.percentile(finite, [1, 99.5]) if finite.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0
    axes.imshow(picture, cmap="gray", vmin=low, vmax=high, extent=extent, interpolation="bilinear")
    colours = {c.value: c.color for c in classes}
    shown = [int(v) for v in np.unique(slab) if v != BACKGROUND]
    if shown:
        table = np.zeros((int(slab.max()) + 1, 4))
        for value in shown:
            table[value] = (*colours.get(value, class_for_value(value, classes).color)[:3], _OVERLAY_ALPHA)
        axes.imshow(table[slab], extent=extent, interpolation="nearest")
    handles = [Patch(color=colours.get(v, class_for_value(v, classes).color), label=_name(v, classes)) for v in shown]
    lesion_projection = view.lesion_projection
    if lesion_projection.any():
        xs = (np.arange(cols) + 0.5) * col_mm
        ys = (np.arange(rows) + 0.5) * row_mm
        red = colours.get(LESION, (0.95, 0.2, 0.25, 1.0))
        axes.contour(xs, ys, lesion_projection.astype(float), levels=[0.5], colors=[red[:3]], linewidths=1.2)
        handles.append(Patch(facecolor="none", edgecolor=red[:3], label="lesion (outline: all slices)"))
    _name_bodies(axes, review, canonical, view.body_projection, index, patheffects)
    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    for text, x, y, ha, va in (
        ("S", 0.5, 0.99, "center", "top"),
        ("I", 0.5, 0.01, "center", "bottom"),
        ("A", 0.01, 0.5, "left", "center"),
        ("P", 0.99, 0.5, "right", "center"),
    ):
        axes.text(x, y, text, transform=axes.transAxes, ha=ha, va=va, color="white", fontsize=9, path_effects=outline)
    if handles:
        axes.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.75, borderpad=0.4)
    axes.set_xlim(0, width_mm)
    axes.set_ylim(height_mm, 0)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, facecolor="black")
    lr_mm = float(canonical.index_to_lps([[index, cols / 2.0, rows / 2.0]])[0, 0])
    info = {
        "plane": "sagittal",
        "slice": index,
        "slices": view.slices,
        "lr_mm": round(lr_mm, 2),
        "display": "superior up, anterior left",
    }
    return buffer.getvalue(), info


def _name(value: int, classes: Sequence[LabelClass]) -> str:
    return class_for_value(value, classes).name


def _name_bodies(axes: Any, review: LabelReview, canonical: Any, projection: np.ndarray, index: int, effects) -> None:
    """Write each body's name anterior (left) of the body, at the height of its centroid."""
    rows, cols = projection.shape
    row_mm, col_mm = canonical.spacing_zyx[0], canonical.spacing_zyx[1]
    row_positions = canonical.index_to_lps(
        np.column_stack([np.full(rows, index), np.full(rows, cols / 2.0), np.arange(rows)])
    )
    row_s = row_positions[:, 2]
    outline = [effects.withStroke(linewidth=2, foreground="black")]
    for structure in review.levels:
        if structure.value != VERTEBRAL_BODY:
            continue
        row = int(np.argmin(np.abs(row_s - structure.superior_mm)))
        hits = np.flatnonzero(projection[max(row - 1, 0) : row + 2].any(axis=0))
        if hits.size == 0:
            continue
        x = hits.min() * col_mm
        y = min(max((row + 0.5) * row_mm, 0.06 * rows * row_mm), 0.94 * rows * row_mm)  # clear of S/I marks
        if x > 25.0:
            axes.text(
                x - 2.0, y, structure.name, ha="right", va="center", color="white", fontsize=7, path_effects=outline
            )
        else:
            x = (hits.max() + 1) * col_mm
            axes.text(
                x + 2.0, y, structure.name, ha="left", va="center", color="white", fontsize=7, path_effects=outline
            )


# --- writing -----------------------------------------------------------------------------------


def report_to_json(report: dict[str, Any]) -> str:
    """The report as indented JSON, without the embedded overlay image."""
    record = dict(report)
    if isinstance(record.get("overlay"), dict):
        record["overlay"] = {k: v for k, v in record["overlay"].items() if k != "png_base64"}
    return json.dumps(json_safe(record), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report`` atomically as JSON (``.json``) or a one-page HTML (``.html``/``.htm``)."""
    from .io import atomic_path

    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = report_to_json(report)
    elif suffix in (".html", ".htm"):
        text = report_to_html(report)
    else:
        raise InputError(f"{path}: a report must end in .html or .json")
    try:
        with atomic_path(path) as temp:
            temp.write_text(text, encoding="utf-8")
    except OSError as error:
        raise VolumeWriteError(f"{path}: cannot write the report ({error.strerror or error})") from None
    return path


_CSS = """
@page { size: A4; margin: 10mm; }
* { box-sizing: border-box; }
body { font: 10.5px/1.35 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d232a;
       margin: 0 auto; max-width: 200mm; padding: 6mm; }
h1 { font-size: 16px; margin: 0 0 2px; } h2 { font-size: 12px; margin: 8px 0 3px; border-bottom: 1px solid #ccd; }
.meta { color: #556; margin-bottom: 4px; }
.disclaimer { background: #fff3cd; border: 1px solid #e0c36a; padding: 3px 6px; font-weight: 600; margin: 4px 0; }
.grid { display: grid; grid-template-columns: minmax(0, 46%) minmax(0, 54%); gap: 8px; align-items: start; }
figure { margin: 0; } figure img { width: 100%; max-height: 190mm; object-fit: contain; background: #000; }
figcaption { color: #556; font-size: 9.5px; }
table { border-collapse: collapse; width: 100%; margin-bottom: 2px; }
th, td { border-bottom: 1px solid #e3e5ea; padding: 1px 4px; text-align: left; vertical-align: top; }
th { background: #f1f3f6; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.summary { font-weight: 600; } .note { color: #556; font-size: 9.5px; }
.warn { color: #8a4b00; } .swatch { display: inline-block; width: 9px; height: 9px; margin-right: 4px;
        border: 1px solid #0003; vertical-align: -1px; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _number(value: Any, digits: int = 2) -> str:
    return "" if value is None else f"{float(value):.{digits}f}"


def _rows(header: Sequence[str], rows: Sequence[Sequence[tuple[str, bool]]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if num else f"<td>{c}</td>" for c, num in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_METRIC_NAMES = {
    "val_dice": "Dice",
    "val_mean_dice": "mean Dice",
    "step": "at training step",
    "held_out_fused": "held-out studies (three planes fused, post-processed)",
    "held_out_cases": "held-out studies",
    "held_out_estimate": "estimate where this version has no held-out study (an earlier version's held-out figures)",
    "held_out_estimate_cases": "studies of the estimate",
    "held_out_estimate_from": "estimate from",
}


_COLUMN_NAMES = {
    "dice": "Dice",
    "iou": "IoU",
    "asd_mm": "ASD (mm)",
    "nsd_2mm": "NSD at 2 mm",
    "hd95_mm": "HD95 (mm)",
    "volume_pred_ml": "volume, model (mL)",
    "volume_truth_ml": "volume, truth (mL)",
}


def _cell(value: Any) -> tuple[str, bool]:
    if isinstance(value, bool) or value is None:
        return _e(value), False
    if isinstance(value, float):
        return f"{value:.3f}", True
    if isinstance(value, int):
        return _e(value), True
    if isinstance(value, (list, tuple)):
        return _e(", ".join(str(v) for v in value)), False
    return _e(value), False


def _validation_html(metrics: Any) -> str:
    """A model's recorded validation figures as tables (never a raw key dump).

    Scalars (and lists) go in one two-column table; a mapping of scalars (e.g. Dice per class)
    becomes a table of its own; a mapping of mappings (e.g. per dataset and class: Dice, HD95...)
    one row per entry and one column per figure.
    """
    if not isinstance(metrics, dict) or not metrics:
        return ""
    summary: list[list[tuple[str, bool]]] = []
    tables: list[str] = []
    for key, value in metrics.items():
        name = _METRIC_NAMES.get(str(key), str(key).replace("_", " "))
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            columns = list(dict.fromkeys(c for row in value.values() for c in row))
            header = ["", *[_COLUMN_NAMES.get(str(c), str(c).replace("_", " ")) for c in columns]]
            rows = [[(_e(label), False), *[_cell(row.get(c)) for c in columns]] for label, row in value.items()]
            tables.append(f"<p>{_e(name)}</p>" + _rows(header, rows))
        elif isinstance(value, dict):
            rows = [[(_e(label), False), _cell(v)] for label, v in value.items()]
            tables.append(f"<p>{_e(name)}</p>" + _rows(["", "value"], rows))
        else:
            summary.append([(_e(name), False), _cell(value)])
    head = _rows(["figure", "value"], summary) if summary else ""
    return head + "".join(tables)


def report_to_html(report: dict[str, Any]) -> str:
    """A single self-contained HTML page (inline CSS, embedded PNG) of ``report``."""
    study, model = report.get("study", {}), report.get("model", {})
    study_rows = [
        ("name", study.get("name")),
        ("size (x, y, z)", " × ".join(str(s) for s in study.get("size", []))),
        ("spacing (x, y, z)", " × ".join(f"{s:g}" for s in study.get("spacing_mm", [])) + " mm"),
        ("orientation", study.get("orientation")),
        *[(key.replace("_", " "), study[key]) for key in _SAFE_DICOM_FIELDS if key in study],
        ("segmentation", report.get("segmentation", {}).get("name")),
    ]
    study_table = "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in study_rows) + "</table>"

    def swatch(row: dict[str, Any]) -> str:
        r, g, b = (round(255 * float(c)) for c in (row.get("color") or class_for_value(row["value"]).color)[:3])
        return f'<span class="swatch" style="background:rgb({r},{g},{b})"></span>'

    class_table = _rows(
        ["class", "volume (mL)", "voxels", "parts"],
        [
            [
                (swatch(c) + _e(c["name"]), False),
                (_number(c["volume_ml"]), True),
                (_e(c["voxels"]), True),
                (_e(c["components"]), True),
            ]
            for c in report.get("classes", [])
        ],
    )
    levels = report.get("levels", [])
    level_table = (
        _rows(
            ["#", "level", "structure", "volume (mL)", "height (mm)", "centre S (mm)", "note"],
            [
                [
                    (_e(s["order"]), True),
                    (_e(s["name"]), False),
                    (_e(s["structure"]), False),
                    (_number(s["volume_ml"]), True),
                    (_number(s["height_mm"], 1), True),
                    (_number(s["superior_mm"], 1), True),
                    (_e(s.get("note", "")), False),
                ]
                for s in levels
            ],
        )
        if levels
        else "<p>No vertebral body or disc labelled.</p>"
    )
    lesions = report.get("lesions", [])
    if lesions:
        lesion_table = _rows(
            ["#", "volume (mL)", "level", "centre S (mm)"],
            [
                [
                    (_e(x["number"]), True),
                    (_number(x["volume_ml"], 3), True),
                    (_e(x["level"] or f"outside the bodies (nearest {x['nearest_level'] or 'none'})"), False),
                    (_number(x["superior_mm"], 1), True),
                ]
                for x in lesions
            ],
        )
    else:
        lesion_table = ""
    lesion_note = f'<p class="note">{_e(report["lesion_note"])}</p>' if report.get("lesion_note") else ""
    if model.get("name"):
        cases = model.get("validation_cases") or []
        model_html = (
            f"<p><b>{_e(model['name'])}</b> (version {_e(model.get('version'))}, {_e(model.get('architecture'))}): "
            f"{_e(model.get('description'))}</p>"
            f"<p>Classes: {_e(', '.join(model.get('classes', [])))}.</p>"
            "<h3>Validation figures</h3>"
            + (_validation_html(model.get("validation")) or "<p>None recorded.</p>")
            + (f"<p>Validation cases: {_e(', '.join(cases))}</p>" if cases else "")
        )
    else:
        model_html = "<p>No model described.</p>"
    if model.get("note"):
        model_html += f'<p class="note">{_e(model["note"])}</p>'
    warnings = report.get("warnings", [])
    warnings_html = (
        "<ul>" + "".join(f'<li class="warn">{_e(w["source"])}: {_e(w["message"])}</li>' for w in warnings) + "</ul>"
        if warnings
        else "<p>None.</p>"
    )
    overlay = report.get("overlay") or {}
    if overlay.get("png_base64"):
        figure = (
            f'<figure><img alt="mid-sagittal overlay" src="data:image/png;base64,{overlay["png_base64"]}">'
            f"<figcaption>Sagittal slice {_e(overlay.get('slice'))} of {_e(overlay.get('slices'))} through the "
            f"labelled spine; {_e(overlay.get('display'))}, true proportions.</figcaption></figure>"
        )
    else:
        figure = "<p>No overlay image.</p>"
    software = report.get("software", {})
    fragments = report.get("fragments") or {}
    fragment_note = (
        '<p class="note">Small fragments not counted as levels: '
        + _e(", ".join(f"{k} {v}" for k, v in fragments.items()))
        + "</p>"
        if fragments
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Spine segmentation report</title>
<style>{_CSS}</style></head><body>
<h1>Spine segmentation report</h1>
<div class="meta">{_e(software.get("name"))} {_e(software.get("version"))} · created {_e(report.get("created"))}</div>
<div class="disclaimer">{_e(report.get("disclaimer", DISCLAIMER))}</div>
<div class="grid"><div>{figure}</div><div>
<h2>Study</h2>{study_table}
<h2>Volumes per class</h2>{class_table}
<h2>Levels, superior → inferior</h2>{level_table}
<p class="note">{_e(report.get("level_naming", ""))}</p>{fragment_note}
<h2>Lesions</h2><p class="summary">{_e(report.get("lesion_summary"))}</p>{lesion_table}{lesion_note}
</div></div>
<h2>Model</h2>{model_html}
<h2>Warnings</h2>{warnings_html}
</body></html>
"""
