"""Take the user guide's screenshots (docs/images/*.png) in a real, visible napari window.

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py

Your own models and widget settings are not touched: the script points ``SPINESEG_MODEL_DIR`` and
``SPINESEG_CONFIG_DIR`` at ``--cache``.  The segmentation model is ``--model``: the bundled
default model unless told otherwise (a model name, a .safetensors path, or ``phantom-demo``: a
small U-Net trained for a few minutes on synthetic phantoms and cached in ``--cache``).

The study is the bundled T1 phantom (File ▸ Open Sample); the "open a study" picture uses a real
sagittal lumbar study from ``../shared/data`` when it is present.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from napari_spineseg.modelfile import DEFAULT_MODEL_NAME

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "napari-spineseg"


def train_demo_model(models: Path, steps: int) -> str:
    """A small U-Net trained on phantoms (a few minutes on a CPU); cached between runs."""
    from napari_spineseg.augment import AugmentConfig
    from napari_spineseg.preprocess import PreprocessConfig
    from napari_spineseg.training import TrainConfig, phantom_cases, train

    path = models / "phantom-demo.safetensors"
    if path.is_file():
        return "phantom-demo"
    print(f"training the demo model ({steps} steps on phantoms)...", flush=True)
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))  # far faster on a busy machine
    cases = phantom_cases(4, seed=10, size=(120, 120, 40), spacing=(2.2, 2.2, 4.0), lesions=2)
    config = TrainConfig(
        architecture="unet",
        architecture_kwargs={"base": 8, "depth": 3},
        context_slices=1,
        steps=steps,
        batch_size=8,
        crop_size=96,
        lr=3e-3,
        preprocess=PreprocessConfig(pixel_spacing_mm=2.2),
        augment=AugmentConfig(elastic_prob=0.0, rotate_prob=0.3),
        sampling="balanced",
        mixed_precision="off",
        val_every=max(1, steps // 4),
        output=path,
        model_name="phantom-demo",
        description="Demo U-Net trained briefly on synthetic phantoms (screenshots only; not for clinical use).",
    )
    for event in train(config, cases[:3], cases[3:]):
        if event.kind == "validation":
            print(f"  step {event.step}: validation Dice {event.val_dice}", flush=True)
    return "phantom-demo"


def settle(seconds: float = 0.6) -> None:
    """Let Qt lay out and paint (the canvas renders only in the event loop)."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.02)


class Shots:
    def __init__(self, viewer, out: Path) -> None:
        self.viewer = viewer
        self.out = out
        self.docks: dict[str, object] = {}

    def dock(self, name: str):
        dock, widget = self.viewer.window.add_plugin_dock_widget(PLUGIN, name)
        self.docks[name] = dock
        return widget

    def only(self, name: str | None) -> None:
        for key, dock in self.docks.items():
            dock.setVisible(key == name)

    def take(self, filename: str) -> Path:
        settle()
        path = self.out / filename
        self.viewer.screenshot(str(path), canvas_only=False, flash=False)
        print(f"wrote {path}", flush=True)
        return path


