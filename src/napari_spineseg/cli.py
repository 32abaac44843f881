"""The ``spineseg`` command line: ``info``, ``demo`` and the segmentation/training commands.

Every user error prints one line ``spineseg: error: <what and why>`` and exits with status 1;
Ctrl-C exits with 130 and leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import SpinesegError


def volume_info(volume) -> dict[str, Any]:
    """The ``spineseg info --json`` record of one volume (keys are a public contract)."""
    import numpy as np

    from .orientation import orientation_code, plane_axes, tilt_degrees
    from .preflight import preflight

    geometry = volume.geometry
    array = volume.array
    return {
        "name": volume.name,
        "path": str(volume.path) if volume.path else None,
        "size": list(geometry.size),
        "spacing": [float(s) for s in geometry.spacing],
        "origin": [float(o) for o in geometry.origin],
        "direction": [float(d) + 0.0 for d in geometry.direction],
        "orientation": orientation_code(geometry.direction),
        "planes": plane_axes(geometry, warn_degrees=90.0),
        "tilt_degrees": round(tilt_degrees(geometry.direction), 3),
        "dtype": str(array.dtype),
        "intensity_range": [float(np.min(array)), float(np.max(array))] if array.size else [0.0, 0.0],
        "warnings": [str(w) for w in preflight(volume)],
    }


def _format_info(info: dict[str, Any]) -> str:
    def numbers(values, digits=4):
        return "(" + ", ".join(f"{v:.{digits}g}" for v in values) + ")"

    direction = info["direction"]
    rows = [
        f"{info['name']}  [{info['path']}]",
        f"  size (x, y, z)     {tuple(info['size'])}",
        f"  spacing (x, y, z)  {numbers(info['spacing'])} mm",
        f"  origin (LPS)       {numbers(info['origin'], 6)} mm",
        "  direction          " + " / ".join(numbers(direction[i : i + 3], 3) for i in (0, 3, 6)),
        f"  orientation        {info['orientation']}",
        "  planes             "
        + ", ".join(f"{plane} = index axis {axis} ({'xyz'[axis]})" for plane, axis in info["planes"].items()),
        f"  intensity          {info['intensity_range'][0]:g} .. {info['intensity_range'][1]:g} ({info['dtype']})",
    ]
    rows += [f"  warning: {w}" for w in info["warnings"]]
    return "\n".join(rows)


def cmd_info(args: argparse.Namespace) -> int:
    from .io import read_volumes

    infos = []
    for path in args.paths:
        infos += [volume_info(v) for v in read_volumes(path)]
    if args.json:
        print(json.dumps(infos[0] if len(infos) == 1 else infos, indent=2))
    else:
        print("\n".join(_format_info(info) for info in infos))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.output_dir), device=args.device)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="spineseg", description="Spine MRI segmentation (napari-spineseg).")
    parser.add_argument("--version", action="version", version=f"napari-spineseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="print geometry, orientation and planes of studies")
    info.add_argument("paths", nargs="+", metavar="PATH", help="MHA/MHD, NIfTI, NRRD file or DICOM directory/file")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(handler=cmd_info)

    demo = commands.add_parser("demo", help="run the main job on the bundled sample study and model")
    demo.add_argument("--output-dir", default="demo-output", help="where the demo writes its files")
    demo.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spineseg`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except SpinesegError as error:
        print(f"spineseg: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("spineseg: interrupted; no partial output was left", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
