"""Fine-tuning a model from an annotator's corrections (Qt-free).

    pairs = [CorrectionPair(image, corrected, prediction=original)]     # or reviewed_slices=...
    events = finetune("spineseg-default", pairs, FinetuneConfig(steps=200),
                      reference_cases=a_few_training_cases)
    for event in events: ...        # TrainEvent: "status", "step", "validation", "done"
    result = StopIteration.value    # FinetuneResult (or use run_finetune(...))
    save_finetuned(result, "my-model")                 # a new file; the base is never overwritten

What is trusted
    An annotator looks at a few slices, not at the whole study.  When the model's original
    ``prediction`` or the ``reviewed_slices`` are known, only the slices the annotator changed
    (corrected ≠ prediction; the plane they were edited in is detected, see
    :func:`correction_targets`) and the slices they reviewed are targets; everything else becomes
    IGNORE (255).  A plane other than the one a slice was reviewed in sees only the voxels lying
    on that slice (a line per slice).  Without either, the whole corrected label map is trusted,
    unless it holds a new class: then only the slices holding it (in the plane where it is most
    compact) are, since a lesion painted on one slice is still labelled body on its others.
    ``CorrectionPair.known_classes`` narrows what the annotator vouches for (e.g. only the
    vertebral bodies).  Sampling: slices holding changed voxels (or voxels of a new class) weigh
    ``changed_priority`` times more, and every correction slice is weighted by its share of
    trusted pixels, so the reviewed slices are not crowded out by the many other-plane slices
    that cross them in a single line.

New classes
    A label value the base model does not know becomes a new class: the output layer is grown
    (:func:`~napari_spineseg.models.extend_output_classes`, old classes kept exactly) and the new
    row starts as a copy of the class the base model predicted there (e.g. "vertebral body" for a
    lesion painted inside a body) with its bias lowered by ``new_class_margin``, so the grown
    model still segments exactly like the base model until it has learned the new class.  The
    new rows train ``new_class_lr_scale`` times faster (Adam moves every weight by about ``lr``
    per step, far too little for a fresh row at fine-tuning rates); ``new_class_weight`` > 1
    weighs the new class up in the loss (faster, but it also lowers the decision threshold and
    lets the new class spread over its parent).  Names come
    from ``class_names``, else from the schema (4 → "lesion"), else "class N".

Forgetting
    A few ``reference_cases`` (cases the base model was trained on; by default two recorded in the
    base model's metadata) are replayed at ``replay_fraction`` (0.5) of the samples, and on those
    samples the fine-tuned model is kept close to the base model's predictions
    (``distill_weight`` 10, "learning without forgetting"; probability given to a new class there
    counts as disagreement, weighed by ``new_class_distill_weight``).  Batch-norm statistics stay
    frozen.  The encoder learns at ``lr`` and the decoder at ``decoder_lr_scale`` (10) times it:
    the decoder adapts the boundaries to the annotator while the features the other studies rely
    on move little; the U-Net's full-resolution input stage is frozen (``frozen_input_stages``,
    13 % cheaper steps) and ``encoder_lr_scale`` 0 freezes the encoder; ``l2sp_weight`` pulls every weight
    toward the base, ``distill_unreviewed_weight`` distils on the corrected studies' unreviewed
    pixels too; both off by default).  Per-class Dice is measured before and at every
    evaluation (``val_every``) on a *fixed* validation set whose identities are stored in the
    new model (``training["fixed_validation"]``) and reused from the base model when present, so
    every round is judged on the same cases; the first round takes the base model's own
    validation cases (at most ``fixed_validation_limit``) unless given.  Before/after Dice is
    also reported on the corrected studies (restricted to the trusted voxels).  With
    ``select_by_validation`` the kept weights are those of the evaluated step whose fixed-set
    Dice fell by at most ``max_forgetting`` (1 point) for every class and that scored best on the
    corrections (the step that forgot least, with a warning, if none did); the held-out parts of
    a study are never used to choose.  Across rounds the loss is also bounded cumulatively: the
    fixed-set figures of the original model (the first base that is not a fine-tune) are carried
    in every fine-tuned model (``training["fixed_validation_origin"]``) and each class may lose at
    most ``max_forgetting`` against them too (``before["fixed_validation_origin"]``; not applied,
    with a warning, when they were measured on another fixed set).

The result is a new model (metadata with full provenance: base name and checksums, pairs,
steps, lr, new classes, before/after); :func:`save_finetuned` writes it atomically and refuses
to overwrite the base model's file.  A base model's lesion-presence gate (:mod:`napari_spineseg.lesion_gate`)
is carried over unchanged while it still fits (same context slices, gated class values still
classes); otherwise it is dropped with a warning in the result.

Painted studies accumulate
    :func:`save_finetuned` writes, beside ``X.safetensors``, ``X.replay.npz``: crops of the
    trusted slices of every painted study the model learned from (patient data: a separate
    file, never in the model; the model records its checksum and studies).  The next fine-tune
    from ``X`` trains on them again as corrections (``replay=`` a path or set, or
    ``config.replay_painted=False`` to skip), reports Dice on them before and after
    (``before/after["replay"]``; :func:`painted_report`) and saves the union (the most recent
    ``replay_max_studies``, at most ``replay_max_mb``).  See :mod:`.replay`.

Layout (one module per section; every public name is re-exported here)
    :mod:`.config` (CorrectionPair, FinetuneConfig, FinetuneResult), :mod:`.targets` (trusted
    targets of a pair), :mod:`.cases` (case records), :mod:`.classes` (new classes, class
    indices), :mod:`.dataset` (FinetuneDataset), :mod:`.evaluation` (Dice through the inference
    path), :mod:`.surgery` (growing the head for new classes), :mod:`.regularisers` (replay
    distillation, L2-SP, frozen stages, learning-rate groups), :mod:`.run` (the run as phases:
    :class:`~.run.FinetuneRun`), :mod:`.saving` (:func:`save_finetuned`).
"""

