"""Training losses for slice-wise segmentation, all aware of partial labels.

Every loss is an ``nn.Module`` called as ``loss(logits, target, known=None)``:

* ``logits``  ``[B, C, H, W]`` raw network outputs (any number of spatial axes works);
* ``target``  ``[B, H, W]`` long class indices; pixels equal to :data:`IGNORE_INDEX` (255) are
  excluded from every term;
* ``known``   optional bool ``[B, C]``: which classes are annotated in each sample.  ``None`` means
  all classes are annotated.  The background column is ignored (always treated as present).

Partial labels: the *marginal* rule (Shi et al., "Marginal loss and exclusion loss for partially
supervised multi-organ segmentation", MedIA 2021).  In a sample where class ``c`` is not
annotated, a pixel labelled background means "background or any unannotated class", so

* cross-entropy / focal: the probability of the background target is the *sum* of the softmax
  probabilities of background and all unannotated classes (``logsumexp`` of the log-probabilities);
* Dice / Tversky: the terms of unannotated classes are skipped for that sample and the background
  term uses that merged background probability;
* one-vs-rest BCE: the channels of unannotated classes are masked out for that sample, and so is
  the background channel at pixels labelled background (they may belong to an unannotated class).

Pixels carrying an unannotated class label anyway are trusted as labelled.  Computation is done in
float32 whatever the autocast dtype of ``logits``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

__all__ = [
    "IGNORE_INDEX",
    "LOSS_NAMES",
    "BCEWithLogitsLoss",
    "CEDiceLoss",
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalDiceLoss",
    "FocalLoss",
    "TverskyLoss",
    "build_loss",
]

IGNORE_INDEX = 255


# ------------------------------------------------------------------------------------------------
# Shared preparation
# ------------------------------------------------------------------------------------------------
def _prepare(
    logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits, target with ignored pixels set to 0, the valid-pixel mask and ``bg_set``.

    ``bg_set`` ``[B, C]`` marks the classes merged into the background target of each sample:
    background itself plus every unannotated class.
    """
    if logits.ndim < 3:
        raise InputError(f"logits must be [B, C, *spatial], got shape {tuple(logits.shape)}")
    batch, n_classes = logits.shape[:2]
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != (batch, *logits.shape[2:]):
        raise InputError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    if target.is_floating_point():
        raise InputError("target must hold integer class indices")
    target = target.long()
    valid = target != IGNORE_INDEX
    safe_target = target.masked_fill(~valid, 0)
    if safe_target.numel() and (int(safe_target.min()) < 0 or int(safe_target.max()) >= n_classes):
        raise InputError(
            f"target values must be in 0..{n_classes - 1} or {IGNORE_INDEX}, found "
            f"{int(safe_target.min())}..{int(safe_target.max())}"
        )
    if known is None:
        bg_set = torch.zeros(batch, n_classes, dtype=torch.bool, device=logits.device)
    else:
        known = torch.as_tensor(known, device=logits.device)
        if known.shape != (batch, n_classes):
            raise InputError(f"known must be a bool tensor [B, C] = {(batch, n_classes)}, got {tuple(known.shape)}")
        bg_set = ~known.bool()
    bg_set = bg_set.clone()
    bg_set[:, 0] = True
    return logits.float(), safe_target, valid, bg_set


