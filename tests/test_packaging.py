"""Packaging: the npe2 manifest at the repository root reaches wheels and editable installs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_manifest_models_and_entry_points(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("napari_spineseg-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        manifest = archive.read("napari_spineseg/napari.yaml").decode()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert manifest == (ROOT / "napari.yaml").read_text()
    assert "napari-spineseg = napari_spineseg:napari.yaml" in entry_points
    assert "spineseg = napari_spineseg.cli:main" in entry_points
    assert "napari_spineseg/py.typed" in names
    bundled = sorted((ROOT / "src" / "napari_spineseg" / "bundled_models").glob("*.safetensors"))
    for model in bundled:
        assert f"napari_spineseg/bundled_models/{model.name}" in names
    assert not any(name.startswith("tests/") for name in names)


def test_installed_package_finds_the_manifest() -> None:
    from importlib.resources import files

    from npe2 import PluginManifest

    text = files("napari_spineseg").joinpath("napari.yaml").read_text()
    assert text == (ROOT / "napari.yaml").read_text()
    manifest = PluginManifest.from_distribution("napari-spineseg")
    assert {c.id for c in manifest.contributions.commands} >= {
        "napari-spineseg.get_reader",
        "napari-spineseg.sample_t1",
    }


def test_core_imports_without_qt_or_napari() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import napari_spineseg.io, napari_spineseg.inference, napari_spineseg.metrics, napari_spineseg.training.loop\n"
        "import napari_spineseg.interpolation, napari_spineseg.training.finetune.replay_run\n"
        "import numpy as np\n"
        "from napari_spineseg.levels import identify_levels\n"
        "from napari_spineseg.volume import Volume\n"
        "assert identify_levels(Volume.from_array(np.zeros((8, 8, 8), np.uint8))).status == 'uncertain'\n"
        "import napari_spineseg.cli, napari_spineseg.phantom, napari_spineseg.modelfile, napari_spineseg.preflight\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
