"""Torch datasets of 2-D training samples cut exactly the way inference cuts slices.

Per case, once: :func:`~napari_spineseg.slicing.prepare_study` (canonical orientation + volume
normalisation) and :func:`~napari_spineseg.slicing.canonical_labels`; per plane the stack of
slices (:func:`~napari_spineseg.slicing.plane_view`), the slice-level filters of the
pre-processing configuration (:func:`~napari_spineseg.preprocess.preprocess_slice`, at the
native pixel spacing) and the in-plane resampling to the model's pixel spacing
(:func:`~napari_spineseg.preprocess.resample_slices`, order 1 for images, order 0 for labels).
:func:`prepare_plane_stack` is that one recipe; inference must use the same order.

A sample is a dict ``{"image": float32 [2k+1, H, W], "target": int64 [H, W] (255 = ignore),
"known": bool [C]}``; training samples are randomly cropped/padded to ``crop_size`` and
augmented with :func:`~napari_spineseg.augment.augment_pair`.  Randomness is derived from
``(seed, epoch, index)`` only, so results do not depend on worker processes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..augment import AugmentConfig, augment_pair, mirror_left_right
from ..errors import InputError
from ..orientation import Plane
from ..preprocess import PreprocessConfig, preprocess_slice, resample_slices
from ..schema import IGNORE
from ..slicing import PreparedStudy, canonical_labels, plane_pixel_spacing, plane_view, prepare_study, slice_batch
from .data import TrainingCase

__all__ = [
    "PatchDataset",
    "PlaneStack",
    "PreparedCase",
    "SliceDataset",
    "prepare_case",
    "prepare_plane_stack",
    "slice_filters_enabled",
]

logger = logging.getLogger(__name__)


def slice_filters_enabled(config: PreprocessConfig) -> bool:
    """Whether ``config`` has any per-slice filter (NL-means, bilateral, Gaussian, CLAHE)."""
    return bool(config.denoise_nlmeans or config.bilateral or config.gaussian_sigma_mm > 0 or config.clahe)


@dataclass
class PlaneStack:
    """One plane of a prepared case at the model's pixel spacing."""

    image: np.ndarray  # float32 [N, H, W]
    labels: np.ndarray | None  # uint8 [N, H, W] or None
    native_hw: tuple[int, int]  # slice shape before resampling
    pixel_spacing: tuple[float, float]  # native (row, col) spacing in mm


def prepare_plane_stack(
    prepared: PreparedStudy,
    plane: Plane,
    preprocess: PreprocessConfig,
    labels: np.ndarray | None = None,
) -> PlaneStack:
    """Slices of ``plane`` of a prepared study: slice filters (native spacing), then resampling.

    ``labels`` (canonical, same shape as ``prepared.image``) are resampled with order 0.
    When the native pixel spacing already equals the model spacing the stacks are views.
    """
    plane = Plane(plane)
    stack = plane_view(prepared.image, plane)
    spacing = plane_pixel_spacing(prepared.spacing_zyx, plane)
    if slice_filters_enabled(preprocess):
        stack = np.stack([preprocess_slice(s, spacing, preprocess) for s in stack]).astype(np.float32)
    label_stack = plane_view(labels, plane) if labels is not None else None
    model = preprocess.pixel_spacing_mm
    if model is not None and not np.allclose(spacing, (model, model), rtol=0, atol=1e-6):
        stack = resample_slices(stack, spacing, (model, model), order=1)
        if label_stack is not None:
            label_stack = resample_slices(label_stack, spacing, (model, model), order=0)
    return PlaneStack(stack, label_stack, tuple(int(v) for v in plane_view(prepared.image, plane).shape[1:]), spacing)


@dataclass
class PreparedCase:
    """A case prepared once: canonical image/labels and one :class:`PlaneStack` per plane."""

    case: TrainingCase
    prepared: PreparedStudy
    labels: np.ndarray  # canonical uint8 with IGNORE
    planes: dict[Plane, PlaneStack]
    known: np.ndarray  # bool [C]


