"""Saving a fine-tuned model (a new file; the base is never overwritten)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from ...errors import Cancelled, InputError
from ...modelfile import ModelMetadata
from .config import FinetuneConfig, FinetuneResult
from .evaluation import cumulative_drops

logger = logging.getLogger(__name__)


def carried_gate(gate: Any, metadata: ModelMetadata, base_name: str | None = None) -> tuple[Any, str | None]:
    """(the gate to store with a fine-tuned model, a warning): the base model's lesion gate is
    kept unchanged when it still fits (same context slices, every gated class value still a
    class); otherwise it is dropped and the warning says why (never silently)."""
    if gate is None:
        return None, None
    from ...lesion_gate import check_compatible

    try:
        check_compatible(gate.record, metadata, InputError, "fine-tuned model")
    except InputError as error:
        base = "the base model" + (f" {base_name!r}" if base_name else "")
        return None, f"the lesion gate of {base} is not carried over ({error}); the fine-tuned model has no gate"
    return gate, None


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return a.samefile(b)
    except OSError:
        pass
    return a.expanduser().resolve() == b.expanduser().resolve()


def finetuned_output_path(path_or_name: str | Path) -> Path:
    """A ``.safetensors`` path as given, or the user-model file of a plain model name."""
    from ...modelfile import MODEL_SUFFIX, user_model_path

    text = str(path_or_name)
    if text.endswith(MODEL_SUFFIX) or "/" in text or "\\" in text:
        path = Path(text).expanduser()
        if path.suffix != MODEL_SUFFIX:
            raise InputError(f"{path}: model files must end in {MODEL_SUFFIX}")
        return path
    return user_model_path(text)


def check_output_path(path: Path, base_path: Path | None) -> None:
    """Refuse to write over the base model, into the bundled models or under a bundled model's name."""
    from ...modelfile import bundled_model_dir, check_not_hiding_bundled

    check_not_hiding_bundled(path)

    if base_path is not None and _same_file(path, base_path):
        raise InputError(f"{path}: refusing to overwrite the base model; choose a new name or path")
    if _same_file(path.parent, bundled_model_dir()):
        raise InputError(f"{path}: refusing to write into the bundled models; save as a user model")


def forgetting(result: FinetuneResult) -> dict[str, float]:
    """Per class, how many Dice points the fine-tuned model lost on the fixed validation set."""
    before = (result.before or {}).get("fixed_validation") or {}
    after = (result.after or {}).get("fixed_validation") or {}
    return {
        k: round(100 * (float(before[k]) - float(v)), 2)
        for k, v in after.items()
        if k in before and v is not None and before[k] is not None
    }


def forgetting_from_origin(result: FinetuneResult) -> dict[str, float]:
    """Per class, how many Dice points the fine-tuned model lost on the fixed validation set since
    the original model of its chain of rounds (empty when that model is this round's base)."""
    origin = (result.before or {}).get("fixed_validation_origin") or {}
    return cumulative_drops(origin, (result.after or {}).get("fixed_validation") or {})


def forgetting_beyond_limit(result: FinetuneResult) -> str | None:
    """Why the model should not be saved (it forgot more than its ``max_forgetting`` in this round
    or, cumulatively, since the original model), or None."""
    config = (result.metadata.training or {}).get("config") or {}
    limit = 100 * float(config.get("max_forgetting", FinetuneConfig.max_forgetting))
    parts = []
    for drops, since in ((forgetting(result), ""), (forgetting_from_origin(result), " since the original model")):
        worse = {k: v for k, v in drops.items() if v > limit + 1e-6}
        if worse:
            shown = ", ".join(f"{k} -{v:g}" for k, v in sorted(worse.items(), key=lambda kv: -kv[1]))
            parts.append(f"{shown}{since}")
    if not parts:
        return None
    return (
        f"the fine-tuned model forgot more than the limit of {limit:g} Dice point(s) on the fixed validation set "
        f"({'; '.join(parts)})"
    )


def save_finetuned(result: FinetuneResult, path_or_name: str | Path, force: bool = False, replay: bool = True) -> Path:
    """Write the fine-tuned model atomically to a ``.safetensors`` path or as a user model name.

    Never overwrites the base model's file; a cancelled run cannot be saved; a model that forgot
    more than its ``max_forgetting`` on the fixed validation set is refused unless ``force``
    (``spineseg finetune --force``).  A plain name also becomes the model's stored name.
    With ``replay`` the result's painted studies are written beside the model as
    ``<model>.replay.npz`` (see :mod:`.replay`; its checksum goes into the model's metadata).
    """
    from ...modelfile import MODEL_SUFFIX

    if result.cancelled:
        raise Cancelled("fine-tuning was cancelled: there is no fine-tuned model to save")
    problem = forgetting_beyond_limit(result)
    if problem is not None:
        if not force:
            raise InputError(f"{problem}: not saved (save it anyway with force / spineseg finetune --force)")
        logger.warning("%s: saved anyway (forced)", problem)
    path = finetuned_output_path(path_or_name)
    base_record = (result.metadata.training or {}).get("finetuned_from") or {}
    base_path = result.base_path or (Path(base_record["path"]) if base_record.get("path") else None)
    check_output_path(path, base_path)
    metadata = result.metadata
    name = None
    if path.name[: -len(MODEL_SUFFIX)] == str(path_or_name).strip():  # saved under a plain model name
        name = str(path_or_name).strip()
    gate, warning = carried_gate(result.gate, metadata, base_record.get("name"))
    if warning is not None:  # the result's classes were changed after fine-tuning
        result.warnings.append(warning)
        logger.warning(warning)
    return _save_with_replay(result if replay else dataclasses.replace(result, replay=None), gate, path, name)


def _save_with_replay(result: FinetuneResult, gate: Any, path: Path, name: str | None) -> Path:
    """The model file and, beside it, its replay set: the replay is written to a temporary file
    first (its checksum goes into the model), renamed once the model is saved.  A replay set
    that cannot be written costs a warning, never the model; a stale one of an earlier model
    of that name is removed."""
    from ...modelfile import attach_gate
    from ...provenance import file_sha256
    from .replay import replay_path, write_replay

    target = replay_path(path)
    temp = target.with_name(target.name + ".new")
    model: Any = result
    written = False
    if result.replay is not None and result.replay.studies:
        try:
            write_replay(result.replay, temp)
            record = {
                "file": target.name,
                "sha256": file_sha256(temp),
                "studies": result.replay.study_names,
                "bytes": temp.stat().st_size,
            }
            metadata = dataclasses.replace(result.metadata, training={**result.metadata.training, "replay": record})
            model, written = dataclasses.replace(result, metadata=metadata), True
        except OSError as error:
            temp.unlink(missing_ok=True)
            result.warnings.append(f"the replay set was not saved ({error}); the model is saved without it")
            logger.warning(result.warnings[-1])
    try:
        saved = attach_gate(model, gate, path, name=name)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if written:
        os.replace(temp, target)
    elif target.exists():
        target.unlink()
        logger.info("removed %s: it belonged to the model formerly saved as %s", target, path)
    return saved
