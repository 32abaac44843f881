"""The slice-level lesion-presence gate: training (SIMULATED lesions), model files, inference, CLI."""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_spineseg.errors import InputError, ModelFileError
from napari_spineseg.gate import GATE_PREFIX, GateRecord, GateRunner, LesionGate
from napari_spineseg.inference import Predictor, SegmentationSettings
from napari_spineseg.modelfile import LoadedModel, ModelMetadata, load_model, read_metadata, save_model
from napari_spineseg.models import build_model
from napari_spineseg.phantom import PhantomConfig, make_phantom
from napari_spineseg.schema import default_classes
from napari_spineseg.training.gate import GateConfig, gate_config_for_model, gate_metrics, train_gate
from napari_spineseg.training.recipes import get_recipe

TINY_GATE = {"width": 1 / 16, "dropout": 0.0, "pool": "avg"}


def tiny_gate(threshold: float = 0.5, bias: float | None = None, context: int = 1) -> LesionGate:
    record = GateRecord("lesion-classifier", dict(TINY_GATE), context, threshold, [4], metrics={"auc": 0.9})
    torch.manual_seed(1)
    network = record.build()
    if bias is not None:  # a gate with a fixed answer: p = sigmoid(bias) for every slice
        with torch.no_grad():
            network.fc.weight.zero_()
            network.fc.bias.fill_(bias)
    return LesionGate(network.eval(), record)


def tiny_segmenter(classes: int = 5, lesion_bias: float = 0.0):
    torch.manual_seed(0)
    network = build_model("unet", in_channels=3, num_classes=classes, base=4, depth=2)
    if lesion_bias and classes > 4:
        with torch.no_grad():
            network.get_submodule(network.output_layer_name).bias[4] = lesion_bias
    metadata = ModelMetadata(
        "tiny", "unet", network.arch_kwargs, classes=default_classes()[:classes], context_slices=1, postprocess={}
    )
    return network.eval(), metadata


def _rewrite_record(path: Path, edit, out: Path) -> Path:
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    record = json.loads(header["__metadata__"]["spineseg"])
    edit(record, header)
    header["__metadata__"]["spineseg"] = json.dumps(record)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    out.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])
    return out


# ------------------------------------------------------------------------------------------------
# Model files
# ------------------------------------------------------------------------------------------------
def test_model_file_round_trip_with_gate(tmp_path: Path) -> None:
    network, metadata = tiny_segmenter()
    gate = tiny_gate(threshold=0.3)
    path = save_model(network, metadata, tmp_path / "gated.safetensors", gate=gate)
    loaded = load_model(path)
    assert loaded.gate is not None and loaded.gate.record.threshold == 0.3
    assert loaded.gate.record.simulated and "SIMULATED" in loaded.gate.record.note
    assert loaded.gate.record.metrics == {"auc": 0.9} and loaded.gate.record.lesion_values == [4]
    for key, value in gate.network.state_dict().items():
        torch.testing.assert_close(loaded.gate.network.state_dict()[key], value, rtol=0, atol=0)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(loaded.network.state_dict()[key], value, rtol=0, atol=0)
    assert read_metadata(path).name == "tiny"  # the segmenter's metadata is untouched

    plain = load_model(save_model(network, metadata, tmp_path / "plain.safetensors"))
    assert plain.gate is None
    header = json.loads(plain.path.read_bytes()[8 : 8 + struct.unpack("<Q", plain.path.read_bytes()[:8])[0]])
    assert "gate" not in json.loads(header["__metadata__"]["spineseg"])
    assert not any(k.startswith(GATE_PREFIX) for k in header)


def test_gate_must_fit_the_segmenter(tmp_path: Path) -> None:
    network, metadata = tiny_segmenter(classes=4)  # no lesion class
    with pytest.raises(InputError, match="class value"):
        save_model(network, metadata, tmp_path / "x.safetensors", gate=tiny_gate())
    network, metadata = tiny_segmenter()
    with pytest.raises(InputError, match="segmenter"):
        save_model(network, metadata, tmp_path / "x.safetensors", gate=tiny_gate(context=0))
    with pytest.raises(InputError, match="no lesion class"):
        gate_config_for_model(GateConfig(), tiny_segmenter(classes=4)[1])
    config = gate_config_for_model(GateConfig(context_slices=0), metadata)
    assert config.context_slices == 1 and config.lesion_values == [4]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda r, h: r["gate"].update(threshold=0.05), "settings do not match"),
        (lambda r, h: r["gate"].update(threshold=7.0), "threshold"),
        (lambda r, h: r["gate"].update(threshold="0.1"), "threshold"),
        (lambda r, h: r["gate"].update(lesion_values=[2]), "settings do not match"),
        (lambda r, h: r["gate"].update(lesion_values=[9]), "does not have"),
        (lambda r, h: r["gate"].update(context_slices=0), "segmenter"),
        (lambda r, h: r["gate"]["architecture"].update(name="unet"), "not a slice classifier"),
        (lambda r, h: r["gate"]["architecture"]["kwargs"].update(width=0.5), "do not match its record"),
        (lambda r, h: r["gate"]["architecture"]["kwargs"].update(pool="max"), "settings do not match"),
        (lambda r, h: r["gate"]["architecture"]["kwargs"].update(pool="median"), "unbuildable"),
        (lambda r, h: r["gate"].pop("digest"), "settings do not match"),
        (lambda r, h: r["gate"].update(version=99), "version"),
        (lambda r, h: r.update(gate=[1, 2]), "not a mapping"),
        (lambda r, h: r.pop("gate"), "unexpected"),  # gate tensors without a record
    ],
)
def test_tampered_gate_metadata_is_rejected(tmp_path: Path, edit, match: str) -> None:
    network, metadata = tiny_segmenter()
    path = save_model(network, metadata, tmp_path / "gated.safetensors", gate=tiny_gate())
    with pytest.raises(ModelFileError, match=match):
        load_model(_rewrite_record(path, edit, tmp_path / "edited.safetensors"))


