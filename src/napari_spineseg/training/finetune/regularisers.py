"""Regularisers against forgetting: replay distillation, the L2-SP anchor, frozen stages, learning rates."""

from __future__ import annotations

import copy
import logging
from typing import Any

from ...runtime import autocast
from ...schema import IGNORE

logger = logging.getLogger(__name__)


class ReplayDistillation:
    """Forgetting guard: on replay samples, keep the fine-tuned model's class probabilities close to
    the base model's (Li & Hoiem's "learning without forgetting").

    ``sum_c q_c (log q_c - log p_c)`` over the base model's classes, with ``p`` the fine-tuned
    model's softmax over *all* its classes: probability given to a new class on a reference case
    counts as disagreement (the reference cases hold no painted lesion, so a lesion class must not
    spread over their vertebral bodies).  Correction samples are left alone, so the model is free
    to change where the annotator corrected it, unless ``unreviewed_weight`` > 0: then their
    untrusted pixels (target IGNORE) are distilled too, with that weight.

    The divergence splits exactly into ``KL(q ‖ p̂) − log(1 − p_new)`` (``p̂``: the fine-tuned
    model's probabilities renormalised over the base classes, ``p_new``: its new-class mass);
    ``new_weight`` (default ``weight``) weighs the second term: a strong pull toward the base
    classes' predictions need not be an equally strong veto on a new class.
    """

    def __init__(
        self,
        base_network,
        old_k: int,
        weight: float,
        device,
        precision,
        unreviewed_weight: float = 0.0,
        new_weight: float | None = None,
    ):
        self.base = copy.deepcopy(base_network).to(device).eval()
        for parameter in self.base.parameters():
            parameter.requires_grad_(False)
        self.old_k = int(old_k)
        self.weight = float(weight)
        self.new_weight = self.weight if new_weight is None else float(new_weight)
        self.unreviewed_weight = float(unreviewed_weight)
        self.device = device
        self.precision = precision

    def __call__(self, network, batch, logits):
        import torch
        from torch.nn import functional as F

        replay = batch.get("replay")
        if replay is None:
            replay = torch.zeros(len(batch["image"]), dtype=torch.bool)
        replay = replay.bool()
        unreviewed = None
        if self.unreviewed_weight > 0 and "target" in batch:
            unreviewed = (batch["target"] == IGNORE) & ~replay.view(-1, *([1] * (batch["target"].ndim - 1)))
            if not bool(unreviewed.any()):
                unreviewed = None
        use_replay = self.weight > 0 and bool(replay.any())
        if not use_replay and unreviewed is None:
            return None
        wanted = replay.clone() if use_replay else torch.zeros_like(replay)
        if unreviewed is not None:
            wanted |= unreviewed.flatten(1).any(dim=1)
        rows = wanted.nonzero().squeeze(1)
        image = batch["image"][rows].to(self.device)
        if self.precision in ("bf16", "fp16") or self.device.startswith("cuda"):
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(self.device, self.precision):
            teacher = self.base(image)
        target = F.softmax(teacher.float(), dim=1)
        student = logits[rows.to(logits.device)].float()
        log_p = F.log_softmax(student, dim=1)[:, : self.old_k]
        kl = (target * (torch.log(target.clamp_min(1e-8)) - log_p)).sum(dim=1)  # [rows, H, W]
        total = None
        if use_replay:
            on_replay = replay[rows].to(kl.device)
            replay_kl = kl[on_replay]
            if student.shape[1] > self.old_k and self.new_weight != self.weight:
                # −log(1 − p_new) = logsumexp(all) − logsumexp(base classes): the new classes' share
                veto = (torch.logsumexp(student, dim=1) - torch.logsumexp(student[:, : self.old_k], dim=1))[on_replay]
                replay_kl = (replay_kl - veto) + (self.new_weight / max(self.weight, 1e-12)) * veto
            term = self.weight * replay_kl.mean() * (int(on_replay.sum()) / len(replay))
            total = term
        if unreviewed is not None:
            mask = unreviewed[rows].to(kl.device)
            term = self.unreviewed_weight * (kl * mask).sum() / mask[~replay[rows].to(kl.device)].numel()
            term = term * (int((~replay).sum()) / len(replay))
            total = term if total is None else total + term
        return total


