"""Draw the model card's "good and bad cases" figure (docs/images/model-validation-cases.png).

    .venv/bin/python scripts/validation_figure.py [--model spineseg-default] [--data ../shared/data]

Segments held-out validation cases with the model through the normal API (``Predictor`` with
``SegmentationSettings()`` defaults) and shows one mid-sagittal slice per case: the slice through
the left-right centre of the manually labelled bodies (discs for IVD cases), superior up, anterior
left, true millimetre aspect (``napari_spineseg.report.mid_sagittal``).  Prediction = translucent
class-colour fill, manual labels = red contours, dashed lines = the labelled superior-inferior
span (the only part that is evaluated).  Panel titles carry the case's 3-D Dice, counted inside
that span as ``scripts/evaluate_model.py`` does.

The cases are picked from ``benchmarks/results/<model>_validation.csv`` (fused rows): the best VB3
case, the worst VB1 case and the IVD case; ``--cases`` overrides the choice.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import patheffects
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from napari_spineseg.inference import Predictor, SegmentationSettings
from napari_spineseg.metrics import evaluate_labels
from napari_spineseg.modelfile import load_model
from napari_spineseg.orientation import reorientation_to
from napari_spineseg.report import mid_sagittal
from napari_spineseg.schema import BACKGROUND, DEFAULT_CLASSES, class_for_value
from napari_spineseg.training.data import load_lumbar_dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUTPUT = ROOT / "docs" / "images" / "model-validation-cases.png"
FILL_ALPHA = 0.45
TRUTH_COLOUR = (1.0, 0.1, 0.1)


def pick_cases(csv_path: Path) -> list[tuple[str, str]]:
    """(case id, why) for the best VB3, the worst VB1 and the (first) IVD case of the fused rows."""
    with csv_path.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["planes"] == "fused"]
    by_dataset: dict[str, list[tuple[float, str]]] = {}
    for row in rows:
        by_dataset.setdefault(row["dataset"], []).append((float(row["dice"]), row["case"]))
    chosen = []
    if by_dataset.get("VB3"):
        chosen.append((max(by_dataset["VB3"])[1], "best VB3"))
    if by_dataset.get("VB1"):
        chosen.append((min(by_dataset["VB1"])[1], "worst VB1"))
    if by_dataset.get("IVD"):
        chosen.append((sorted(by_dataset["IVD"], key=lambda t: t[1])[0][1], "IVD"))
    if not chosen:
        raise SystemExit(f"{csv_path}: no fused validation rows")
    return chosen


def panel(axes, case, prediction: np.ndarray, why: str, classes) -> dict:
    """Draw one case; returns the Dice per labelled class and where the slice is."""
    truth = case.evaluation_labels()
    region = case.region
    spacing = case.labels.geometry.spacing_zyx
    dice = {}
    for value in sorted(case.known_classes):
        (m,) = evaluate_labels(prediction, truth, spacing, classes=[value], region=region, surface=False)
        dice[class_for_value(value, classes).name] = float(m.dice)

    # The slice through the L-R centre of the manual labels, in canonical LPI order [I, P, L]
    # (rows superior -> inferior, columns anterior -> posterior); the same flips for the prediction.
    view = mid_sagittal(case.image, case.labels.with_array(truth))
    transform, _ = reorientation_to(case.image.geometry)
    predicted = np.asarray(transform.forward(prediction)[:, :, view.index])
    in_span = np.asarray(transform.forward(region)[:, :, view.index]).any(axis=1)
    picture = np.asarray(view.image, dtype=np.float64)
    rows, cols = picture.shape
    height_mm, width_mm = rows * view.row_mm, cols * view.col_mm
    extent = (0.0, width_mm, height_mm, 0.0)

    low, high = np.percentile(picture, [1, 99.5])
    axes.imshow(picture, cmap="gray", vmin=low, vmax=max(high, low + 1), extent=extent, interpolation="bilinear")
    table = np.zeros((max(int(predicted.max()), 1) + 1, 4))
    for value in np.unique(predicted):
        if value != BACKGROUND:
            table[value] = (*class_for_value(int(value), classes).color[:3], FILL_ALPHA)
    axes.imshow(table[predicted], extent=extent, interpolation="nearest")
    xs = (np.arange(cols) + 0.5) * view.col_mm
    ys = (np.arange(rows) + 0.5) * view.row_mm
    for value in np.unique(view.labels):
        if value != BACKGROUND:
            mask = (view.labels == value).astype(float)
            axes.contour(xs, ys, mask, levels=[0.5], colors=[TRUTH_COLOUR], linewidths=1.0)
    span_rows = np.flatnonzero(in_span)
    if span_rows.size:
        for y in (span_rows[0] * view.row_mm, (span_rows[-1] + 1) * view.row_mm):
            axes.axhline(y, color="white", linestyle=(0, (4, 3)), linewidth=0.8, alpha=0.8)

    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    style = {"color": "white", "fontsize": 11, "fontweight": "bold", "path_effects": outline}
    axes.text(0.5, 0.995, "S", transform=axes.transAxes, ha="center", va="top", **style)
    axes.text(0.5, 0.005, "I", transform=axes.transAxes, ha="center", va="bottom", **style)
    axes.text(0.01, 0.5, "A", transform=axes.transAxes, ha="left", va="center", **style)
    axes.text(0.99, 0.5, "P", transform=axes.transAxes, ha="right", va="center", **style)
    bar = 50.0  # mm scale bar, bottom left
    x0, y0 = 0.04 * width_mm, 0.96 * height_mm
    axes.plot([x0, x0 + bar], [y0, y0], color="white", linewidth=2.5, solid_capstyle="butt")
    axes.text(
        x0 + bar / 2,
        y0 - 0.015 * height_mm,
        f"{bar:.0f} mm",
        color="white",
        fontsize=9,
        ha="center",
        va="bottom",
        path_effects=outline,
    )

    scores = ", ".join(f"{name} Dice {value:.3f}" for name, value in dice.items())
    title = f"{case.case_id} ({why})" if why else case.case_id
    axes.set_title(f"{title}\n{scores}", fontsize=11)
    axes.set_xlim(0, width_mm)
    axes.set_ylim(height_mm, 0)
    axes.set_aspect("equal")
    axes.set_xticks([])
    axes.set_yticks([])
    canal = int((prediction == 3).sum())
    return {"case": case.case_id, "dice": dice, "slice": view.index, "slices": view.slices, "canal_voxels": canal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spineseg-default")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--cases", help="comma-separated case ids (default: picked from the validation CSV)")
    parser.add_argument("-o", "--output", default=str(OUTPUT))
    args = parser.parse_args()
    model = load_model(args.model)
    if args.cases:
        chosen = [(c, "") for c in args.cases.split(",")]
    else:
        chosen = pick_cases(RESULTS / f"{model.metadata.name}_validation.csv")
    cases = {c.case_id: c for c in load_lumbar_dataset(Path(args.data) / "lumbar-mri", cases=[c for c, _ in chosen])}
    classes = list(getattr(model.metadata, "classes", None) or DEFAULT_CLASSES)
    predictor = Predictor(SegmentationSettings())
    predictor.load(model)

    predictions = {cid: np.asarray(predictor.predict(cases[cid].image).labels.array) for cid, _ in chosen}
    widths = []
    for cid, _ in chosen:
        geometry = reorientation_to(cases[cid].image.geometry)[1]
        (cols_mm, rows_mm) = (geometry.size[1] * geometry.spacing[1], geometry.size[2] * geometry.spacing[2])
        widths.append(cols_mm / rows_mm)
    height = 6.0
    figure, axes = plt.subplots(
        1, len(chosen), figsize=(height * sum(widths) + 0.6, height + 1.1), gridspec_kw={"width_ratios": widths}
    )
    axes = np.atleast_1d(axes)
    for ax, (cid, why) in zip(axes, chosen):
        info = panel(ax, cases[cid], predictions[cid], why, classes)
        print(info, flush=True)
    shown = sorted({int(v) for p in predictions.values() for v in np.unique(p) if v != BACKGROUND})
    handles = [
        Patch(
            color=(*class_for_value(v, classes).color[:3], FILL_ALPHA + 0.2),
            label=f"prediction: {class_for_value(v, classes).name}",
        )
        for v in shown
    ]
    handles.append(Line2D([], [], color=TRUTH_COLOUR, linewidth=1.5, label="manual label (outline)"))
    handles.append(Line2D([], [], color="0.3", linestyle=(0, (4, 3)), label="labelled S–I span (evaluated)"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=10, frameon=False)
    figure.tight_layout(rect=(0, 0.045, 1, 1))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110, bbox_inches="tight", pad_inches=0.12)
    print("wrote", output)


if __name__ == "__main__":
    main()