def test_tampered_gate_weights_fail_the_checksum(tmp_path: Path) -> None:
    network, metadata = tiny_segmenter()
    path = save_model(network, metadata, tmp_path / "gated.safetensors", gate=tiny_gate())
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    begin, _ = header[GATE_PREFIX + "fc.weight"]["data_offsets"]
    broken = bytearray(data)
    broken[8 + length + begin] ^= 0xFF
    (tmp_path / "broken.safetensors").write_bytes(bytes(broken))
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(tmp_path / "broken.safetensors")


# ------------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom():
    return make_phantom(PhantomConfig(size=(48, 48, 10), spacing=(5.6, 5.6, 8.0), lesions=1, seed=3))


def _predict(model: LoadedModel, volume, **settings) -> np.ndarray:
    predictor = Predictor(SegmentationSettings(device="cpu", precision="fp32", **settings))
    predictor.load(model)
    return predictor.predict(volume).labels.array


def test_gate_zeroes_lesion_where_it_says_absent(phantom) -> None:
    network, metadata = tiny_segmenter(lesion_bias=8.0)  # the segmenter calls everything lesion
    without = _predict(LoadedModel(network, metadata), phantom.image)
    assert (without == 4).mean() > 0.9
    absent = _predict(LoadedModel(network, metadata, gate=tiny_gate(bias=-20.0)), phantom.image)
    assert not (absent == 4).any()
    # ... and the other classes decide there, as without the lesion class
    plain_network, plain_metadata = tiny_segmenter(lesion_bias=-50.0)
    reference = _predict(LoadedModel(plain_network, plain_metadata), phantom.image)
    np.testing.assert_array_equal(absent, reference)
    present = _predict(LoadedModel(network, metadata, gate=tiny_gate(bias=20.0)), phantom.image)
    np.testing.assert_array_equal(present, without)
    gated_out = LoadedModel(network, metadata, gate=tiny_gate(bias=-20.0))
    switched_off = _predict(gated_out, phantom.image, lesion_gate=False)
    np.testing.assert_array_equal(switched_off, without)


def test_models_without_gate_or_lesion_class_are_unaffected(tmp_path: Path, phantom) -> None:
    network, metadata = tiny_segmenter()
    path = save_model(network, metadata, tmp_path / "plain.safetensors")
    predictor = Predictor(SegmentationSettings(device="cpu", precision="fp32"))
    predictor.load(path)
    assert predictor.lesion_gate is None
    first = predictor.predict(phantom.image).labels.array
    # A gate that keeps every slice changes nothing, bit for bit (probabilities untouched).
    keeps_all = _predict(LoadedModel(network, metadata, gate=tiny_gate(bias=20.0)), phantom.image)
    np.testing.assert_array_equal(first, keeps_all)
    # A 4-class model (no lesion class) ignores a gate handed to it in memory.
    network4, metadata4 = tiny_segmenter(classes=4)
    predictor = Predictor(SegmentationSettings(device="cpu", precision="fp32"))
    predictor.load(LoadedModel(network4, metadata4, gate=tiny_gate(bias=-20.0)))
    assert predictor.lesion_gate is None


