"""Pack the lumbar training data into one compact ``.npz`` for machines without SimpleITK or the data.

    .venv/bin/python scripts/pack_training_data.py [--data ../shared/data/lumbar-mri] -o cases.npz [--margin-mm 40]

Then ``spineseg train --data cases.npz ...`` trains exactly as from the folder (crops of the
labelled region plus the margin; geometry kept).  See :mod:`napari_spineseg.training.packed`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_spineseg.training.data import load_lumbar_dataset
from napari_spineseg.training.packed import pack_cases

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lumbar-mri"))
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--margin-mm", type=float, default=40.0)
    args = parser.parse_args()
    path = pack_cases(load_lumbar_dataset(args.data), args.output, args.margin_mm)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