def interpolate_shot(viewer, shots: Shots, image, study: Path, model: str) -> None:
    """09: the annotator fixes the bodies on one sagittal slice of a study resampled from 4 mm slices;
    the Interpolate widget copies it to the slices resampled with it (preview shown on a twin)."""
    from napari_spineseg.io import read_volume
    from napari_spineseg.resampled import resampled_runs
    from napari_spineseg.widgets._views import show_plane

    truth = read_volume(study.with_name(study.name.replace("_img", "_seg"))).array > 0  # L1..L5 bodies
    segment = shots.dock("Segment spine")
    segment.image_combo.set_layer(image)
    segment.model_combo.refresh(select=model)
    segment.run(sync=True)
    labels = segment.last_layer
    labels.opacity = 0.5
    for layer in viewer.layers:  # the level names would hide which voxels the preview changes
        layer.visible = layer is image or layer is labels
    runs = resampled_runs(np.asarray(image.data), 0)  # sagittal slices are stacked along axis 0 (PIR)
    run = runs[len(runs) // 2]
    k = run[len(run) // 2]
    span = np.flatnonzero(truth.any(axis=(0, 2)))  # the labelled superior-inferior rows
    current = np.asarray(labels.data[k])
    fix = np.zeros(current.shape, bool)
    fix[span[0] : span[-1] + 1] = True
    wrong = fix & ((current == 1) != truth[k])
    rows, cols = np.nonzero(wrong)
    labels.data_setitem((np.full(rows.shape, k), rows, cols), np.where(truth[k][wrong], 1, 0).astype(np.uint8))
    interpolate = shots.dock("Interpolate between painted slices")
    interpolate.labels_combo.set_layer(labels)
    interpolate.plane_combo.setCurrentText("sagittal")
    interpolate.preview(sync=True)
    show_plane(viewer, image, "sagittal", run[-1])  # a twin: the preview shows the copied bodies
    viewer.reset_view()
    shots.only("Interpolate between painted slices")
    shots.take("09-interpolate.png")
    interpolate._remove_preview()
    shots.only(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/spineseg-screenshots"))
    parser.add_argument(
        "--model", default=DEFAULT_MODEL_NAME, help="model name or path; 'phantom-demo' trains a small phantom model"
    )
    parser.add_argument("--demo-steps", type=int, default=2000)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--only", choices=["interpolate"], help="take only this screenshot")
    args = parser.parse_args(argv)

    models, config = args.cache / "models", args.cache / "config"
    models.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(config, ignore_errors=True)
    for stale in models.glob("*-hemangioma.safetensors"):
        stale.unlink()
    os.environ["SPINESEG_MODEL_DIR"] = str(models)
    os.environ["SPINESEG_CONFIG_DIR"] = str(config)
    args.out.mkdir(parents=True, exist_ok=True)
    model = train_demo_model(models, args.demo_steps) if args.model == "phantom-demo" else args.model

    import napari

    from napari_spineseg.widgets._views import show_plane

    viewer = napari.Viewer(title="napari-spineseg", show=True)
    viewer.window._qt_window.resize(1600, 1000)
    viewer.window._qt_window.move(0, 0)
    shots = Shots(viewer, args.out)
    settle(1.0)

    # 1. Open a study: a real sagittal lumbar study and the labels stored beside it.
    real = ROOT.parent / "shared" / "data" / "lumbar-mri" / "VB3" / "01_img.nii.gz"
    if real.is_file():
        layers = viewer.open(str(real), plugin=PLUGIN)
        for layer in layers[1:]:  # its _seg file holds level ids (L1..L5), not the plugin's classes
            viewer.layers.remove(layer)
        image = layers[0]
        viewer.dims.set_point(0, image.translate[0] + image.scale[0] * (image.data.shape[0] // 2))
        viewer.reset_view()
        if args.only is None:
            shots.take("01-open-study.png")
        interpolate_shot(viewer, shots, image, real, model)
        viewer.layers.clear()
    if args.only is not None:
        viewer.close()
        return 0

    # 2. Segment the sample study.
    viewer.open_sample(PLUGIN, "lumbar-phantom-t1")
    image = viewer.layers[0]
    truth = viewer.layers[1]
    truth_array = np.asarray(truth.data).copy()
    viewer.layers.remove(truth)
    segment = shots.dock("Segment spine")
    segment.model_combo.refresh(select=model)
    segment.uncertainty_box.setChecked(True)
    segment.run(sync=True)
    labels = segment.last_layer
    labels.opacity = 0.55
    uncertainty = [
        la for la in viewer.layers if (la.metadata.get("spineseg_result") or {}).get("kind") == "uncertainty"
    ][-1]
    uncertainty.visible = False
    lesion = np.argwhere(truth_array == 4)
    centre = lesion.mean(axis=0) if len(lesion) else np.array(image.data.shape) / 2
    show_plane(viewer, image, "sagittal", round(centre[0]))
    viewer.reset_view()
    shots.only("Segment spine")
    shots.take("02-segment.png")

    # 3. Correct: fix three slices and paint a new structure (value 5) over the lesion.
    k = round(centre[0])
    target = np.where(truth_array == 4, 5, truth_array)
    for z in range(k - 1, k + 2):  # the annotator fixes three sagittal slices...
        wrong = np.argwhere(np.asarray(labels.data[z]) != target[z])
        for value in np.unique(target[z][tuple(wrong.T)]):
            rows, cols = wrong[target[z][tuple(wrong.T)] == value].T
            labels.data_setitem((np.full(rows.shape, z), rows, cols), int(value))
    labels.data_setitem(tuple(lesion.T), 5)  # ...and paints the hemangioma as a new class
    labels.name = f"{image.name} corrected"
    viewer.layers.selection.active = labels
    labels.mode = "paint"
    labels.selected_label = 5
    labels.brush_size = 6
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.zoom = camera.zoom * 2.2
    camera.center = (0, *(np.array(image.translate[1:]) + centre[1:] * np.array(image.scale[1:])))
    shots.take("03-correct.png")
    labels.mode = "pan_zoom"

    # A fresh model result to compare with ("<image> segmentation" again: the edited layer is kept).
    segment.uncertainty_box.setChecked(True)
    segment.run(sync=True)
    model_result = segment.last_layer
    model_result.visible = False
    uncertainty = [
        la for la in viewer.layers if (la.metadata.get("spineseg_result") or {}).get("kind") == "uncertainty"
    ][-1]

    # 4. Review: numbers per class and level, model vs corrected, the most uncertain axial slice.
    review = shots.dock("Review segmentation")
    shots.only("Review segmentation")
    review.labels_combo.set_layer(labels)
    review.refresh(sync=True)
    viewer.reset_view()
    shots.take("04-review.png")
    review.model_combo.set_layer(model_result)
    review.truth_combo.set_layer(labels)
    review.compare(sync=True)
    review.tabs.setCurrentIndex(1)
    shots.take("05-compare.png")
    review.tabs.setCurrentIndex(2)
    uncertainty.visible = True
    review.uncertainty_combo.set_layer(uncertainty)
    review.plane_combo.setCurrentText("axial")
    review.next_uncertain_slice()
    viewer.reset_view()
    shots.take("06-uncertainty.png")

    # 5. Fine-tune on the correction, with a new class "hemangioma".
    uncertainty.visible = False
    show_plane(viewer, image, "sagittal", k)
    viewer.reset_view()
    finetune = shots.dock("Fine-tune model")
    finetune.model_combo.refresh(select=model)
    finetune.add_pair(image, labels)
    for row in range(finetune.class_table.rowCount()):
        if finetune.class_table.item(row, 0).text() == "5":
            finetune.class_table.item(row, 1).setText("hemangioma")
    finetune.steps_box.setValue(args.finetune_steps)
    finetune.lr_box.setValue(1e-4)  # the widget default (the decoder learns 10x faster)
    finetune.start(sync=True)
    name = f"{Path(model).stem}-hemangioma"
    finetune.name_edit.setText(name)
    finetune.save_model(name)
    shots.only("Fine-tune model")
    settle()
    from qtpy.QtWidgets import QScrollArea

    scrollbar = finetune.findChild(QScrollArea).verticalScrollBar()  # show the chart and before/after
    scrollbar.setValue(scrollbar.maximum())
    shots.take("07-finetune.png")

    # 6. Re-segment with the new model.
    finetune.resegment(sync=True)
    segment.last_layer.opacity = 0.55
    labels.visible = False
    shots.only("Segment spine")
    shots.take("08-resegment.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
