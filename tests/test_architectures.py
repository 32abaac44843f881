"""Tests of the 2-D model registry (tiny widths, small inputs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_spineseg.errors import InputError
from napari_spineseg.models import (
    ARCHITECTURES,
    adapt_first_conv,
    architecture_names,
    build_model,
    extend_output_classes,
    gate_slices,
    init_from_torchvision,
    load_mapped_weights,
    map_resnet50_state_dict,
    map_vgg19_state_dict,
)
from napari_spineseg.models.pretrained import VGG19_BN_CONV_INDICES, VGG19_CONV_INDICES

torch.set_num_threads(2)

SMALL = {
    "unet": {"base": 4, "depth": 3},
    "unet-leaky": {"base": 4, "depth": 3},
    "attention-unet": {"base": 4, "depth": 3},
    "resunet": {"base": 4, "depth": 3},
    "vgg19-unet": {"width": 1 / 16},
    "fcn-resnet50": {"width": 1 / 16},
    "penn": {"hidden": (16, 12, 8)},
    "lesion-classifier": {"width": 1 / 16},
}
SEG = architecture_names("segmentation")


def test_registry_lists_all_names() -> None:
    assert set(SEG) == {
        "unet",
        "unet-leaky",
        "attention-unet",
        "resunet",
        "vgg19-unet",
        "fcn-resnet50",
        "penn",
    }
    assert architecture_names("classifier") == ["lesion-classifier"]
    assert set(architecture_names()) == set(ARCHITECTURES) == set(SMALL)
    assert ARCHITECTURES["unet"].defaults["base"] == 16 and ARCHITECTURES["unet"].defaults["depth"] == 4


@pytest.mark.parametrize("name", SEG)
@pytest.mark.parametrize(("in_ch", "n_cls", "hw"), [(1, 2, (33, 47)), (3, 5, (32, 21)), (1, 3, (7, 5))])
def test_segmentation_shapes(name: str, in_ch: int, n_cls: int, hw: tuple[int, int]) -> None:
    model = build_model(name, in_channels=in_ch, num_classes=n_cls, **SMALL[name]).eval()
    with torch.no_grad():
        y = model(torch.randn(2, in_ch, *hw))
    assert y.shape == (2, n_cls, *hw)
    assert torch.isfinite(y).all()
    assert model.arch_name == name
    assert model.arch_kwargs["in_channels"] == in_ch and model.arch_kwargs["num_classes"] == n_cls
    # the recorded kwargs rebuild an identical architecture
    clone = build_model(name, **model.arch_kwargs)
    assert clone.load_state_dict(model.state_dict()) is not None
    clone.eval()
    x = torch.randn(1, in_ch, *hw)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))


@pytest.mark.parametrize("name", SEG)
def test_bf16_autocast_channels_last(name: str) -> None:
    model = build_model(name, in_channels=3, num_classes=3, **SMALL[name]).eval()
    x = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x.to(memory_format=torch.channels_last))
    assert y.shape == (2, 3, 33, 47)
    assert torch.isfinite(y.float()).all()
    # bf16 has ~3 significant digits; the prediction must still be close to fp32 (same network)
    assert (y.float() - ref).abs().mean() < 0.05 * ref.abs().mean() + 0.02


@pytest.mark.parametrize("name", SEG)
def test_eval_is_deterministic_and_train_step_works(name: str) -> None:
    model = build_model(name, in_channels=1, num_classes=3, **SMALL[name])
    x = torch.randn(2, 1, 24, 24)
    target = torch.randint(0, 3, (2, 24, 24))
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", SEG)
def test_extend_output_classes_keeps_old_logits(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=3, **SMALL[name]).eval()
    x = torch.randn(1, 1, 29, 35)
    with torch.no_grad():
        before = model(x)
    extend_output_classes(model, 4)
    assert model.arch_kwargs["num_classes"] == 4
    with torch.no_grad():
        after = model(x)
    assert after.shape == (1, 4, 29, 35)
    torch.testing.assert_close(after[:, :3], before, rtol=1e-5, atol=1e-5)
    # the rebuilt architecture accepts the grown weights
    build_model(name, **model.arch_kwargs).load_state_dict(model.state_dict())
    with pytest.raises(InputError):
        extend_output_classes(model, 2)


def test_extend_output_classes_copies_weights_exactly() -> None:
    model = build_model("unet", num_classes=2, base=4, depth=2)
    old_w = model.head.conv.weight.detach().clone()
    old_b = model.head.conv.bias.detach().clone()
    extend_output_classes(model, 5)
    assert model.head.conv.out_channels == 5
    assert torch.equal(model.head.conv.weight[:2], old_w) and torch.equal(model.head.conv.bias[:2], old_b)


def test_unknown_name_and_bad_kwargs_raise_input_error() -> None:
    with pytest.raises(InputError, match="unet"):  # message lists the known names
        build_model("unet3000")
    with pytest.raises(InputError, match="does not accept"):
        build_model("unet", widht=2)
    with pytest.raises(InputError):
        build_model("unet", base=0)
    with pytest.raises(InputError):
        build_model("unet", in_channels=0)
    with pytest.raises(InputError):
        extend_output_classes(build_model("lesion-classifier", width=1 / 16), 3)


def test_unet_blocks_and_leaky_variant() -> None:
    unet = build_model("unet", base=4, depth=3)
    leaky = build_model("unet-leaky", base=4, depth=3, dropout=0.3)
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in unet.modules())
    dec_acts = [m for up in leaky.ups for m in up.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert dec_acts and all(m.negative_slope == 0.1 for m in dec_acts)
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in leaky.inc.modules())
    assert any(isinstance(m, torch.nn.Dropout2d) and m.p == 0.3 for m in leaky.modules())
    # Glorot: biases of the convs are zero and weight scale matches sqrt(6 / (fan_in + fan_out))
    w = leaky.inc[0].weight
    bound = (6 / (w.shape[1] * 9 + w.shape[0] * 9)) ** 0.5
    assert w.abs().max() <= bound + 1e-6
    # filters double from base
    assert [d[1][0].out_channels for d in unet.downs] == [8, 16, 32]
    att = build_model("attention-unet", base=4, depth=3)
    assert all(up.gate is not None for up in att.ups)


def test_vgg19_unet_has_16_encoder_convs() -> None:
    m = build_model("vgg19-unet", width=1 / 16)
    assert len(m.convs) == 16
    outs = [c.out_channels for c in m.convs]  # stages of 2, 2, 4, 4, 4 convs: 64-128-256-512-512 / 16
    assert outs == [4] * 2 + [8] * 2 + [16] * 4 + [32] * 8
    m2 = build_model("vgg19-unet", width=1 / 16, batch_norm=False)
    assert all(isinstance(b, torch.nn.Identity) for b in m2.bns)


def test_fcn_output_stride() -> None:
    dil = build_model("fcn-resnet50", width=1 / 16)
    plain = build_model("fcn-resnet50", width=1 / 16, dilated=False)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert dil.backbone(x).shape[-1] == 8
        assert plain.backbone(x).shape[-1] == 2
    assert [len(getattr(dil.backbone, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]


def test_penn_patches_and_probabilities() -> None:
    m = build_model("penn", num_classes=3).eval()
    assert m.patch_size == 32 and m.stride == 8
    layers = m.autoencoder_layers()
    assert [(la.in_features, la.out_features) for la in layers] == [(1024, 200), (200, 200), (200, 200)]
    m3 = build_model("penn", in_channels=3, num_classes=2, hidden=(8,))
    assert m3.autoencoder_layers()[0].in_features == 3 * 1024
    with torch.no_grad():
        y = m(torch.randn(2, 1, 40, 50))
    # logits are log-probabilities: they exponentiate to distributions over the classes
    torch.testing.assert_close(y.exp().sum(1), torch.ones(2, 40, 50), rtol=1e-5, atol=1e-5)
    # a constant image gives the same patch everywhere -> same distribution at every pixel
    with torch.no_grad():
        yc = m(torch.full((1, 1, 40, 50), 0.3))
    assert (yc - yc[..., :1, :1]).abs().max() < 1e-5
    dense = build_model("penn", num_classes=2, hidden=(8,), dense=True).eval()
    with torch.no_grad():
        yd = dense(torch.randn(1, 1, 37, 41))
    assert yd.shape == (1, 2, 37, 41)
    torch.testing.assert_close(yd.exp().sum(1), torch.ones(1, 37, 41), rtol=1e-5, atol=1e-5)


def test_lesion_classifier_and_gate_slices() -> None:
    clf = build_model("lesion-classifier", in_channels=3, width=1 / 16)
    assert ARCHITECTURES["lesion-classifier"].kind == "classifier"
    assert clf.arch_kwargs["num_classes"] == 1
    x = torch.randn(4, 3, 45, 37)
    clf.eval()
    with torch.no_grad():
        logits = clf(x)
    assert logits.shape == (4,)
    with torch.no_grad():
        clf.fc.bias.fill_(0.0)
        clf.fc.weight.zero_()
        clf.fc.bias[0] = 10.0  # p ~ 1 for every slice
    clf.train()
    assert gate_slices(clf, x, 0.5).tolist() == [True] * 4
    assert clf.training  # mode restored
    with torch.no_grad():
        clf.fc.bias[0] = -10.0
    gated = gate_slices(clf, x, 0.5)
    assert gated.dtype == torch.bool and gated.tolist() == [False] * 4
    assert gate_slices(clf, x, 0.0).all()
    with pytest.raises(InputError):
        gate_slices(clf, x, 1.5)


def test_tiny_unet_overfits_one_image() -> None:
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    target = (((yy - 15) ** 2 + (xx - 17) ** 2) < 64).long()[None]
    image = target.float()[None] * 1.0 + 0.3 * torch.randn(1, 1, 32, 32)
    model = build_model("unet", num_classes=2, base=4, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = F.cross_entropy(model(image), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    model.eval()
    with torch.no_grad():
        acc = (model(image).argmax(1) == target).float().mean()
    assert acc > 0.95


def test_init_from_torchvision_without_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("torchvision is installed; the no-torchvision path cannot be tested")
    for name in ("vgg19-unet", "fcn-resnet50", "lesion-classifier"):
        model = build_model(name, width=1 / 16)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert init_from_torchvision(model) is False
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _fake_vgg_state(batch_norm: bool, in_rgb: int = 3) -> dict[str, torch.Tensor]:
    """torchvision vgg19(_bn) ``features`` key names with random tensors of the right shape (width 1)."""
    chans = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]
    idx = VGG19_BN_CONV_INDICES if batch_norm else VGG19_CONV_INDICES
    state, prev = {}, in_rgb
    for i, c in zip(idx, chans, strict=True):
        state[f"features.{i}.weight"] = torch.randn(c, prev, 3, 3)
        state[f"features.{i}.bias"] = torch.randn(c)
        if batch_norm:
            state[f"features.{i + 1}.weight"] = torch.rand(c)
            state[f"features.{i + 1}.bias"] = torch.randn(c)
            state[f"features.{i + 1}.running_mean"] = torch.randn(c)
            state[f"features.{i + 1}.running_var"] = torch.rand(c)
            state[f"features.{i + 1}.num_batches_tracked"] = torch.tensor(7)
        prev = c
    state["classifier.0.weight"] = torch.randn(4, 3)  # ignored
    return state


@pytest.mark.parametrize("batch_norm", [True, False])
def test_vgg_key_mapping_fills_our_tensors(batch_norm: bool) -> None:
    model = build_model("vgg19-unet", width=1.0, batch_norm=batch_norm)
    fake = _fake_vgg_state(batch_norm)
    mapped = map_vgg19_state_dict(fake, batch_norm)
    assert len([k for k in mapped if k.startswith("convs.")]) == 32
    loaded, skipped = load_mapped_weights(model, mapped, "convs.0.weight")
    assert not skipped and len(loaded) == len(mapped)
    idx = VGG19_BN_CONV_INDICES if batch_norm else VGG19_CONV_INDICES
    assert torch.equal(model.convs[5].weight, fake[f"features.{idx[5]}.weight"])
    assert torch.equal(model.convs[15].bias, fake[f"features.{idx[15]}.bias"])
    # first conv: RGB averaged to the single input channel
    torch.testing.assert_close(model.convs[0].weight, fake["features.0.weight"].mean(1, keepdim=True))
    if batch_norm:
        assert torch.equal(model.bns[9].running_var, fake[f"features.{idx[9] + 1}.running_var"])


def _fake_resnet50_state() -> dict[str, torch.Tensor]:
    """torchvision resnet50 key names (written out independently of our model) with random tensors."""

    def bn(prefix: str, c: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.weight": torch.rand(c),
            f"{prefix}.bias": torch.randn(c),
            f"{prefix}.running_mean": torch.randn(c),
            f"{prefix}.running_var": torch.rand(c),
            f"{prefix}.num_batches_tracked": torch.tensor(3),
        }

    state = {"conv1.weight": torch.randn(64, 3, 7, 7), **bn("bn1", 64)}
    inp = 64
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True), start=1):
        for b in range(blocks):
            pre = f"layer{layer}.{b}"
            state[f"{pre}.conv1.weight"] = torch.randn(planes, inp, 1, 1)
            state[f"{pre}.conv2.weight"] = torch.randn(planes, planes, 3, 3)
            state[f"{pre}.conv3.weight"] = torch.randn(planes * 4, planes, 1, 1)
            for i, c in ((1, planes), (2, planes), (3, planes * 4)):
                state.update(bn(f"{pre}.bn{i}", c))
            if b == 0:
                state[f"{pre}.downsample.0.weight"] = torch.randn(planes * 4, inp, 1, 1)
                state.update(bn(f"{pre}.downsample.1", planes * 4))
            inp = planes * 4
    state["fc.weight"] = torch.randn(1000, 2048)
    state["fc.bias"] = torch.randn(1000)
    return state


def test_resnet_key_mapping_fills_our_tensors() -> None:
    fake = _fake_resnet50_state()
    mapped = map_resnet50_state_dict(fake)
    assert "backbone.layer4.2.conv3.weight" in mapped and not any("fc" in k for k in mapped)
    fcn = build_model("fcn-resnet50", in_channels=3, width=1.0)
    loaded, skipped = load_mapped_weights(fcn, mapped, "backbone.conv1.weight")
    assert not skipped and len(loaded) == len(mapped) == len(fake) - 2
    backbone_keys = {k for k in fcn.state_dict() if k.startswith("backbone.")}
    assert backbone_keys == set(loaded)  # every backbone tensor was filled
    clf = build_model("lesion-classifier", width=1.0)  # 1 input channel: RGB kernel averaged
    load_mapped_weights(clf, mapped, "backbone.conv1.weight")
    torch.testing.assert_close(clf.backbone.conv1.weight, fake["conv1.weight"].mean(1, keepdim=True))
    assert torch.equal(clf.backbone.layer4[2].bn3.running_var, fake["layer4.2.bn3.running_var"])
    assert torch.equal(fcn.backbone.layer2[1].conv2.weight, fake["layer2.1.conv2.weight"])
    assert torch.equal(fcn.backbone.conv1.weight, fake["conv1.weight"])  # 3 channels: copied as is
    # torchvision FCN's "backbone." prefix is accepted as well
    assert map_resnet50_state_dict({"backbone.layer1.0.conv1.weight": fake["layer1.0.conv1.weight"]}).keys() == {
        "backbone.layer1.0.conv1.weight"
    }


def test_adapt_first_conv() -> None:
    w = torch.randn(8, 3, 7, 7)
    torch.testing.assert_close(adapt_first_conv(w, 1), w.mean(1, keepdim=True))
    w5 = adapt_first_conv(w, 5)
    assert w5.shape == (8, 5, 7, 7)
    # a constant image gives the same response as the averaged RGB kernel on a constant RGB image
    torch.testing.assert_close(w5.sum(1), w.mean(1) * 3)