def test_gate_runner_renormalises_and_counts() -> None:
    gate = tiny_gate(threshold=0.5, bias=-20.0)
    runner = GateRunner(gate, [4], "cpu", "fp32")
    rng = np.random.default_rng(0)
    p = rng.random((3, 5, 6, 7)).astype(np.float32)
    p /= p.sum(axis=1, keepdims=True)
    p[0, :, 0, 0] = [0, 0, 0, 0, 1]  # all lesion: becomes background
    out = runner.apply(torch.zeros(3, 3, 6, 7), p.copy())
    assert np.all(out[:, 4] == 0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    assert out[0, 0, 0, 0] == 1.0
    assert (runner.slices, runner.skipped) == (3, 3)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _tiny_config(**overrides) -> GateConfig:
    settings = {
        "architecture_kwargs": {"width": 1 / 16, "dropout": 0.0, "pool": "avg"},
        "planes": ["sagittal"],
        "steps": 150,
        "batch_size": 16,
        "crop_size": 64,
        "lr": 1e-3,
        "warmup_steps": 10,
        "val_every": 150,
        "augment": None,
        "lesion_copies": 2,
        "val_lesion_copies": 1,
        "diameter_mm": (14.0, 18.0),
        "gain": (2.2, 2.6),
        "mixed_precision": "off",
        "num_threads": 1,
    }
    settings.update(overrides)
    return GateConfig(**settings)


@pytest.fixture(scope="module")
def small_real_cases(data_dir: Path):
    from napari_spineseg.training.data import load_lumbar_dataset

    cases = load_lumbar_dataset(data_dir / "lumbar-mri", ("VB3",), cases=["VB3-01", "VB3-02", "VB3-04"])
    return cases[:2], cases[2:]


def test_gate_trains_and_separates_simulated_lesion_slices(small_real_cases, tmp_path: Path) -> None:
    train_cases, val_cases = small_real_cases
    network, metadata = tiny_segmenter()
    base = LoadedModel(network, metadata)
    config = _tiny_config(output=tmp_path / "gated.safetensors", log_csv=tmp_path / "gate.csv", model_name="gated")
    events = list(train_gate(config, train_cases, val_cases, base=base))
    kinds = [e.kind for e in events]
    assert kinds[0] == "prepare" and kinds[-1] == "done" and kinds.count("step") == 150
    result = events[-1].result
    metrics = result.gate.record.metrics
    assert metrics["simulated_lesions"] is True and metrics["positive_slices"] > 5
    assert metrics["auc"] > 0.8, metrics  # simulated-lesion slices rank above clean ones
    assert metrics["sensitivity"] >= 0.98 and metrics["skipped_lesion_free_fraction"] > 0.2
    record = result.gate.record
    assert record.training["simulated_lesions"] is True and record.training["train_cases"] == ["VB3-01", "VB3-02"]
    assert record.training["val_patients"] == ["VB3-04"]
    loaded = load_model(result.model_path)
    assert loaded.metadata.name == "gated" and loaded.gate.record.threshold == pytest.approx(record.threshold)
    assert (tmp_path / "gate.csv").read_text().count("\n") == 2  # header + one validation


def test_cancel_stops_within_a_step(small_real_cases) -> None:
    train_cases, val_cases = small_real_cases
    cancel = threading.Event()
    events = train_gate(_tiny_config(steps=1000, val_every=1000), train_cases[:1], val_cases, cancel=cancel)
    steps = 0
    for event in events:
        if event.kind == "step":
            steps += 1
            if event.step == 3:
                cancel.set()
        if event.kind == "done":
            assert event.result.cancelled and event.result.steps == 3
    assert steps == 3


def test_metrics_threshold_keeps_target_sensitivity() -> None:
    scores = {
        "positive": np.linspace(0.5, 1.0, 100),
        "negative": np.linspace(0.0, 0.6, 50),
        "negative_body": np.arange(50) % 2 == 0,
        "lesion_scores": np.linspace(0.5, 1.0, 100),
        "lesion_pixels": np.full(100, 30),
    }
    m = gate_metrics(scores, target_sensitivity=0.98)
    assert m["sensitivity"] >= 0.98 and m["threshold"] == pytest.approx(scores["positive"][2])
    assert 0.8 < m["specificity"] < 0.9 and m["auc"] > 0.9
    assert gate_metrics(scores, threshold=0.0)["skipped_lesion_free_fraction"] == 0.0


def test_tversky_recipes_come_with_the_gate() -> None:
    for name in ("resunet-tversky", "vgg19-unet-tversky"):
        recipe = get_recipe(name)
        assert recipe.gate is not None and recipe.gate.context_slices == recipe.config.context_slices
        assert "TODO" not in recipe.notes and "SIMULATED" in recipe.notes
        assert recipe.to_dict()["gate"]["architecture_kwargs"]["width"] <= 0.25
    assert get_recipe("default").gate is None


def test_cli_train_gate_refuses_a_model_without_lesion_class(tmp_path: Path, data_dir: Path, capsys) -> None:
    from napari_spineseg.cli import main

    code = main(
        [
            "train-gate",
            "--model",
            "spineseg-default",
            "--data",
            str(data_dir / "lumbar-mri"),
            "-o",
            str(tmp_path / "x.safetensors"),
        ]
    )
    assert code == 1 and "no lesion class" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
