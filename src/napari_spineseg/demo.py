"""``spineseg demo`` / ``make demo``: the main job end to end on the bundled sample study.

1. write the bundled sample study (a deterministic T1 lumbar phantom) and its true labels;
2. read the study back and print its geometry (orientation, planes);
3. segment it with the bundled default model over three planes, write the labels back in the
   study's geometry, and print per-class Dice against the phantom's truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import ModelFileError
from .schema import LESION, VERTEBRAL_BODY


def run_demo(output_dir: Path, device: str = "auto") -> int:
    """Run the demo into ``output_dir``; returns a process exit status."""
    from .inference import Predictor, SegmentationSettings
    from .io import read_volume, write_labels, write_volume
    from .metrics import evaluate_volumes, format_table
    from .modelfile import DEFAULT_MODEL_NAME, load_model
    from .phantom import sample_study
    from .preflight import format_volume_info, volume_info

    output_dir.mkdir(parents=True, exist_ok=True)
    phantom = sample_study()
    study_path = write_volume(phantom.image, output_dir / "sample_study.nii.gz")
    truth_path = write_labels(phantom.labels, output_dir / "sample_study_truth.nii.gz")
    study = read_volume(study_path)
    print(format_volume_info(volume_info(study)))
    print(f"levels in view: {', '.join(phantom.levels)}; simulated lesion in {', '.join(phantom.lesion_levels) or '-'}")

    try:
        model = load_model(DEFAULT_MODEL_NAME)
    except ModelFileError as error:
        copy_path = write_labels(read_volume(truth_path), output_dir / "sample_study_labels_roundtrip.nii.gz")
        back = read_volume(copy_path)
        exact = back.geometry == study.geometry and np.array_equal(back.array, phantom.labels.array)
        print(f"no bundled model ({error}); label round trip exact: {exact} -> {copy_path}")
        return 0 if exact else 1

    predictor = Predictor(SegmentationSettings(device=device))
    predictor.load(model)
    result = predictor.predict(study)
    seg_path = write_labels(result.labels, output_dir / "sample_study_seg.nii.gz")
    written = read_volume(seg_path)
    assert written.geometry == study.geometry, "segmentation geometry differs from the study"
    truth = read_volume(truth_path)
    known = [c.value for c in model.metadata.classes if c.value != 0]
    if LESION not in known:  # the default model has no lesion class: a lesion is still vertebral body
        truth = truth.with_array(np.where(truth.array == LESION, VERTEBRAL_BODY, truth.array).astype(np.uint8))
        print("note: this model has no lesion class (no labelled lesion MRI exists); lesions count as vertebral body")
    metrics = evaluate_volumes(written, truth, classes=known, surface=False)
    print(
        f"\nsegmented with {model.metadata.name} on {predictor.device} ({predictor.precision}), "
        f"planes {', '.join(result.planes)}: {result.seconds:.2f} s -> {seg_path}"
    )
    print(format_table(metrics))
    summary = {m.name: round(m.dice, 4) for m in metrics}
    (output_dir / "demo_dice.json").write_text(json.dumps(summary, indent=2))
    return 0