def _expand(per_sample: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[B, C]`` -> ``[B, C, 1, 1, ...]`` for broadcasting over ``ndim`` total axes."""
    return per_sample.reshape(*per_sample.shape, *([1] * (ndim - 2)))


def _target_log_prob(logits: torch.Tensor, safe_target: torch.Tensor, bg_set: torch.Tensor) -> torch.Tensor:
    """Log-probability of each pixel's target under the marginal rule, shape ``[B, *spatial]``."""
    log_probs = F.log_softmax(logits, dim=1)
    picked = log_probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    if bool(bg_set[:, 1:].any()):
        merged = torch.logsumexp(log_probs.masked_fill(~_expand(bg_set, logits.ndim), float("-inf")), dim=1)
        picked = torch.where(safe_target == 0, merged, picked)
    return picked


def _pixel_weights(
    safe_target: torch.Tensor, valid: torch.Tensor, class_weights: torch.Tensor | None, n_classes: int
) -> torch.Tensor:
    weights = valid.float()
    if class_weights is not None:
        if class_weights.numel() != n_classes:
            raise InputError(f"class_weights has {class_weights.numel()} values for {n_classes} classes")
        weights = weights * class_weights.to(safe_target.device, torch.float32)[safe_target]
    return weights


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(values * weights) / sum(weights)``; 0 (still attached to the graph) if all weights are 0."""
    return (values * weights).sum() / weights.sum().clamp_min(1e-12)


def _as_weights(class_weights: Sequence[float] | torch.Tensor | None) -> torch.Tensor | None:
    if class_weights is None:
        return None
    weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise InputError(f"class weights must be finite and >= 0, got {weights.tolist()}")
    return weights


class _PartialLabelLoss(nn.Module):
    """Base: stores the optional per-class weights as a buffer."""

    def __init__(self, class_weights: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        weights = _as_weights(class_weights)
        self.register_buffer("class_weights", weights, persistent=False)


# ------------------------------------------------------------------------------------------------
# Pixel-wise losses
# ------------------------------------------------------------------------------------------------
class CrossEntropyLoss(_PartialLabelLoss):
    """Marginal cross-entropy; equals ``F.cross_entropy(..., weight, ignore_index=255)`` when all
    classes are known (weighted mean over valid pixels)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        logits, safe_target, valid, bg_set = _prepare(logits, target, known)
        log_pt = _target_log_prob(logits, safe_target, bg_set)
        weights = _pixel_weights(safe_target, valid, self.class_weights, logits.shape[1])
        return _weighted_mean(-log_pt, weights)


class FocalLoss(_PartialLabelLoss):
    """Marginal focal loss ``-(1 - p_t)^gamma * log p_t``; ``gamma = 0`` is :class:`CrossEntropyLoss`.

    ``p_t`` is the marginal target probability; ``class_weights`` act as the per-class alpha and
    the result is their weighted mean over valid pixels.
    """

    def __init__(self, gamma: float = 2.0, class_weights: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__(class_weights)
        if gamma < 0:
            raise InputError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        logits, safe_target, valid, bg_set = _prepare(logits, target, known)
        log_pt = _target_log_prob(logits, safe_target, bg_set)
        loss = -log_pt
        if self.gamma > 0:
            # clamp: avoids an infinite gradient of x**gamma at x = 0 for gamma < 1
            loss = (1.0 - log_pt.exp()).clamp_min(1e-12).pow(self.gamma) * loss
        weights = _pixel_weights(safe_target, valid, self.class_weights, logits.shape[1])
        return _weighted_mean(loss, weights)


class BCEWithLogitsLoss(_PartialLabelLoss):
    """One-vs-rest sigmoid BCE of every channel against the one-hot target (unet-bce recipe).

    Weighted mean over the unmasked (pixel, channel) elements; ``class_weights`` weight channels.
    Masked: ignored pixels; channels of unannotated classes in that sample; and in samples with any
    unannotated class, the background channel at pixels labelled background.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        logits, safe_target, valid, bg_set = _prepare(logits, target, known)
        n_classes = logits.shape[1]
        onehot = F.one_hot(safe_target, n_classes).movedim(-1, 1).float()
        elementwise = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        mask = valid.unsqueeze(1) & ~_expand(bg_set, logits.ndim)
        # background channel: reliable unless the sample has an unannotated class and the pixel is 0
        partial = bg_set[:, 1:].any(dim=1).reshape(-1, *([1] * (logits.ndim - 2)))  # [B, 1, ...]
        mask[:, 0] = valid & ~(partial & (safe_target == 0))
        weights = mask.float()
        if self.class_weights is not None:
            if self.class_weights.numel() != n_classes:
                raise InputError(f"class_weights has {self.class_weights.numel()} values for {n_classes} classes")
            weights = weights * _expand(self.class_weights.to(logits.device)[None], logits.ndim)
        return _weighted_mean(elementwise, weights)


# ------------------------------------------------------------------------------------------------
# Overlap losses
# ------------------------------------------------------------------------------------------------
def _tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    known: torch.Tensor | None,
    alpha: float,
    beta: float,
    smooth: float,
    include_background: bool,
    batch: bool,
    class_weights: torch.Tensor | None,
) -> torch.Tensor:
    """``1 - weighted mean_c (TP + s) / (TP + alpha FP + beta FN + s)`` with soft, marginal counts."""
    logits, safe_target, valid, bg_set = _prepare(logits, target, known)
    n_classes, ndim = logits.shape[1], logits.ndim
    probs = F.softmax(logits, dim=1)
    merged_bg = (probs * _expand(bg_set.float(), ndim)).sum(dim=1, keepdim=True)
    probs = torch.cat([merged_bg, probs[:, 1:]], dim=1) * valid.unsqueeze(1)
    onehot = F.one_hot(safe_target, n_classes).movedim(-1, 1).float() * valid.unsqueeze(1)
    spatial = tuple(range(2, ndim))
    tp = (probs * onehot).sum(spatial)  # [B, C]
    fp = probs.sum(spatial) - tp
    fn = onehot.sum(spatial) - tp
    include = ~bg_set
    include[:, 0] = include_background
    if batch:
        inc = include.float()
        tp, fp, fn = (tp * inc).sum(0), (fp * inc).sum(0), (fn * inc).sum(0)
        include = include.any(0)
    index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    weights = include.float()
    if class_weights is not None:
        if class_weights.numel() != n_classes:
            raise InputError(f"class_weights has {class_weights.numel()} values for {n_classes} classes")
        weights = weights * class_weights.to(logits.device)
    return _weighted_mean(1.0 - index, weights)


class TverskyLoss(_PartialLabelLoss):
    """Soft Tversky loss ``1 - (TP + s) / (TP + alpha*FP + beta*FN + s)``, averaged over classes.

    ``alpha`` weights false positives, ``beta`` false negatives (MONAI's convention).  With
    ``batch=True`` counts are summed over the samples where the class is annotated (batch Dice);
    otherwise the loss averages per-sample, per-class terms.  ``class_weights`` weight the class
    terms.  ``alpha = beta = 0.5`` is :class:`DiceLoss`.
    """

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.7,
        smooth: float = 1.0,
        include_background: bool = True,
        batch: bool = True,
        class_weights: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__(class_weights)
        if alpha < 0 or beta < 0 or smooth < 0:
            raise InputError(f"Tversky alpha, beta and smooth must be >= 0, got {alpha}, {beta}, {smooth}")
        self.alpha, self.beta, self.smooth = float(alpha), float(beta), float(smooth)
        self.include_background, self.batch = bool(include_background), bool(batch)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        return _tversky_loss(
            logits,
            target,
            known,
            self.alpha,
            self.beta,
            self.smooth,
            self.include_background,
            self.batch,
            self.class_weights,
        )


class DiceLoss(TverskyLoss):
    """Soft Dice loss ``1 - (2 TP + 2s) / (sum P + sum T + 2s)`` per class, averaged over classes.

    This is Tversky with ``alpha = beta = 0.5`` and equals MONAI's ``DiceLoss(softmax=True,
    to_onehot_y=True, batch=batch, smooth_nr=2*smooth, smooth_dr=2*smooth)`` when all classes
    are annotated.
    """

    def __init__(
        self,
        smooth: float = 1.0,
        include_background: bool = True,
        batch: bool = True,
        class_weights: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__(0.5, 0.5, smooth, include_background, batch, class_weights)


# ------------------------------------------------------------------------------------------------
# Compound losses
# ------------------------------------------------------------------------------------------------
class CEDiceLoss(nn.Module):
    """``lambda_ce * CrossEntropyLoss + lambda_dice * DiceLoss`` (both 1 by default)."""

    def __init__(
        self,
        lambda_ce: float = 1.0,
        lambda_dice: float = 1.0,
        smooth: float = 1.0,
        include_background: bool = True,
        batch: bool = True,
        class_weights: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.lambda_ce, self.lambda_dice = float(lambda_ce), float(lambda_dice)
        self.ce = CrossEntropyLoss(class_weights)
        self.dice = DiceLoss(smooth, include_background, batch, class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        return self.lambda_ce * self.ce(logits, target, known) + self.lambda_dice * self.dice(logits, target, known)


class FocalDiceLoss(nn.Module):
    """``alpha * FocalLoss(gamma) + (1 - alpha) * DiceLoss``.

    ``alpha`` (default 0.6) is the weight of the **focal** term; the Dice term gets ``1 - alpha``.
    It is not the per-class focal alpha: per-class weighting is ``class_weights`` (used by both).
    """

    def __init__(
        self,
        alpha: float = 0.6,
        gamma: float = 2.0,
        smooth: float = 1.0,
        include_background: bool = True,
        batch: bool = True,
        class_weights: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise InputError(f"focal+dice alpha must be in 0..1, got {alpha}")
        self.alpha = float(alpha)
        self.focal = FocalLoss(gamma, class_weights)
        self.dice = DiceLoss(smooth, include_background, batch, class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        return self.alpha * self.focal(logits, target, known) + (1.0 - self.alpha) * self.dice(logits, target, known)


_LOSSES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropyLoss,
    "bce": BCEWithLogitsLoss,
    "dice": DiceLoss,
    "ce+dice": CEDiceLoss,
    "focal+dice": FocalDiceLoss,
    "tversky": TverskyLoss,
}
LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)


def build_loss(name: str, **kwargs) -> nn.Module:
    """The loss called ``name`` (one of :data:`LOSS_NAMES`), constructed with ``kwargs``."""
    key = str(name).strip().lower().replace(" ", "")
    if key not in _LOSSES:
        raise InputError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    try:
        return _LOSSES[key](**kwargs)
    except TypeError as error:
        raise InputError(f"loss {name!r}: bad options {sorted(kwargs)}: {error}") from None