def prepare_case(
    case: TrainingCase, planes: Sequence[Plane], preprocess: PreprocessConfig, num_classes: int
) -> PreparedCase:
    # float16, exactly as the inference path prepares studies (also halves the memory).
    prepared = prepare_study(case.image, preprocess, dtype=np.float16)
    labels = np.ascontiguousarray(canonical_labels(case.labels)).astype(np.uint8, copy=False)
    bad = (labels >= num_classes) & (labels != IGNORE)
    if bad.any():
        raise InputError(
            f"case {case.case_id}: label values {sorted(np.unique(labels[bad]).tolist())} exceed the "
            f"{num_classes} model classes"
        )
    stacks = {Plane(p): prepare_plane_stack(prepared, Plane(p), preprocess, labels) for p in planes}
    return PreparedCase(case, prepared, labels, stacks, case.known_mask(num_classes))


def pad_to_size(
    image: np.ndarray, target: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Pad ``image`` [C, H, W] (0) and ``target`` [H, W] (IGNORE) at random sides to at least
    ``size``×``size``; returns them and the (top, left) offset of the original pixels."""
    _, h, w = image.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if not (ph or pw):
        return image, target, (0, 0)
    top, left = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
    image = np.pad(image, ((0, 0), (top, ph - top), (left, pw - left)))
    target = np.pad(target, ((top, ph - top), (left, pw - left)), constant_values=IGNORE)
    return image, target, (top, left)


def window_origin(
    shape: tuple[int, int], size: int, rng: np.random.Generator, centre: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Top-left corner of a random ``size``² window in ``shape``; with ``centre``, the window holds
    it inside its middle half."""
    h, w = shape
    if centre is None:
        return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    r0 = int(np.clip(centre[0] - rng.integers(size // 4, 3 * size // 4 + 1), 0, h - size))
    c0 = int(np.clip(centre[1] - rng.integers(size // 4, 3 * size // 4 + 1), 0, w - size))
    return r0, c0


def _crop_or_pad(
    image: np.ndarray, target: np.ndarray, size: int, rng: np.random.Generator, foreground_prob: float
) -> tuple[np.ndarray, np.ndarray]:
    """Random ``size``×``size`` window (padding with 0 / IGNORE), often centred near foreground."""
    image, target, _ = pad_to_size(image, target, size, rng)
    h, w = target.shape
    r0 = c0 = 0
    if h > size or w > size:
        fg = None
        if foreground_prob > 0 and rng.random() < foreground_prob:
            rows, cols = np.nonzero((target > 0) & (target != IGNORE))
            if rows.size:
                pick = int(rng.integers(rows.size))
                fg = (int(rows[pick]), int(cols[pick]))
        r0, c0 = window_origin((h, w), size, rng, fg)
    return (
        np.ascontiguousarray(image[:, r0 : r0 + size, c0 : c0 + size]),
        np.ascontiguousarray(target[r0 : r0 + size, c0 : c0 + size]),
    )


class SliceDataset(Dataset):
    """2-D (2.5-D with context) training samples of ``cases`` along ``planes``.

    Parameters
    ----------
    crop_size
        Training window (pixels at the model spacing); ``None`` returns whole slices.
    augment
        :class:`AugmentConfig` or ``None`` (no augmentation).
    foreground_only
        Keep only slices with some annotated foreground, plus a ``keep_empty_fraction`` of the
        others (deterministic by ``seed``).  Slices with no ground truth at all (entirely IGNORE,
        e.g. axial slices outside the labelled span) are always dropped.
    min_foreground_fraction
        Slice filtration: drop slices whose foreground is a smaller fraction of the labelled
        pixels (extreme class imbalance); 0 disables.
    """

    def __init__(
        self,
        cases: Sequence[TrainingCase] | Sequence[PreparedCase],
        planes: Sequence[Plane | str] = ("axial", "coronal", "sagittal"),
        context_slices: int = 1,
        num_classes: int = 5,
        preprocess: PreprocessConfig | None = None,
        augment: AugmentConfig | None = None,
        crop_size: int | None = 192,
        foreground_only: bool = False,
        keep_empty_fraction: float = 0.1,
        min_foreground_fraction: float = 0.0,
        foreground_crop_prob: float = 0.7,
        seed: int = 0,
    ) -> None:
        if not cases:
            raise InputError("no training cases")
        self.planes = [Plane(p) for p in planes]
        self.context_slices = int(context_slices)
        self.num_classes = int(num_classes)
        self.preprocess = preprocess or PreprocessConfig()
        self.augment = augment
        self.crop_size = None if crop_size is None else int(crop_size)
        self.foreground_crop_prob = float(foreground_crop_prob)
        self.seed = int(seed)
        self.epoch = 0
        self.cases: list[PreparedCase] = [
            c if isinstance(c, PreparedCase) else prepare_case(c, self.planes, self.preprocess, self.num_classes)
            for c in cases
        ]
        index: list[tuple[int, int, int]] = []
        presence: list[np.ndarray] = []
        rng = np.random.default_rng([self.seed, 12345])
        for ci, prepared in enumerate(self.cases):
            for pi, plane in enumerate(self.planes):
                labels = prepared.planes[plane].labels
                flat = labels.reshape(labels.shape[0], -1)
                valid = (flat != IGNORE).sum(1)
                counts = np.stack([(flat == c).sum(1) for c in range(self.num_classes)], axis=1)
                fg = counts[:, 1:].sum(1)
                for si in range(labels.shape[0]):
                    if valid[si] == 0:
                        continue
                    if foreground_only and fg[si] == 0 and rng.random() >= keep_empty_fraction:
                        continue
                    if min_foreground_fraction > 0 and fg[si] > 0 and fg[si] < min_foreground_fraction * valid[si]:
                        continue
                    index.append((ci, pi, si))
                    presence.append(counts[si] > 0)
        if not index:
            raise InputError("no usable training slices (every slice was filtered out)")
        self.index = np.asarray(index, dtype=np.int64)
        self.presence = np.asarray(presence, dtype=bool)  # [N, C]

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation randomness (call once per epoch)."""
        self.epoch = int(epoch)

    def sample_weights(self) -> np.ndarray:
        """Class-balanced weights per sample for a ``WeightedRandomSampler``.

        Each sample weighs the largest ``1 / (number of samples containing c)`` over the
        foreground classes ``c`` it contains (background-only samples: ``1 / number of such``);
        weights sum to the number of samples.
        """
        fg = self.presence[:, 1:]
        per_class = fg.sum(0).astype(float)
        inv = np.where(per_class > 0, 1.0 / np.maximum(per_class, 1), 0.0)
        weights = (fg * inv[None]).max(axis=1)
        empty = ~fg.any(axis=1)
        if empty.any():
            weights[empty] = 1.0 / empty.sum()
        return weights * (len(weights) / weights.sum())

    def raw_sample(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image [2k+1, H, W], target uint8 [H, W], known [C]) without cropping/augmentation."""
        ci, pi, si = (int(v) for v in self.index[i])
        prepared = self.cases[ci]
        stack = prepared.planes[self.planes[pi]]
        image = slice_batch(stack.image, [si], self.context_slices)[0]
        return image, np.array(stack.labels[si], dtype=np.uint8), prepared.known

    def rng_for(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(i)])

    def _maybe_mirror(self, i: int, image: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The left-right mirror of the augmentation (its own random stream, so the other draws stay put)."""
        probability = self.augment.lr_flip_prob if self.augment is not None else 0.0
        if probability <= 0 or np.random.default_rng([self.seed, self.epoch, int(i), 1]).random() >= probability:
            return image, target
        plane = self.planes[int(self.index[i][1])]
        return mirror_left_right(image, target, "channels" if plane == Plane.SAGITTAL else "columns")

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, target, known = self.raw_sample(i)
        rng = self.rng_for(i)
        image, target = self._maybe_mirror(i, image, target)
        if self.crop_size is not None:
            image, target = _crop_or_pad(image, target, self.crop_size, rng, self.foreground_crop_prob)
        if self.augment is not None:
            image, target = augment_pair(image, target, rng, self.augment)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "target": torch.from_numpy(target.astype(np.int64)),
            "known": torch.from_numpy(known.copy()),
        }


class PatchDataset(Dataset):
    """PENN-style patch samples: ``patch_size``² windows at ``stride`` over the slices.

    A patch is *positive* for class ``c`` when ``c`` covers at least ``positive_fraction`` of it
    (else it is background); patches with more than ``max_ignore_fraction`` IGNORE pixels are
    skipped.  Background patches are undersampled to ``positive_ratio`` positives overall.
    Targets are the patch class repeated over the window (so any pixel-wise loss trains the
    per-patch classifier of :class:`~napari_spineseg.models.PennNet`).  Smoothing (Gaussian σ = 2
    mm) belongs in the :class:`PreprocessConfig` so that inference applies it too.
    """

    def __init__(
        self,
        slices: SliceDataset,
        patch_size: int = 32,
        stride: int = 16,
        positive_fraction: float = 0.6,
        positive_ratio: float = 0.6,
        max_ignore_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        if not 0 < positive_ratio < 1:
            raise InputError(f"positive_ratio must be in (0, 1), got {positive_ratio}")
        self.slices = slices
        self.patch_size = int(patch_size)
        self.augment = slices.augment
        self.seed = int(seed)
        self.epoch = 0
        ps, k = self.patch_size, slices.num_classes
        area = ps * ps
        positives: list[tuple[int, int, int, int]] = []
        negatives: list[tuple[int, int, int, int]] = []
        for i in range(len(slices)):
            _, target, _ = slices.raw_sample(i)
            h, w = target.shape
            if h < ps or w < ps:
                continue
            rows = np.arange(0, h - ps + 1, stride)
            cols = np.arange(0, w - ps + 1, stride)
            sums = []
            for value in [*range(k), IGNORE]:
                integral = np.pad((target == value).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
                box = (
                    integral[rows[:, None] + ps, cols[None, :] + ps]
                    - integral[rows[:, None], cols[None, :] + ps]
                    - integral[rows[:, None] + ps, cols[None, :]]
                    + integral[rows[:, None], cols[None, :]]
                )
                sums.append(box)
            counts = np.stack(sums)  # [k+1, R, C]
            usable = counts[-1] <= max_ignore_fraction * area
            fg = counts[1:k]
            best = fg.argmax(0) + 1
            is_pos = (fg.max(0) >= positive_fraction * area) & usable
            is_neg = ~is_pos & usable & (fg.sum(0) < positive_fraction * area)
            for r, c in zip(*np.nonzero(is_pos)):
                positives.append((i, int(rows[r]), int(cols[c]), int(best[r, c])))
            for r, c in zip(*np.nonzero(is_neg)):
                negatives.append((i, int(rows[r]), int(cols[c]), 0))
        if not positives:
            raise InputError("no positive patches: no structure fills enough of a patch")
        rng = np.random.default_rng([self.seed, 777])
        n_neg = min(len(negatives), round(len(positives) * (1 - positive_ratio) / positive_ratio))
        keep = rng.choice(len(negatives), size=n_neg, replace=False) if n_neg else np.zeros(0, int)
        self.patches = np.asarray(positives + [negatives[j] for j in sorted(keep)], dtype=np.int64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.patches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_weights(self) -> np.ndarray:
        labels = self.patches[:, 3]
        counts = np.bincount(labels, minlength=self.slices.num_classes).astype(float)
        weights = 1.0 / counts[labels]
        return weights * (len(weights) / weights.sum())

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        i, r, c, label = (int(v) for v in self.patches[j])
        image, _, known = self.slices.raw_sample(i)
        ps = self.patch_size
        image = image[:, r : r + ps, c : c + ps]
        target = np.full((ps, ps), label, dtype=np.uint8)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, j])
            image, target = augment_pair(image, target, rng, self.augment)
            target = np.full((ps, ps), label, dtype=np.uint8)  # a patch keeps its class
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "target": torch.from_numpy(target.astype(np.int64)),
            "known": torch.from_numpy(known.copy()),
        }
