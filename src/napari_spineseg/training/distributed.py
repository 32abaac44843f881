"""Data-parallel training under ``torchrun`` (DDP: NCCL on GPUs, gloo on CPUs).

    torchrun --standalone --nproc_per_node 2 -m napari_spineseg.training.distributed \\
        --recipe default --data ../shared/data/lumbar-mri --val-patients VB3-01,IVD-11 -o model.safetensors \\
        --log-csv log.csv

takes the arguments of ``spineseg train``.  Every rank builds the same dataset and trains on its
own shard of each epoch's sample order (``DistributedSampler`` for uniform sampling, an equal
split of the class-balanced draw otherwise); gradients are averaged by
:class:`~torch.nn.parallel.DistributedDataParallel`.  Only rank 0 validates, logs and writes the
model, the resume checkpoint and the CSV; the early-stopping decision is broadcast from it.
``--batch-size`` is per process.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from datetime import timedelta

from ..errors import SpinesegError

logger = logging.getLogger(__name__)


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from the ``torchrun`` environment; ``(rank, world)``.

    ``backend`` defaults to NCCL when CUDA is available, else gloo.  Without ``torchrun``
    variables (``WORLD_SIZE`` unset) nothing is initialised and ``(0, 1)`` is returned.
    """
    import torch
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """``torchrun ... -m napari_spineseg.training.distributed <spineseg train arguments>``."""
    from .commands import add_train_arguments, prepare_run
    from .loop import train

    parser = argparse.ArgumentParser(prog="spineseg-ddp", description="Distributed (DDP) spineseg training.")
    parser.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="default: nccl on GPU, else gloo")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    rank, world = init_distributed(args.backend)
    try:
        recipe, train_cases, val_cases, provenance = prepare_run(args)
        provenance["distributed"] = {"world_size": world, "backend": args.backend or "auto"}
        result = None
        for event in train(recipe.config, train_cases, val_cases, provenance=provenance):
            if rank != 0:
                continue
            if event.kind == "validation":
                print(f"step {event.step}/{event.total_steps}: loss {event.loss:.4f}; val {event.val_dice}", flush=True)
            elif event.kind == "checkpoint":
                print(event.message, flush=True)
            elif event.kind == "done":
                result = event.result
                print(event.message, flush=True)
        if rank == 0 and (result is None or result.best_model_path is None):
            print("spineseg-ddp: error: no model was saved", file=sys.stderr)
            return 1
        return 0
    except SpinesegError as error:
        print(f"spineseg-ddp: error (rank {rank}): {error}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
