"""The fine-tuning dataset: changed-slice priority, trusted-share weights and replay."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...preprocess import PreprocessConfig
from ...schema import IGNORE
from ...volume import Volume
from ..data import TrainingCase
from .config import FinetuneConfig

logger = logging.getLogger(__name__)


class FinetuneDataset:
    """Correction slices followed by replay slices, with sampling weights for the training loop.

    ``sample_weights()`` gives the correction samples ``1 - replay_fraction`` of the total weight
    and the replay samples ``replay_fraction`` (class-balanced among themselves); the loop draws
    with these weights (``sampling="balanced"``).  Among the corrections a slice weighs
    ``changed_priority`` when it holds changed voxels (else 1), times its number of trusted
    pixels relative to the fullest slice (at least ``min_coverage``): a slice
    of another plane crossing three reviewed slices holds only three lines of targets and should
    not crowd out the reviewed slices themselves.  A slice holding voxels of a new class
    (``new_class`` flags) weighs ``changed_priority`` whatever its coverage: a lesion painted on
    sagittal slices is seen in the axial and coronal planes only through such thinly covered
    slices, and a class the model meets in one plane only is outvoted when the planes are fused.
    Samples carry ``"replay"`` (bool) for the forgetting guard.
    """

    def __init__(
        self,
        corrections,
        changed: np.ndarray,
        replay=None,
        replay_fraction: float = 0.3,
        changed_priority: float = 4.0,
        coverage: np.ndarray | None = None,
        min_coverage: float = 0.02,
        new_class: np.ndarray | None = None,
    ) -> None:
        self.corrections = corrections
        self.replay = replay
        self.changed = np.asarray(changed, dtype=bool)
        if len(self.changed) != len(corrections):
            raise ValueError("one changed flag per correction sample")
        self.coverage = np.ones(len(self.changed)) if coverage is None else np.asarray(coverage, dtype=float)
        self.min_coverage = float(min_coverage)
        self.new_class = np.zeros(len(self.changed), bool) if new_class is None else np.asarray(new_class, bool)
        self.replay_fraction = float(replay_fraction) if replay is not None and len(replay) else 0.0
        self.changed_priority = float(changed_priority)

    def __len__(self) -> int:
        return len(self.corrections) + (len(self.replay) if self.replay is not None else 0)

    def __getitem__(self, i: int):
        import torch

        n = len(self.corrections)
        sample = dict(self.corrections[i] if i < n else self.replay[i - n])
        sample["replay"] = torch.tensor(i >= n)
        return sample

    def set_epoch(self, epoch: int) -> None:
        self.corrections.set_epoch(epoch)
        if self.replay is not None:
            self.replay.set_epoch(epoch)

    def sample_weights(self) -> np.ndarray:
        relative = self.coverage / max(float(self.coverage.max()), 1e-12)
        relative = np.where(self.new_class, 1.0, np.maximum(relative, self.min_coverage))
        weights = np.where(self.changed | self.new_class, self.changed_priority, 1.0) * relative
        weights = weights / weights.sum() * (1.0 - self.replay_fraction)
        if self.replay is not None and len(self.replay):
            replay = np.asarray(self.replay.sample_weights(), dtype=float)
            replay = replay / replay.sum() * self.replay_fraction if self.replay_fraction > 0 else replay * 0.0
            weights = np.concatenate([weights, replay])
        return weights * (len(weights) / weights.sum())


class ConcatSlices:
    """Several slice datasets as one (the current corrections, then replayed painted crops)."""

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0, *(len(p) for p in self.parts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[part][i - int(self.offsets[part])]

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.set_epoch(epoch)


def _painted_slices(
    painted: Sequence[tuple[TrainingCase, np.ndarray, str]],
    *,
    context_slices: int,
    num_classes: int,
    preprocess: PreprocessConfig,
    config: FinetuneConfig,
) -> list[tuple[Any, np.ndarray, np.ndarray]]:
    """(slice dataset, changed flags, coverage) per plane of replayed painted crops (already normalised)."""
    import dataclasses

    from ..datasets import SliceDataset

    normalised = dataclasses.replace(preprocess, normalise=False)
    parts = []
    for plane in dict.fromkeys(p for _, _, p in painted):
        chosen = [(c, m) for c, m, p in painted if p == plane]
        slices = SliceDataset(
            [c for c, _ in chosen],
            planes=[plane],
            context_slices=context_slices,
            num_classes=num_classes,
            preprocess=normalised,
            augment=config.augment,
            crop_size=config.crop_size,
            seed=config.seed + 2,
        )
        flags = _changed_flags(slices, [m for _, m in chosen], [c.labels.geometry for c, _ in chosen])
        parts.append((slices, flags, _coverage(slices)))
    return parts


def _coverage(dataset) -> np.ndarray:
    """Per sample of a SliceDataset: the number of trusted (not IGNORE) pixels of its slice."""
    counts = {}
    for ci, prepared in enumerate(dataset.cases):
        for pi, plane in enumerate(dataset.planes):
            labels = prepared.planes[plane].labels
            counts[ci, pi] = (labels.reshape(labels.shape[0], -1) != IGNORE).sum(axis=1)
    return np.asarray([counts[ci, pi][si] for ci, pi, si in dataset.index], dtype=float)


def _changed_flags(dataset, changed_masks: Sequence[np.ndarray], geometries: Sequence[Any]) -> np.ndarray:
    """Per sample of a SliceDataset: does its slice hold a changed voxel?"""
    from ...slicing import canonical_labels, plane_view

    per_case = []
    for mask, geometry in zip(changed_masks, geometries):
        canonical = canonical_labels(Volume(mask.astype(np.uint8), geometry))
        per_plane = []
        for plane in dataset.planes:
            stack = plane_view(canonical, plane)
            per_plane.append(stack.reshape(stack.shape[0], -1).any(axis=1))
        per_case.append(per_plane)
    return np.asarray([per_case[ci][pi][si] for ci, pi, si in dataset.index], dtype=bool)


def whole_slice_size(stacks: Sequence[tuple[int, ...]], multiple: int = 16) -> int | None:
    """The square every slice of ``stacks`` ([slices, H, W] shapes) pads to, or None if they already agree.

    Whole slices (``crop_size=None``) of different planes or studies differ in shape and cannot
    share a batch; padding (image 0, targets IGNORE) to the largest side, rounded up to
    ``multiple``, lets them.
    """
    sides = {tuple(int(n) for n in shape[1:]) for shape in stacks}
    if len(sides) <= 1:
        return None
    largest = max(max(side) for side in sides)
    return -(-largest // multiple) * multiple


def _pad_whole_slices_to_one_size(datasets: Sequence[Any]) -> None:
    """With ``crop_size=None``: give every slice dataset of a run one common (padded) slice size."""
    parts = [p for d in datasets if d is not None for p in getattr(d, "parts", [d])]
    size = whole_slice_size([case.planes[p].labels.shape for d in parts for case in d.cases for p in d.planes])
    for part in parts:
        part.crop_size = size


def build_finetune_dataset(
    corrections: Sequence[TrainingCase],
    changed: Sequence[np.ndarray],
    replay: Sequence[TrainingCase] = (),
    *,
    planes: Sequence[str],
    context_slices: int,
    num_classes: int,
    preprocess: PreprocessConfig,
    config: FinetuneConfig,
    new_class_indices: Sequence[int] = (),
    painted: Sequence[tuple[TrainingCase, np.ndarray, str]] = (),
) -> FinetuneDataset:
    """The training samples of a fine-tuning run.

    ``corrections`` and ``replay`` hold class *indices* (IGNORE where untrusted); ``changed``
    is one boolean mask per correction case (study array order) marking the changed voxels;
    slices holding ``new_class_indices`` are sampled at full priority in every plane.
    ``painted`` adds replayed painted crops of earlier rounds as further correction samples:
    (case with class indices and an already normalised image, changed mask, the one plane it is
    sampled in); see :mod:`.replay`.
    """
    from ..datasets import SliceDataset

    slices = SliceDataset(
        corrections,
        planes=planes,
        context_slices=context_slices,
        num_classes=num_classes,
        preprocess=preprocess,
        augment=config.augment,
        crop_size=config.crop_size,
        seed=config.seed,
    )
    geometries = [c.labels.geometry for c in corrections]
    flags = _changed_flags(slices, changed, geometries)
    new_flags = None
    if len(new_class_indices):
        new_masks = [np.isin(c.labels.array, list(new_class_indices)) for c in corrections]
        new_flags = _changed_flags(slices, new_masks, geometries)
    coverage = _coverage(slices)
    corrections: Any = slices
    if painted:
        parts = _painted_slices(
            painted, context_slices=context_slices, num_classes=num_classes, preprocess=preprocess, config=config
        )
        corrections = ConcatSlices([slices, *(p for p, _, _ in parts)])
        flags = np.concatenate([flags, *(f for _, f, _ in parts)])
        coverage = np.concatenate([coverage, *(c for _, _, c in parts)])
        if new_flags is not None:
            new_flags = np.concatenate([new_flags, *(f for _, f, _ in parts)])
    replay_slices = None
    if replay and config.replay_fraction > 0:
        replay_slices = SliceDataset(
            replay,
            planes=planes,
            context_slices=context_slices,
            num_classes=num_classes,
            preprocess=preprocess,
            augment=config.augment,
            crop_size=config.crop_size,
            foreground_only=True,
            keep_empty_fraction=0.15,
            seed=config.seed + 1,
        )
    if config.crop_size is None:
        _pad_whole_slices_to_one_size([corrections, replay_slices])
    return FinetuneDataset(
        corrections,
        flags,
        replay_slices,
        config.replay_fraction,
        config.changed_priority,
        coverage=coverage,
        min_coverage=config.min_coverage,
        new_class=new_flags,
    )
