"""``spineseg finetune``: arguments and the handler (imported lazily by :mod:`napari_spineseg.cli`)."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="BASE", help="base model name or .safetensors path")
    parser.add_argument("--image", action="append", required=True, metavar="IMG", help="study (repeat per pair)")
    parser.add_argument("--labels", action="append", required=True, metavar="LBL", help="corrected labels (per pair)")
    parser.add_argument(
        "--prediction", action="append", metavar="PRED", help="the model's original prediction (per pair, optional)"
    )
    parser.add_argument(
        "--slices",
        action="append",
        metavar="[N:]PLANE:I,J,K",
        help="slices the annotator reviewed, e.g. sagittal:12,30,41 (N = 1-based pair number; repeatable)",
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256, help="training crop size in pixels")
    parser.add_argument("--class-name", action="append", metavar="VALUE=NAME", help="name a (new) label value")
    parser.add_argument(
        "--replay-fraction", type=float, default=None, help="share of samples from reference cases (default 0.5)"
    )
    parser.add_argument("--reference-data", metavar="DIR", help="lumbar-mri folder holding reference/validation cases")
    parser.add_argument("--reference-cases", metavar="IDS", help="case ids replayed against forgetting, e.g. VB3-06")
    parser.add_argument(
        "--validation-cases", metavar="IDS", help="fixed validation case ids (later rounds reuse the base model's set)"
    )
    parser.add_argument("--new-validation", action="store_true", help="replace the base model's fixed validation set")
    parser.add_argument(
        "--val-every",
        type=int,
        default=None,
        help="steps between evaluations on the fixed set and the corrections (default 50; the last step always)",
    )
    parser.add_argument(
        "--max-forgetting",
        type=float,
        default=None,
        metavar="POINTS",
        help="keep the evaluated step that lost at most this many Dice points per class on the fixed set and did "
        "best on the corrections (default: 1)",
    )
    parser.add_argument(
        "--keep-last", action="store_true", help="keep the last step's weights (no selection by validation)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="save the model even if it lost more than --max-forgetting Dice points on the fixed set "
        "(refused otherwise)",
    )
    replay = parser.add_mutually_exclusive_group()
    replay.add_argument(
        "--no-replay",
        action="store_true",
        help="do not train again on the painted studies of earlier rounds (the base's BASE.replay.npz)",
    )
    replay.add_argument(
        "--replay",
        metavar="FILE",
        help="replay set of earlier painted studies to train on (default: the one saved beside the base model)",
    )
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    parser.add_argument("--precision", default="auto", choices=["auto", "off", "bf16", "fp16"])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; use 1 on a busy machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", required=True, metavar="NEW_MODEL", help=".safetensors path or model name")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def parse_slices(texts: list[str] | None, n_pairs: int) -> list[dict[str, list[int]]]:
    """``[N:]plane:i,j,k`` options -> one ``{plane: [indices]}`` per pair."""
    from ..orientation import Plane

    result: list[dict[str, list[int]]] = [{} for _ in range(n_pairs)]
    for text in texts or []:
        parts = text.strip().split(":")
        pair = 1
        if len(parts) == 3:
            try:
                pair = int(parts[0])
            except ValueError:
                raise InputError(f"--slices {text!r}: expected [N:]PLANE:I,J,K") from None
            parts = parts[1:]
        if len(parts) != 2:
            raise InputError(f"--slices {text!r}: expected [N:]PLANE:I,J,K, e.g. sagittal:12,30,41")
        if n_pairs > 1 and len(text.split(":")) != 3:
            raise InputError(f"--slices {text!r}: with several pairs, say which one (e.g. 2:{text})")
        if not 1 <= pair <= n_pairs:
            raise InputError(f"--slices {text!r}: pair {pair} does not exist (1..{n_pairs})")
        plane = Plane.parse(parts[0])[0].value
        try:
            indices = [int(v) for v in parts[1].split(",") if v.strip()]
        except ValueError:
            raise InputError(f"--slices {text!r}: slice indices must be integers") from None
        if not indices:
            raise InputError(f"--slices {text!r}: no slice index given")
        result[pair - 1].setdefault(plane, []).extend(indices)
    return result


def parse_class_names(texts: list[str] | None) -> dict[int, str]:
    names: dict[int, str] = {}
    for text in texts or []:
        value, sep, name = text.partition("=")
        try:
            number = int(value)
        except ValueError:
            number = -1
        if not sep or not name.strip() or not 0 < number < 255:
            raise InputError(f"--class-name {text!r}: expected VALUE=NAME with VALUE in 1..254, e.g. 4=hemangioma")
        names[number] = name.strip()
    return names


def _ids(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def format_before_after(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """A table of per-class Dice before/after on the fixed validation set (and against the original
    model of the chain of rounds, when it is not this round's base), the corrections and the
    replayed earlier painted studies (when there are any)."""
    rows = [f"{'set':18s} {'class':24s} {'before':>8s} {'after':>8s} {'change':>8s}"]
    groups = [("fixed_validation", "fixed validation")]
    if before.get("fixed_validation_origin"):
        groups.append(("fixed_validation_origin", "fixed vs original"))
    groups.append(("corrections", "corrected studies"))
    if before.get("replay") or after.get("replay"):
        groups.append(("replay", "earlier painted"))
    for key, label in groups:
        b, a = before.get(key) or {}, after.get(key.removesuffix("_origin")) or {}
        names = list(dict.fromkeys([*b, *a]))
        if not names:
            rows.append(f"{label:18s} {'(none)':24s}")
        for name in names:
            vb, va = b.get(name), a.get(name)
            change = f"{100 * (va - vb):+7.1f}" if vb is not None and va is not None else ""
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            rows.append(f"{label:18s} {name[:24]:24s} {fmt(vb):>8s} {fmt(va):>8s} {change:>8s}")
    rows.append("(Dice; 'corrected studies' counts only the trusted voxels; change in points)")
    if before.get("fixed_validation_origin"):
        rows.append("('fixed vs original': before = the original model of these fine-tuning rounds)")
    return "\n".join(rows)


def run_finetune_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..io import read_volume
    from ..modelfile import resolve_model
    from .data import load_lumbar_dataset
    from .finetune import (
        CorrectionPair,
        FinetuneConfig,
        check_output_path,
        finetune,
        finetuned_output_path,
        format_painted_class_report,
        painted_report,
        replay_path,
        save_finetuned,
    )

    if len(args.image) != len(args.labels):
        raise InputError(f"give one --labels per --image ({len(args.image)} images, {len(args.labels)} label maps)")
    predictions = args.prediction or []
    if predictions and len(predictions) != len(args.image):
        raise InputError(f"give one --prediction per --image or none ({len(predictions)} for {len(args.image)})")
    base_path = resolve_model(args.model)  # an unknown model stops everything before any study is read
    output = finetuned_output_path(args.output)
    check_output_path(output, base_path)
    slices = parse_slices(args.slices, len(args.image))
    config = FinetuneConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        crop_size=args.crop,
        **({} if args.replay_fraction is None else {"replay_fraction": args.replay_fraction}),
        class_names=parse_class_names(args.class_name),
        seed=args.seed,
        device=args.device,
        mixed_precision=args.precision,
        val_every=args.val_every or min(FinetuneConfig.val_every, args.steps),
        select_by_validation=not args.keep_last,
        **({} if args.max_forgetting is None else {"max_forgetting": float(args.max_forgetting) / 100.0}),
        replace_fixed_validation=args.new_validation,
        num_threads=args.threads,
        replay_painted=not args.no_replay,
    )
    pairs = []
    for i, (image_path, labels_path) in enumerate(zip(args.image, args.labels)):
        image, labels = read_volume(image_path), read_volume(labels_path)
        prediction = read_volume(predictions[i]) if predictions else None
        pairs.append(
            CorrectionPair(image, labels, prediction, slices[i] or None, name=str(Path(labels_path).expanduser()))
        )
    references, fixed = [], None
    wanted_refs, wanted_val = _ids(args.reference_cases), _ids(args.validation_cases)
    if (wanted_refs or wanted_val) and not args.reference_data:
        raise InputError("--reference-cases/--validation-cases need --reference-data DIR")
    if args.reference_data and (wanted_refs or wanted_val):
        loaded = load_lumbar_dataset(args.reference_data, cases=[*wanted_refs, *wanted_val])
        references = [c for c in loaded if c.case_id in wanted_refs]
        fixed = [c for c in loaded if c.case_id in wanted_val] if wanted_val else None

    cancel = threading.Event()
    events = finetune(
        base_path,
        pairs,
        config,
        reference_cases=references,
        fixed_validation=fixed,
        cancel=cancel,
        replay=Path(args.replay).expanduser() if args.replay else None,
    )
    with tqdm(total=config.steps, desc="fine-tuning", unit="step", disable=args.quiet, file=sys.stderr) as bar:
        try:
            while True:
                try:
                    event = next(events)
                except StopIteration as stop:
                    result = stop.value
                    break
                if event.kind == "step":
                    bar.n = event.step
                    bar.set_postfix(loss=f"{event.loss:.3f}" if event.loss is not None else "")
                    bar.refresh()
                elif event.kind == "status" and not args.quiet:
                    bar.set_description_str(event.message[:40])
                    if event.message.startswith("preparing"):
                        bar.set_description_str("fine-tuning")
        except KeyboardInterrupt:
            cancel.set()
            events.close()
            raise
    for message in result.warnings:
        print(f"spineseg: warning: {message}", file=sys.stderr)
    print(format_before_after(result.before, result.after))
    painted = format_painted_class_report(painted_report(result))
    if painted:
        print(painted)
    if result.selected_step is not None and result.selected_step != result.steps:
        print(f"kept the weights of step {result.selected_step} of {result.steps} (fixed-set loss within tolerance)")
    if result.new_classes:
        print("new classes: " + ", ".join(f"{c.value} = {c.name}" for c in result.new_classes))
    path = save_finetuned(result, args.output, force=args.force)
    print(f"saved the fine-tuned model to {path} (base {base_path} unchanged)")
    replay_file = replay_path(path)
    if result.replay is not None and replay_file.is_file():
        count = len(result.replay.studies)
        studies = f"{count} painted stud{'y' if count == 1 else 'ies'}"
        print(f"saved its replay set ({studies}; patient data, keep it private) to {replay_file}")
    return 0
