"""Tests of the partial-label-aware losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_spineseg.errors import InputError
from napari_spineseg.losses import (
    IGNORE_INDEX,
    LOSS_NAMES,
    BCEWithLogitsLoss,
    CEDiceLoss,
    CrossEntropyLoss,
    DiceLoss,
    FocalDiceLoss,
    FocalLoss,
    TverskyLoss,
    build_loss,
)

C = 5
DISC = 2


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, C, 12, 10, generator=gen) * 2
    target = torch.randint(0, C, (3, 12, 10), generator=gen)
    return logits, target


def _all_losses() -> list[torch.nn.Module]:
    return [build_loss(name) for name in LOSS_NAMES]


def test_ce_equals_torch_cross_entropy_when_all_known(batch):
    logits, target = batch
    known = torch.ones(3, C, dtype=torch.bool)
    expected = F.cross_entropy(logits, target)
    assert torch.allclose(CrossEntropyLoss()(logits, target), expected, atol=1e-6)
    assert torch.allclose(CrossEntropyLoss()(logits, target, known), expected, atol=1e-6)
    weights = torch.tensor([0.2, 1.0, 2.0, 0.5, 3.0])
    target = target.clone()
    target[0, :3] = IGNORE_INDEX
    expected = F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE_INDEX)
    assert torch.allclose(CrossEntropyLoss(class_weights=weights)(logits, target, known), expected, atol=1e-6)


def test_background_column_of_known_is_ignored(batch):
    logits, target = batch
    known = torch.ones(3, C, dtype=torch.bool)
    known[:, 0] = False
    assert torch.allclose(CrossEntropyLoss()(logits, target, known), F.cross_entropy(logits, target), atol=1e-6)


def _disc_vs_background_logits(put_on: int) -> torch.Tensor:
    """One sample, every pixel labelled background; the network is confident in class ``put_on``."""
    logits = torch.zeros(1, C, 6, 6)
    logits[:, put_on] = 6.0
    return logits


@pytest.mark.parametrize("name", ["ce", "focal+dice", "ce+dice", "dice", "tversky", "bce"])
def test_partial_labels_disc_on_background_pixels(name):
    """THE partial-label test: disc predicted on pixels labelled 0.

    Disc unannotated in the sample: as good as predicting background.
    Disc annotated: clearly penalised.
    """
    loss = build_loss(name)
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[0, 0, 0] = 1  # a vertebral-body pixel keeps the sample non-trivial
    on_disc, on_bg = _disc_vs_background_logits(DISC), _disc_vs_background_logits(0)
    on_disc[0, :, 0, 0] = on_bg[0, :, 0, 0] = torch.tensor([0.0, 6.0, 0.0, 0.0, 0.0])

    unknown_disc = torch.ones(1, C, dtype=torch.bool)
    unknown_disc[0, DISC] = False
    all_known = torch.ones(1, C, dtype=torch.bool)

    partial_disc, partial_bg = loss(on_disc, target, unknown_disc), loss(on_bg, target, unknown_disc)
    full_disc, full_bg = loss(on_disc, target, all_known), loss(on_bg, target, all_known)
    if name == "bce":
        # sigmoid channels are independent: with disc masked the disc channel does not count at all,
        # and the background channel at background pixels is masked too -> the losses coincide
        assert torch.allclose(partial_disc, partial_bg, atol=1e-6)
    else:
        assert torch.allclose(partial_disc, partial_bg, atol=1e-3), (partial_disc, partial_bg)
    assert full_disc > full_bg + 0.3, (full_disc, full_bg)
    assert full_disc > partial_disc + 0.3


def test_marginal_ce_uses_summed_background_probability():
    logits = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(3))
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[:, 0, 0] = 3
    known = torch.ones(2, C, dtype=torch.bool)
    known[0, [2, 4]] = False  # sample 0 lacks disc and lesion labels
    probs = logits.softmax(1)
    p_target = probs.gather(1, target[:, None])[:, 0].clone()
    bg0 = target[0] == 0
    p_target[0][bg0] = (probs[0, 0] + probs[0, 2] + probs[0, 4])[bg0]
    expected = -p_target.log().mean()
    assert torch.allclose(CrossEntropyLoss()(logits, target, known), expected, atol=1e-5)


def test_ignore_index_excluded(batch):
    logits, target = batch
    target = target.clone()
    target[:, :4] = IGNORE_INDEX
    garbage = logits.clone()
    garbage[:, :, :4] = torch.randn(3, C, 4, 10) * 50  # anything on ignored pixels
    for loss in _all_losses():
        assert torch.allclose(loss(logits, target), loss(garbage, target), atol=1e-5), loss
    ce = CrossEntropyLoss()(logits, target)
    assert torch.allclose(ce, F.cross_entropy(logits[:, :, 4:], target[:, 4:]), atol=1e-6)
    everything_ignored = torch.full_like(target, IGNORE_INDEX)
    zero = CrossEntropyLoss()(logits.requires_grad_(), everything_ignored)
    assert zero.item() == 0.0
    zero.backward()


def test_focal_gamma_zero_is_ce_and_focal_down_weights_easy(batch):
    logits, target = batch
    known = torch.ones(3, C, dtype=torch.bool)
    known[1, 3] = False
    ce = CrossEntropyLoss()(logits, target, known)
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, target, known), ce, atol=1e-6)
    assert FocalLoss(gamma=2.0)(logits, target, known) < ce
    # alpha weights the focal term, 1 - alpha the Dice term
    combo = FocalDiceLoss(alpha=0.6, gamma=0.0)(logits, target, known)
    expected = 0.6 * ce + 0.4 * DiceLoss()(logits, target, known)
    assert torch.allclose(combo, expected, atol=1e-6)


def test_tversky_half_half_equals_dice_and_matches_monai(batch):
    from monai.losses import DiceLoss as MonaiDice
    from monai.losses import TverskyLoss as MonaiTversky

    logits, target = batch
    known = torch.ones(3, C, dtype=torch.bool)
    known[2, 1] = False
    for batch_dice in (True, False):
        dice = DiceLoss(batch=batch_dice)(logits, target, known)
        tversky = TverskyLoss(alpha=0.5, beta=0.5, batch=batch_dice)(logits, target, known)
        assert torch.allclose(dice, tversky, atol=1e-6)
        monai_dice = MonaiDice(softmax=True, to_onehot_y=True, batch=batch_dice, smooth_nr=2.0, smooth_dr=2.0)
        assert torch.allclose(
            DiceLoss(batch=batch_dice)(logits, target), monai_dice(logits, target[:, None]), atol=1e-5
        )
    monai_tversky = MonaiTversky(softmax=True, to_onehot_y=True, alpha=0.3, beta=0.7, batch=True)
    ours = TverskyLoss(alpha=0.3, beta=0.7, smooth=1e-5)(logits, target)
    assert torch.allclose(ours, monai_tversky(logits, target[:, None]), atol=1e-5)


def test_tversky_beta_penalises_false_negatives_more():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1
    misses = torch.full((1, 2, 8, 8), 0.0)
    misses[0, 0] = 5.0
    misses[0, 1, 2:6, 2:4] = 10.0  # half the object found: false negatives
    extra = torch.full((1, 2, 8, 8), 0.0)
    extra[0, 0] = 5.0
    extra[0, 1, 2:6, 2:6] = 10.0
    extra[0, 1, 0:2, 0:8] = 10.0  # whole object plus 16 false positives
    loss = TverskyLoss(alpha=0.3, beta=0.7, include_background=False)
    assert loss(misses, target) > loss(extra, target)


def test_bce_equals_torch_when_all_known_and_masks_unknown(batch):
    logits, target = batch
    onehot = F.one_hot(target, C).movedim(-1, 1).float()
    expected = F.binary_cross_entropy_with_logits(logits, onehot)
    assert torch.allclose(BCEWithLogitsLoss()(logits, target), expected, atol=1e-6)
    known = torch.ones(3, C, dtype=torch.bool)
    known[0, 4] = False
    changed = logits.clone()
    changed[0, 4] += 7.0  # unannotated channel: must not matter
    bce = BCEWithLogitsLoss()
    assert torch.allclose(bce(logits, target, known), bce(changed, target, known), atol=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradients_finite_under_bf16_autocast(name):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, C, 3, padding=1)
    image = torch.randn(2, 1, 16, 16)
    target = torch.randint(0, C, (2, 16, 16))
    target[0, :2] = IGNORE_INDEX
    known = torch.ones(2, C, dtype=torch.bool)
    known[1, 2:] = False
    loss_fn = build_loss(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(image) * 30  # large logits: saturated softmax must stay finite
        assert logits.dtype == torch.bfloat16
        loss = loss_fn(logits, target, known)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    assert any(p.grad.abs().sum() > 0 for p in conv.parameters())


def test_loss_decreases_when_prediction_matches(batch):
    _, target = batch
    good = F.one_hot(target, C).movedim(-1, 1).float() * 8
    bad = F.one_hot((target + 1) % C, C).movedim(-1, 1).float() * 8
    for loss in _all_losses():
        assert loss(good, target) < loss(bad, target), loss


def test_class_weights_and_ce_dice():
    logits = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 3, (2, 5, 5), generator=torch.Generator().manual_seed(2))
    weights = [1.0, 0.0, 0.0]
    dice_bg_only = DiceLoss(class_weights=weights)(logits, target)
    probs = logits.softmax(1)[:, 0]
    truth = (target == 0).float()
    expected = 1 - (2 * (probs * truth).sum() + 2) / (probs.sum() + truth.sum() + 2)
    assert torch.allclose(dice_bg_only, expected, atol=1e-6)
    combo = CEDiceLoss(lambda_ce=0.5, lambda_dice=2.0)(logits, target)
    assert torch.allclose(combo, 0.5 * F.cross_entropy(logits, target) + 2.0 * DiceLoss()(logits, target), atol=1e-6)


def test_build_loss_and_bad_inputs(batch):
    logits, target = batch
    assert isinstance(build_loss("Focal+Dice", alpha=0.5), FocalDiceLoss)
    assert build_loss("tversky", alpha=0.1).alpha == 0.1
    with pytest.raises(InputError):
        build_loss("hinge")
    with pytest.raises(InputError):
        build_loss("dice", nonsense=3)
    with pytest.raises(InputError):
        CrossEntropyLoss()(logits, target[:, :5])
    with pytest.raises(InputError):
        CrossEntropyLoss()(logits, torch.full_like(target, 7))
    with pytest.raises(InputError):
        CrossEntropyLoss()(logits, target, torch.ones(3, C - 1, dtype=torch.bool))
    with pytest.raises(InputError):
        CrossEntropyLoss(class_weights=[1.0, 2.0])(logits, target)