class WeightAnchor:
    """L2-SP (Li et al. 2018): ``weight * sum (w - w_base)²`` over the parameters the fine-tuned
    network shares (by name and shape) with its base; pulls every weight toward where it started."""

    def __init__(self, network, base_network, weight: float):
        base = dict(base_network.named_parameters())
        self.pairs = []
        for name, parameter in network.named_parameters():
            start = base.get(name)
            if start is not None and start.shape == parameter.shape and parameter.requires_grad:
                self.pairs.append((parameter, start.detach().clone().to(parameter.device)))
        self.weight = float(weight)

    def __call__(self, network, batch, logits):
        if not self.pairs or self.weight <= 0:
            return None
        if self.pairs[0][1].device != self.pairs[0][0].device:  # the network moved to its device
            self.pairs = [(p, p0.to(p.device)) for p, p0 in self.pairs]
        return self.weight * sum(((p.float() - p0.float()) ** 2).sum() for p, p0 in self.pairs)


def combine_hooks(*hooks):
    active = [h for h in hooks if h is not None]
    if not active:
        return None

    def hook(network, batch, logits):
        total = None
        for h in active:
            term = h(network, batch, logits)
            if term is not None:
                total = term if total is None else total + term
        return total

    return hook


ENCODER_PREFIXES = ("inc.", "downs.", "encoder.", "backbone.", "convs.", "bns.")


def _input_stage(name: str) -> int | None:
    """Encoder stage of a U-Net parameter (``inc.`` 0, ``downs.K.`` K + 1), else None."""
    if name.startswith("inc."):
        return 0
    head, _, rest = name.partition(".")
    index = rest.partition(".")[0]
    return int(index) + 1 if head == "downs" and index.isdigit() else None


def freeze_input_stages(network, stages: int) -> int:
    """Freeze the first ``stages`` encoder stages (no gradient is computed for them); returns the
    number of frozen parameters.  Undone by :func:`thaw`."""
    frozen = 0
    for name, parameter in network.named_parameters():
        stage = _input_stage(name)
        if stage is not None and stage < stages:
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def lr_param_groups(network, encoder_lr_scale: float, decoder_lr_scale: float = 1.0) -> list[dict[str, Any]] | None:
    """Optimizer groups: the encoder (by the architectures' module names) at ``encoder_lr_scale``,
    the rest (decoder, output layer) at ``decoder_lr_scale``, the new classes' rows at 1 (they have
    their own speed-up, :func:`speed_up_new_rows`).

    Scale 0 freezes the encoder (``requires_grad`` off: no gradient is computed for it at all,
    which also makes a step cheaper); :func:`thaw` undoes that on the result.
    """
    if encoder_lr_scale == 1.0 and decoder_lr_scale == 1.0:
        return None
    encoder, rest, new_rows = [], [], []
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith(ENCODER_PREFIXES):
            encoder.append(parameter)
        elif name.rpartition(".")[2] in ("new_weight", "new_bias"):
            new_rows.append(parameter)
        else:
            rest.append(parameter)
    if not encoder:
        logger.info("no encoder parameters recognised: one learning rate for the whole network")
        return None
    groups = [{"params": rest, "lr_scale": float(decoder_lr_scale)}]
    if new_rows:
        groups.append({"params": new_rows, "lr_scale": 1.0})
    if encoder_lr_scale == 0:
        for parameter in encoder:
            parameter.requires_grad_(False)
    else:
        groups.append({"params": encoder, "lr_scale": float(encoder_lr_scale)})
    return groups


def thaw(network) -> None:
    for parameter in network.parameters():
        parameter.requires_grad_(True)
