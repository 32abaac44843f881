"""The ``spineseg`` command line: ``info``, ``demo`` and the segmentation/training commands.

Every user error prints one line ``spineseg: error: <what and why>`` and exits with status 1;
Ctrl-C exits with 130 and leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import SpinesegError


def cmd_info(args: argparse.Namespace) -> int:
    from .io import read_volumes
    from .preflight import format_volume_info, volume_info

    infos = []
    for path in args.paths:
        infos += [volume_info(v) for v in read_volumes(path)]
    if args.json:
        print(json.dumps(infos[0] if len(infos) == 1 else infos, indent=2))
    else:
        print("\n".join(format_volume_info(info) for info in infos))
    return 0


def _is_cohort_input(inputs: Sequence[str]) -> bool:
    from .cohort import is_cohort_directory

    return len(inputs) == 1 and is_cohort_directory(inputs[0])


def _segment_cohort(args: argparse.Namespace, settings: Any) -> int:
    """``segment INPUT_DIR`` of studies (or with ``--scheduler``): one study per task, resumable, CSV report."""
    from .cohort import REPORT_NAME, segment_cohort
    from .errors import InputError

    if len(args.inputs) != 1 or not Path(args.inputs[0]).expanduser().is_dir():
        raise InputError("--scheduler segments a cohort: give one input directory")
    if getattr(args, "dicom_seg", None):
        raise InputError("--dicom-seg writes single studies; it is not available for a cohort directory")
    from .outputs import same_path
    from .segment_command import as_directory

    if args.output and not as_directory(args.output, "-o"):
        raise InputError(f"{args.output}: a cohort needs an output directory, not a file")
    if args.uncertainty and not same_path(args.uncertainty, args.output or args.inputs[0]):
        raise InputError(
            f"--uncertainty {args.uncertainty}: a cohort writes its maps beside the labels "
            "(OUTPUT_DIR/<study>_uncertainty.nii.gz): give the output directory"
        )
    if getattr(args, "levels", None):
        raise InputError("--levels names single studies; it is not available for a cohort directory")
    report = Path(args.report or Path(args.output or args.inputs[0]) / REPORT_NAME).expanduser()
    print(f"cohort {args.inputs[0]}: model {args.model}, scheduler {args.scheduler or 'serial'}", file=sys.stderr)
    run = segment_cohort(
        args.inputs[0],
        args.output,
        model=args.model,
        settings=settings,
        scheduler=args.scheduler,
        report=report,
        overwrite=args.overwrite,
    )
    counts = dict.fromkeys(("done", "skipped", "error", "failed"), 0)
    for progress in run:
        result = progress.result
        counts[result.status] += 1
        position = f"[{progress.done}/{progress.total}]"
        if result.status in ("error", "failed"):
            print(f"spineseg: {result.status}: {position} {result.study}: {result.error}", file=sys.stderr)
        elif not args.quiet or result.status == "done":
            print(f"{position} {result.study}: {result.status} {result.seconds:.1f} s -> {result.output}")
    print(", ".join(f"{n} {status}" for status, n in counts.items()) + f"; report -> {report}", file=sys.stderr)
    return 1 if counts["error"] or counts["failed"] else 0


def cmd_segment(args: argparse.Namespace) -> int:
    from .inference import SegmentationSettings
    from .orientation import Plane
    from .segment_command import run_segment

    settings = SegmentationSettings(
        planes=Plane.parse(args.planes),
        fusion=args.fusion,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        uncertainty=args.uncertainty_mode if args.uncertainty else None,
        postprocess=not args.no_postprocess,
        lesion_gate=not args.no_lesion_gate,
    )
    if args.scheduler or _is_cohort_input(args.inputs):
        return _segment_cohort(args, settings)
    return run_segment(args, settings)


def cmd_models(args: argparse.Namespace) -> int:
    from .modelfile import list_models, user_model_dir

    models = list_models()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": m.name,
                        "source": m.source,
                        "path": str(m.path),
                        "error": m.error,
                        "metadata": m.metadata.to_dict() if m.metadata else None,
                    }
                    for m in models
                ],
                indent=2,
            )
        )
        return 0
    for m in models:
        if m.metadata is None:
            print(f"{m.name:28s} {m.source:8s} UNUSABLE: {m.error}")
            continue
        classes = ", ".join(c.name for c in m.metadata.classes[1:])
        print(f"{m.name:28s} {m.source:8s} {m.metadata.architecture:14s} [{classes}]  {m.path}")
    print(f"(user models: {user_model_dir()})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.output_dir), device=args.device)


# --- training and evaluation commands (training engine) --------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from .training.commands import run_train

    return run_train(args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from .errors import InputError
    from .io import read_volume
    from .metrics import (
        evaluate_volumes,
        format_table,
        labelled_span_region,
        merge_labels,
        parse_merge,
        region_description,
        summarise,
    )
    from .orientation import Plane, plane_array_axis
    from .volume import check_same_grid

    pred = read_volume(args.pred)
    truth = read_volume(args.truth)
    check_same_grid(pred, truth, what=f"{args.pred} and {args.truth}")
    if args.merge:
        truth = truth.with_array(merge_labels(truth.array, parse_merge(args.merge)))
    classes = None
    if args.classes:
        try:
            classes = [int(v) for v in args.classes.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"--classes must be comma-separated integers, got {args.classes!r}") from None
    region, axis = None, None
    if args.span_axis == "auto":
        axis = plane_array_axis(truth.geometry, Plane.AXIAL)  # the superior-inferior axis
        region = labelled_span_region(truth.array, axis=axis)
        if not region.any():
            region = None  # empty truth: evaluate everywhere
    elif args.span_axis != "none":
        axis = int(args.span_axis)
        region = labelled_span_region(truth.array, axis=axis)
    metrics = evaluate_volumes(pred, truth, classes=classes, region=region, surface=not args.no_surface)
    where = region_description(region, axis, float(np.prod(truth.geometry.spacing)) / 1000.0)
    extra = sorted(set(np.unique(truth.array).tolist()) - set(np.unique(pred.array).tolist()) - {0})
    if extra and not args.merge:
        print(
            f"spineseg: note: the truth has values {extra} that the prediction never uses; for an instance "
            "map (one value per vertebra) merge them, e.g. --merge 1-7=1",
            file=sys.stderr,
        )
    if args.json:
        record = {
            "prediction": str(args.pred),
            "truth": str(args.truth),
            "region": "full" if region is None else f"labelled span ({int(np.count_nonzero(region))} voxels)",
            "evaluated": where,
            "merge": args.merge or None,
            "classes": [m.to_dict() for m in metrics],
            "summary": summarise(metrics),
        }
        print(json.dumps(record, indent=2))
    else:
        print(f"evaluated: {where}")
        print(format_table(metrics))
    return 0


def _add_training_commands(commands) -> None:
    from .training.commands import add_train_arguments

    train = commands.add_parser("train", help="train a model with a named recipe")
    add_train_arguments(train)
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("evaluate", help="per-class metrics of a label map against ground truth")
    evaluate.add_argument("pred", metavar="PRED", help="predicted label file")
    evaluate.add_argument("truth", metavar="GT", help="ground-truth label file (same voxel grid)")
    evaluate.add_argument("--json", action="store_true", help="machine-readable output")
    evaluate.add_argument("--classes", help="comma-separated class values (default: all present)")
    evaluate.add_argument(
        "--span-axis",
        default="auto",
        help="restrict to the labelled span: auto (superior-inferior), none, or an array axis 0/1/2",
    )
    evaluate.add_argument("--no-surface", action="store_true", help="skip surface distances (faster)")
    evaluate.add_argument(
        "--merge",
        action="append",
        metavar="FROM=TO",
        help="merge truth values first, e.g. 1-7=1 for an instance map with one value per vertebra (repeatable)",
    )
    evaluate.set_defaults(handler=cmd_evaluate)


# --- end of training and evaluation commands -------------------------------------------------


# --- fine-tuning from corrections (training engine) -------------------------------------------
def cmd_finetune(args: argparse.Namespace) -> int:
    from .training.finetune_command import run_finetune_command

    return run_finetune_command(args)


def _add_finetune_command(commands) -> None:
    from .training.finetune_command import add_finetune_arguments

    finetune = commands.add_parser(
        "finetune", help="fine-tune a model on corrected label maps (writes a new model; the base is kept)"
    )
    add_finetune_arguments(finetune)
    finetune.set_defaults(handler=cmd_finetune)


# --- end of fine-tuning from corrections -------------------------------------------------------


# --- lesion-presence gate (training engine) -----------------------------------------------------
def cmd_train_gate(args: argparse.Namespace) -> int:
    from .training.gate_command import run_train_gate

    return run_train_gate(args)


def _add_gate_command(commands) -> None:
    from .training.gate_command import add_gate_arguments

    gate = commands.add_parser(
        "train-gate",
        help="attach a slice-level lesion-presence gate to a model with a lesion class (SIMULATED lesions)",
    )
    add_gate_arguments(gate)
    gate.set_defaults(handler=cmd_train_gate)


# --- end of lesion-presence gate ---------------------------------------------------------------


# --- segmentation report -----------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .io import read_volume
    from .modelfile import read_metadata, resolve_model
    from .report import build_report, write_report
    from .volume import check_same_grid

    output = Path(args.output).expanduser()
    json_path = Path(args.json).expanduser() if args.json else None
    if output.suffix.lower() not in (".html", ".htm", ".json"):
        raise InputError(f"{output}: the report must end in .html or .json")
    if json_path is not None and json_path.suffix.lower() != ".json":
        raise InputError(f"{json_path}: --json needs a path ending in .json")
    metadata, note = None, "no model described (--model none)"
    if args.model.strip().lower() != "none":  # model problems stop everything before any study is read
        metadata = read_metadata(resolve_model(args.model))
        note = (
            "the segmentation file does not record which model produced it: this section describes "
            f"model {metadata.name!r}, as named by --model"
        )
    study = read_volume(args.study)
    labels = read_volume(args.seg)
    check_same_grid(study, labels, what=f"study {args.study} and segmentation {args.seg}")
    levels = None
    if getattr(args, "levels", None):  # a level map corrected by hand (Review ▸ Levels up/down) and its sidecar
        from .levels import read_levels

        levels = read_levels(Path(args.levels).expanduser())
        check_same_grid(study, levels.geometry, what=f"study {args.study} and level map {args.levels}")
    report = build_report(study, labels, metadata, model_note=note, levels=levels)
    written = [write_report(report, output)]
    if json_path is not None:
        written.append(write_report(report, json_path))
    bodies = sum(1 for level in report["levels"] if level["value"] == 1)
    print(f"{bodies} vertebral bodies; {report['lesion_summary']} -> {', '.join(map(str, written))}")
    return 0


def _add_report_command(commands) -> None:
    report = commands.add_parser(
        "report", help="write a one-page HTML (or JSON) report of a segmentation: volumes, levels, lesions"
    )
    report.add_argument("study", metavar="STUDY", help="the study (file or DICOM directory)")
    report.add_argument("seg", metavar="SEG", help="its label map (same voxel grid)")
    report.add_argument("-o", "--output", required=True, help="report file: .html (one page) or .json")
    report.add_argument("--json", metavar="PATH", help="also write the JSON record here")
    report.add_argument(
        "--levels", metavar="LEVELS", help="name levels from this level map and its sidecar (e.g. corrected in napari)"
    )
    report.add_argument(
        "--model", default="spineseg-default", help="model described in the report (name, .safetensors path or none)"
    )
    report.set_defaults(handler=cmd_report)


# --- end of segmentation report ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="spineseg", description="Spine MRI segmentation (napari-spineseg).")
    parser.add_argument("--version", action="version", version=f"napari-spineseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="print geometry, orientation and planes of studies")
    info.add_argument("paths", nargs="+", metavar="PATH", help="MHA/MHD, NIfTI, NRRD file or DICOM directory/file")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(handler=cmd_info)

    segment = commands.add_parser("segment", help="segment studies with a model (three planes, fused)")
    segment.add_argument("inputs", nargs="+", metavar="INPUT", help="study files or DICOM directories")
    segment.add_argument(
        "-o",
        "--output",
        help="output file (one study) or directory; default <name>_seg.nii.gz; a .dcm file is a DICOM Segmentation; "
        "a new directory needs a name without an extension (or a trailing /)",
    )
    segment.add_argument(
        "--dicom-seg",
        metavar="PATH",
        help="also write a DICOM Segmentation referencing the source series (DICOM studies only)",
    )
    segment.add_argument("--model", default="spineseg-default", help="model name or .safetensors path")
    segment.add_argument("--planes", default="axial,coronal,sagittal", help="comma-separated planes")
    segment.add_argument("--fusion", default="mean", choices=["mean", "weighted", "vote"])
    segment.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    segment.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    segment.add_argument("--batch-size", type=int, default=16)
    segment.add_argument(
        "--levels",
        metavar="LEVELS",
        help="also name the vertebral levels: level map file (or directory) + JSON sidecar beside it (LEVELS.json)",
    )
    segment.add_argument(
        "--uncertainty",
        metavar="PATH",
        help="also write a per-voxel uncertainty map: a file (one study) or a directory (several studies)",
    )
    segment.add_argument("--uncertainty-mode", default="disagreement", choices=["disagreement", "entropy"])
    segment.add_argument("--no-postprocess", action="store_true", help="skip per-class post-processing")
    segment.add_argument(
        "--no-lesion-gate", action="store_true", help="ignore the model's lesion-presence gate (if it has one)"
    )
    segment.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    segment.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files that spineseg did not write (by default they are never replaced)",
    )
    segment.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="segment the studies of one INPUT directory on Dask: local[:N] worker processes or a scheduler address",
    )
    segment.add_argument("--report", metavar="PATH", help="cohort CSV report (default OUTPUT_DIR/spineseg-report.csv)")
    segment.set_defaults(handler=cmd_segment)

    models = commands.add_parser("models", help="list bundled and user models")
    models.add_argument("--json", action="store_true")
    models.set_defaults(handler=cmd_models)

    _add_training_commands(commands)
    _add_finetune_command(commands)
    _add_gate_command(commands)
    _add_report_command(commands)

    demo = commands.add_parser("demo", help="run the main job on the bundled sample study and model")
    demo.add_argument("--output-dir", default="demo-output", help="where the demo writes its files")
    demo.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    demo.set_defaults(handler=cmd_demo)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    import contextlib
    import os

    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spineseg`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        status = int(args.handler(args) or 0)
        sys.stdout.flush()
        return status
    except BrokenPipeError:  # the reader of our output went away (``spineseg ... | head``): stop quietly
        _silence_stdout()
        return 141  # as if killed by SIGPIPE, like other command-line tools
    except SpinesegError as error:
        print(f"spineseg: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the system refused (name too long, permission, disk full): one line too
        where = str(error.filename)[:200] + ": " if error.filename else ""
        print(f"spineseg: error: {where}{error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("spineseg: interrupted; no partial output was left", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
