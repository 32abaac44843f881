"""Widen a trained U-Net model file function-preservingly (Net2WiderNet) as the start of a wider recipe.

    .venv/bin/python scripts/widen_model.py spineseg-default /work/train/widened.safetensors \\
        --factor 2 --context-slices 2 --noise 0.01
    spineseg train --recipe accurate --init /work/train/widened.safetensors ...

The widened file computes what the narrow one does (before ``--noise``): training continues from the
narrow model's accuracy with ``factor`` times the filters and more context slices.
"""

from __future__ import annotations

import argparse
import dataclasses

from napari_spineseg.modelfile import load_model, save_model
from napari_spineseg.models.widen import widen_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model name or .safetensors file (a classic U-Net)")
    parser.add_argument("output", help="widened .safetensors file")
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--context-slices", type=int, default=None, help="k: 2k+1 input slices (default: kept)")
    parser.add_argument("--noise", type=float, default=0.01, help="symmetry-breaking noise (fraction of weight std)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_model(args.model)
    context = model.metadata.context_slices if args.context_slices is None else args.context_slices
    wide = widen_unet(model.network, args.factor, 2 * context + 1, noise=args.noise, seed=args.seed)
    kwargs = {k: v for k, v in wide.arch_kwargs.items() if k not in ("in_channels", "num_classes")}
    training = {
        **model.metadata.training,
        "widened_from": {
            "model": model.metadata.name,
            "version": model.metadata.version,
            "factor": args.factor,
            "noise": args.noise,
        },
    }
    metadata = dataclasses.replace(
        model.metadata, architecture_kwargs=kwargs, context_slices=context, training=training
    )
    path = save_model(wide, metadata, args.output)
    print(f"wrote {path}: base {kwargs['base']}, {2 * context + 1} input slices")


if __name__ == "__main__":
    main()
