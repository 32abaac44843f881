"""Training input pipeline defaults (#21 item 3): data loader workers sized to the machine."""

from __future__ import annotations

import pytest

from napari_spineseg.errors import InputError
from napari_spineseg.runtime import auto_workers, resolve_workers


@pytest.mark.parametrize(
    ("cores", "processes", "expected"),
    [(1, 1, 0), (2, 1, 0), (4, 1, 0), (5, 1, 3), (8, 1, 6), (16, 1, 12), (64, 1, 12), (16, 2, 6), (16, 8, 0)],
)
def test_auto_workers_follow_the_cores(cores: int, processes: int, expected: int) -> None:
    assert auto_workers(cores, processes) == expected


def test_resolve_workers(monkeypatch) -> None:
    import napari_spineseg.runtime as runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_workers("auto") == 0 and resolve_workers(None) == 0 and resolve_workers("AUTO") == 0
    monkeypatch.setattr(runtime, "usable_cores", lambda: 16)
    assert resolve_workers("auto") == 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: four processes share the 16 cores
    assert resolve_workers("auto") == 0
    assert resolve_workers(3) == 3 and resolve_workers("2") == 2
    for bad in ("many", -1, "-2", 1.5):
        with pytest.raises(InputError, match="workers"):
            resolve_workers(bad)


def test_train_command_defaults_to_auto_and_records_the_count(monkeypatch) -> None:
    import argparse

    import napari_spineseg.runtime as runtime
    from napari_spineseg.training.commands import add_train_arguments, prepare_run

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--phantoms", "1", "--steps", "1", "-o", "/tmp/never-written.safetensors"])
    assert args.workers == "auto"
    monkeypatch.setattr(runtime, "usable_cores", lambda: 10)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    recipe, *_ = prepare_run(args)
    assert recipe.config.num_workers == 8  # the stored training config says what was used
    with pytest.raises(InputError, match="workers"):
        prepare_run(parser.parse_args(["--phantoms", "1", "--workers", "x", "-o", "/tmp/n.safetensors"]))


def test_train_config_accepts_auto() -> None:
    from napari_spineseg.training.loop import TrainConfig

    assert TrainConfig(num_workers="auto").num_workers == "auto"
    with pytest.raises(InputError, match="workers"):
        TrainConfig(num_workers="lots")