from .cases import case_record, cases_from_base_metadata, fixed_validation_ids, load_case_record
from .config import MAX_LABEL_VALUE, CorrectionPair, FinetuneConfig, FinetuneResult
from .dataset import FinetuneDataset, build_finetune_dataset
from .evaluation import fixed_cache_path, fixed_origin
from .regularisers import ReplayDistillation, WeightAnchor, lr_param_groups
from .replay import (
    REPLAY_SUFFIX,
    ReplaySet,
    format_painted_class_report,
    painted_class_report,
    painted_report,
    read_replay,
    replay_path,
    write_replay,
)
from .run import finetune, run_finetune, select_step
from .saving import (
    carried_gate,
    check_output_path,
    finetuned_output_path,
    forgetting,
    forgetting_beyond_limit,
    forgetting_from_origin,
    save_finetuned,
)
from .surgery import fuse_new_rows, grow_head, speed_up_new_rows, unfreeze_batchnorm
from .targets import CorrectionTargets, correction_targets

# Former private names, kept for existing tests and benchmarks.
_ReplayDistillation = ReplayDistillation
_WeightAnchor = WeightAnchor
_fuse_new_rows = fuse_new_rows
_grow_head = grow_head
_param_groups = lr_param_groups
_select_step = select_step
_speed_up_new_rows = speed_up_new_rows
_unfreeze_batchnorm = unfreeze_batchnorm

__all__ = [
    "MAX_LABEL_VALUE",
    "REPLAY_SUFFIX",
    "CorrectionPair",
    "CorrectionTargets",
    "FinetuneConfig",
    "FinetuneDataset",
    "FinetuneResult",
    "ReplaySet",
    "build_finetune_dataset",
    "carried_gate",
    "case_record",
    "cases_from_base_metadata",
    "check_output_path",
    "correction_targets",
    "finetune",
    "finetuned_output_path",
    "fixed_cache_path",
    "fixed_origin",
    "fixed_validation_ids",
    "forgetting",
    "forgetting_beyond_limit",
    "forgetting_from_origin",
    "format_painted_class_report",
    "load_case_record",
    "painted_class_report",
    "painted_report",
    "read_replay",
    "replay_path",
    "run_finetune",
    "save_finetuned",
    "write_replay",
]
