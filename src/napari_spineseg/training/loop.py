"""The training loop: a cancellable generator of progress events (Qt-free).

    events = train(config, train_cases, val_cases)
    for event in events:            # TrainEvent(kind="step" | "validation" | "checkpoint" | "done")
        ...                         # stop any time: events.close() (or set the ``cancel`` event)

The final :class:`TrainResult` is the ``result`` of the ``"done"`` event (and the generator's
``StopIteration.value``).  Files are only ever written atomically (temp file + rename): the best
model (``config.output``, a normal model file with full metadata), a resume checkpoint beside it
(``<output stem>.resume.safetensors``: weights + Adam state as safetensors tensors, the loop state
as JSON in the header; no pickle) and the CSV log (one appended, flushed row per validation).
Interrupting at any point leaves the previous files loadable.

Validation runs the real inference path (:class:`napari_spineseg.inference.Predictor`) on whole
fixed validation volumes and scores per-class Dice inside each case's labelled region, only for
classes annotated in that case.  The best model is chosen by the mean of the per-class means.

Fine-tuning hooks: pass ``network=`` (an initial network, e.g. a loaded model), ``replay_cases=``
(mixed into the training set), ``dataset=`` (any dataset yielding the same sample dicts) and
``loss_hook=`` (``hook(network, batch, logits) -> extra loss tensor or None``) and
``param_groups=`` (optimizer parameter groups; a group's ``"lr_scale"`` multiplies the schedule's
learning rate for it, e.g. a slower encoder).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..augment import AugmentConfig
from ..errors import InputError, ModelFileError
from ..modelfile import ModelMetadata, save_model
from ..orientation import Plane
from ..postprocess import default_postprocess
from ..preprocess import PreprocessConfig
from ..provenance import json_safe
from ..runtime import autocast, resolve_device, resolve_workers, seed_everything, training_precision
from ..schema import IGNORE, LabelClass, default_classes
from .common import SCHEDULES, CsvLog, scheduled_lr
from .data import TrainingCase

__all__ = [
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "TrainingRun",
    "build_training_dataset",
    "load_resume_state",
    "resume_path_for",
    "run_training",
    "train",
    "validate",
]

logger = logging.getLogger(__name__)

RESUME_FORMAT = "napari-spineseg-resume"
PRECISIONS = ("auto", "off", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in the model file's metadata)."""

    architecture: str = "unet"
    architecture_kwargs: dict[str, Any] = field(default_factory=lambda: {"base": 16, "depth": 4})
    context_slices: int = 1
    classes: list[LabelClass] = field(default_factory=default_classes)
    loss: str = "ce+dice"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"  # none | cosine | step
    warmup_steps: int = 0
    step_size: int = 1000  # "step" schedule: multiply by step_gamma every step_size steps
    step_gamma: float = 0.5
    min_lr_fraction: float = 0.02  # cosine floor
    epochs: int | None = None  # used when steps is None
    steps: int | None = 1000
    batch_size: int = 8
    val_every: int = 250  # steps between validations (and checkpoints)
    patience: int | None = None  # validations without improvement before stopping early
    min_delta: float = 1e-4
    mixed_precision: str = "auto"  # auto | off | bf16 | fp16
    grad_clip: float | None = 5.0
    # Exponential moving average of the weights (0: off).  When on, validation, the best model and
    # the saved file use the averaged weights (batch-norm statistics averaged alike); the optimizer
    # keeps stepping the raw weights.  0.999 averages over roughly the last thousand steps.
    ema_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    num_workers: int | str = 0  # data loader worker processes; "auto": sized to the machine (runtime.auto_workers)
    num_threads: int | None = None  # torch intra-op threads (None: torch's default); 1 is best on a busy CPU
    planes: list[str] = field(default_factory=lambda: ["axial", "coronal", "sagittal"])
    crop_size: int | None = 192
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    sampling: str = "uniform"  # uniform | balanced
    foreground_only: bool = False
    keep_empty_fraction: float = 0.1
    min_foreground_fraction: float = 0.0
    foreground_crop_prob: float = 0.7
    patches: dict[str, Any] | None = None  # PatchDataset options (penn); None = slice training
    postprocess: dict[str, Any] = field(default_factory=lambda: default_postprocess().to_dict())
    val_postprocess: bool = False  # validate with the model's post-processing
    val_batch_size: int = 16
    output: Path | None = None
    log_csv: Path | None = None
    resume: Path | None = None
    init_from: Path | str | None = None  # start from this model's weights (fine-tuning on a dataset)
    model_name: str = "spineseg-model"
    description: str = ""
    recipe: str = "custom"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}: choose {', '.join(SCHEDULES)}")
        if self.mixed_precision not in PRECISIONS:
            raise InputError(f"unknown mixed precision {self.mixed_precision!r}: choose {', '.join(PRECISIONS)}")
        if self.sampling not in ("uniform", "balanced"):
            raise InputError(f"unknown sampling {self.sampling!r}: choose uniform or balanced")
        if self.steps is None and self.epochs is None:
            raise InputError("give steps or epochs")
        if self.steps is not None and int(self.steps) < 1:
            raise InputError(f"steps must be at least 1, got {self.steps}")
        if self.epochs is not None and int(self.epochs) < 1:
            raise InputError(f"epochs must be at least 1, got {self.epochs}")
        resolve_workers(self.num_workers)  # a clear error now, not when the loader starts
        if int(self.batch_size) < 1 or int(self.val_every) < 1:
            raise InputError("batch_size and val_every must be at least 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"learning rate must be positive, got {self.lr}")
        if not 0.0 <= float(self.ema_decay) < 1.0:
            raise InputError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= int(self.context_slices) <= 8:
            raise InputError(f"context_slices must be in 0..8, got {self.context_slices}")
        self.planes = [Plane(p).value for p in self.planes]
        if not self.planes:
            raise InputError("choose at least one plane")
        values = [c.value for c in self.classes]
        if values != list(range(len(values))) or len(values) < 2:
            raise InputError(f"training classes must be 0..N-1 without gaps, got {values}")
        for name in ("output", "log_csv", "resume"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value).expanduser())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return 2 * int(self.context_slices) + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (classes by value/name, configs as dicts, paths as strings)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "classes":
                value = [c.to_dict() for c in value]
            elif isinstance(value, (PreprocessConfig, AugmentConfig)):
                value = value.to_dict()
            out[name] = json_safe(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"TrainConfig: unknown key(s) {', '.join(unknown)}")
        if "classes" in data:
            data["classes"] = [LabelClass.from_dict(c) for c in data["classes"]]
        if isinstance(data.get("preprocess"), dict):
            data["preprocess"] = PreprocessConfig.from_dict(data["preprocess"])
        if isinstance(data.get("augment"), dict):
            data["augment"] = AugmentConfig.from_dict(data["augment"])
        return cls(**data)


@dataclass
class TrainEvent:
    """Progress of a training run."""

    kind: str  # "step" | "validation" | "checkpoint" | "done"
    step: int
    total_steps: int
    epoch: int
    loss: float | None = None  # mean training loss since the previous event of this kind
    lr: float | None = None
    val_dice: dict[str, float] | None = None  # class name -> Dice (validation events)
    val_mean: float | None = None
    message: str = ""
    seconds: float = 0.0
    result: TrainResult | None = None


@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    best_model_path: Path | None
    best_score: float | None
    best_step: int | None
    history: list[dict[str, Any]]
    steps: int
    total_steps: int
    cancelled: bool = False
    stopped_early: bool = False
    resume_path: Path | None = None
    network: Any = None  # the network with the best weights (CPU), for in-process use


def resume_path_for(output: Path) -> Path:
    """``<dir>/<stem>.resume.safetensors`` beside the model file ``output``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.resume.safetensors")


# ------------------------------------------------------------------------------------------------
# Devices, precision, seeds
# ------------------------------------------------------------------------------------------------
def _resolve_runtime(config: TrainConfig) -> tuple[str, str]:
    device = resolve_device(config.device)
    return device, training_precision(config.mixed_precision, device)


def _lr_at(config: TrainConfig, step: int, total: int) -> float:
    return scheduled_lr(
        config.lr,
        step,
        total,
        schedule=config.schedule,
        warmup_steps=config.warmup_steps,
        min_lr_fraction=config.min_lr_fraction,
        step_size=config.step_size,
        step_gamma=config.step_gamma,
    )


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def build_training_dataset(config: TrainConfig, cases: Sequence[TrainingCase]):
    """The training dataset of ``config``: a SliceDataset, or a PatchDataset for patch recipes."""
    from .datasets import PatchDataset, SliceDataset

    slices = SliceDataset(
        cases,
        planes=config.planes,
        context_slices=config.context_slices,
        num_classes=config.num_classes,
        preprocess=config.preprocess,
        augment=config.augment,
        crop_size=None if config.patches is not None else config.crop_size,
        foreground_only=config.foreground_only,
        keep_empty_fraction=config.keep_empty_fraction,
        min_foreground_fraction=config.min_foreground_fraction,
        foreground_crop_prob=config.foreground_crop_prob,
        seed=config.seed,
    )
    if config.patches is not None:
        return PatchDataset(slices, seed=config.seed, **config.patches)
    return slices


def _epoch_order(dataset, config: TrainConfig, epoch: int, rank: int, world: int) -> list[int]:
    """The sample order of ``epoch`` for ``rank`` (deterministic in seed and epoch only)."""
    import torch

    n = len(dataset)
    balanced = config.sampling == "balanced" and hasattr(dataset, "sample_weights")
    if world > 1 and not balanced:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=int(config.seed), drop_last=True)
        sampler.set_epoch(int(epoch))
        return list(sampler)
    generator = torch.Generator().manual_seed(int(config.seed) * 100_003 + int(epoch))
    if balanced:
        weights = torch.as_tensor(dataset.sample_weights(), dtype=torch.double)
        order = torch.multinomial(weights, n, replacement=True, generator=generator).tolist()
    else:
        order = torch.randperm(n, generator=generator).tolist()
    if world > 1:  # every rank draws the same order and takes its own equal share
        per_rank = n // world
        order = order[rank * per_rank : (rank + 1) * per_rank]
    return order


def _steps_per_epoch(n_samples: int, batch_size: int, world: int) -> int:
    return max(1, (n_samples // max(1, world)) // batch_size)


# ------------------------------------------------------------------------------------------------
# Model, metadata, checkpoints
# ------------------------------------------------------------------------------------------------
def _build_network(config: TrainConfig):
    from ..models import build_model

    kwargs = dict(config.architecture_kwargs)
    kwargs.pop("in_channels", None)
    kwargs.pop("num_classes", None)
    net = build_model(config.architecture, in_channels=config.in_channels, num_classes=config.num_classes, **kwargs)
    if config.init_from is not None:
        from ..modelfile import load_model

        loaded = load_model(config.init_from)
        try:
            net.load_state_dict(loaded.network.state_dict(), strict=True)
        except RuntimeError as error:
            raise InputError(
                f"{config.init_from}: its network does not match this run's ({config.architecture}, "
                f"{config.in_channels} channels, {config.num_classes} classes): {str(error).splitlines()[0]}"
            ) from None
    return net


def config_from_model(config: TrainConfig, name_or_path: str | Path) -> TrainConfig:
    """``config`` set up to continue training an existing model: its architecture, input context,
    classes, pre-/post-processing and planes, and its weights as the starting point."""
    from ..modelfile import read_metadata, resolve_model
    from ..preprocess import PreprocessConfig

    path = resolve_model(name_or_path)
    metadata = read_metadata(path)
    return replace(
        config,
        architecture=metadata.architecture,
        architecture_kwargs=dict(metadata.architecture_kwargs),
        context_slices=metadata.context_slices,
        classes=list(metadata.classes),
        preprocess=PreprocessConfig.from_dict(metadata.preprocess) if metadata.preprocess else config.preprocess,
        postprocess=dict(metadata.postprocess) or config.postprocess,
        init_from=path,
    )


def _architecture_kwargs(network, config: TrainConfig) -> dict[str, Any]:
    kwargs = dict(getattr(network, "arch_kwargs", None) or config.architecture_kwargs)
    kwargs.pop("in_channels", None)
    kwargs.pop("num_classes", None)
    return json_safe(kwargs)


def _metadata(network, config: TrainConfig, training: dict[str, Any], metrics: dict[str, Any]) -> ModelMetadata:
    return ModelMetadata(
        name=config.model_name,
        architecture=getattr(network, "arch_name", config.architecture),
        architecture_kwargs=_architecture_kwargs(network, config),
        classes=list(config.classes),
        context_slices=int(config.context_slices),
        preprocess=config.preprocess.to_dict(),
        postprocess=dict(config.postprocess),
        planes=list(config.planes),
        training=json_safe(training),
        metrics=json_safe(metrics),
        description=config.description,
    )


def _save_resume(path: Path, network, optimizer, state: dict[str, Any], averaged=None) -> None:
    """Weights + optimizer tensors (safetensors) and the loop state (JSON header) in one atomic file.

    ``averaged``: the weight average's network (``ema/`` tensors), when the run keeps one."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from ..io import atomic_path

    tensors = {f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in network.state_dict().items()}
    if averaged is not None:
        tensors.update({f"ema/{k}": v.detach().cpu().contiguous().clone() for k, v in averaged.state_dict().items()})
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim/{pid}/{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    record = {
        "format": RESUME_FORMAT,
        "version": 1,
        "state": json_safe(state),
        "param_groups": json_safe(opt["param_groups"]),
        "optimizer_scalars": json_safe(scalars),
    }
    try:
        with atomic_path(path) as temp:
            save_file(tensors, str(temp), metadata={"spineseg_resume": json.dumps(record)})
    except (OSError, SafetensorError) as error:  # disk full, read-only folder, ...: the old checkpoint stays
        from ..errors import VolumeWriteError

        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise VolumeWriteError(f"{path}: cannot save the resume checkpoint ({reason})") from None


def load_resume_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(model_state_dict, optimizer_state_dict, loop_state)`` of a resume checkpoint."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelFileError(f"{path}: resume checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        tensors = load_file(str(path), device="cpu")
        record = json.loads(header["spineseg_resume"])
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise ModelFileError(f"{path}: not a readable resume checkpoint ({error})") from None
    if record.get("format") != RESUME_FORMAT:
        raise ModelFileError(f"{path}: not a napari-spineseg resume checkpoint")
    model_state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    averaged = {k[len("ema/") :]: v for k, v in tensors.items() if k.startswith("ema/")}
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    for pid, values in record.get("optimizer_scalars", {}).items():
        opt_state.setdefault(int(pid), {}).update(values)
    optimizer = {"state": opt_state, "param_groups": record["param_groups"]}
    state = dict(record["state"])
    if averaged:
        state["averaged_weights"] = averaged  # tensors, not JSON: the weight average of the run
    return model_state, optimizer, state


def log_columns(class_names: Sequence[str]) -> list[str]:
    """The columns of the training CSV log (one row per validation)."""
    return [
        "step",
        "epoch",
        "train_loss",
        "lr",
        "val_mean_dice",
        *[f"dice_{n.replace(' ', '_')}" for n in class_names],
        "seconds",
        "best",
    ]


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
def validate(
    network,
    config: TrainConfig,
    cases: Sequence[TrainingCase],
    device: str = "cpu",
    precision: str = "fp32",
) -> tuple[dict[int, float], dict[str, dict[int, float]]]:
    """Per-class Dice of ``network`` on whole ``cases`` through the inference path.

    Each case is segmented with :class:`~napari_spineseg.inference.Predictor` (all of
    ``config.planes``, mean fusion); Dice is computed inside the case's labelled region for the
    classes annotated in that case.  Returns ``(mean Dice per class over the cases that annotate
    it, per-case Dice)``.  The network is left in training mode.
    """
    from ..inference import Predictor, SegmentationSettings
    from ..metrics import dice_score
    from ..modelfile import LoadedModel

    metadata = _metadata(network, config, {}, {})
    if not config.val_postprocess:
        metadata.postprocess = {}
    settings = SegmentationSettings(
        planes=config.planes,
        device=device,
        precision=precision if precision != "fp16" else "auto",
        batch_size=config.val_batch_size,
        postprocess=config.val_postprocess,
    )
    predictor = Predictor(settings)
    was_training = network.training
    per_case: dict[str, dict[int, float]] = {}
    try:
        predictor.load(LoadedModel(network, metadata, None))
        for case in cases:
            result = predictor.predict(case.image)
            pred = result.labels.array
            truth = case.labels.array
            region = truth != IGNORE
            scores = {}
            for value in sorted(case.known_classes):
                if value >= config.num_classes:
                    continue
                scores[value] = dice_score((pred == value) & region, (truth == value) & region)
            per_case[case.case_id] = scores
    finally:
        network.train(was_training)
    means: dict[int, float] = {}
    for value in range(1, config.num_classes):
        values = [s[value] for s in per_case.values() if value in s]
        if values:
            means[value] = float(np.mean(values))
    return means, per_case


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(
    config: TrainConfig,
    train_cases: Sequence[TrainingCase],
    val_cases: Sequence[TrainingCase] = (),
    *,
    network=None,
    replay_cases: Sequence[TrainingCase] = (),
    dataset=None,
    loss_hook: Callable[[Any, dict[str, Any], Any], Any] | None = None,
    cancel: threading.Event | None = None,
    provenance: dict[str, Any] | None = None,
    param_groups: Sequence[dict[str, Any]] | None = None,
) -> Generator[TrainEvent, None, TrainResult]:
    """Train per ``config``; yields :class:`TrainEvent`; returns (and reports) a :class:`TrainResult`.

    ``network``: start from this network (e.g. ``load_model(...).network``) instead of a fresh
    one; its architecture is recorded.  ``replay_cases`` are mixed into the training cases.
    ``dataset`` replaces the dataset built from the cases.  ``loss_hook(network, batch, logits)``
    may return an extra loss term.  ``param_groups`` (parameters of ``network``, each group
    optionally with an ``"lr_scale"``) replace the single group of all parameters.  ``cancel``
    stops the run cleanly between steps (a resume checkpoint is written).  ``provenance`` is merged
    into the model's training record.
    Under ``torch.distributed`` (see :mod:`.distributed`) only rank 0 validates and writes.
    The phases are the methods of :class:`TrainingRun`.
    """
    run = TrainingRun(
        config,
        train_cases,
        val_cases,
        network=network,
        replay_cases=replay_cases,
        dataset=dataset,
        loss_hook=loss_hook,
        cancel=cancel,
        provenance=provenance,
        param_groups=param_groups,
    )
    return (yield from run.events())


class TrainingRun:
    """One training run: its state on the object, its phases as methods, driven by :meth:`events`.

    :meth:`setup` (runtime, data, network, optimizer, resume), :meth:`step` (one optimizer step),
    :meth:`validate` (Dice on the validation cases, CSV row), :meth:`keep_best` (best weights in
    memory), :meth:`save_best` (the model file), :meth:`checkpoint` (the resume file),
    :meth:`result` (the :class:`TrainResult`).
    """

    def __init__(
        self,
        config: TrainConfig,
        train_cases: Sequence[TrainingCase],
        val_cases: Sequence[TrainingCase] = (),
        *,
        network=None,
        replay_cases: Sequence[TrainingCase] = (),
        dataset=None,
        loss_hook: Callable[[Any, dict[str, Any], Any], Any] | None = None,
        cancel: threading.Event | None = None,
        provenance: dict[str, Any] | None = None,
        param_groups: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.train_cases = list(train_cases)
        self.val_cases = list(val_cases)
        self.replay_cases = list(replay_cases)
        self.network = network
        self.dataset = dataset
        self.loss_hook = loss_hook
        self.cancel = cancel
        self.provenance = provenance
        self.param_groups = param_groups
        self.started = time.perf_counter()
        self.step_count = 0
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.bad_validations = 0

    # Setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Runtime, seeds, dataset, network, optimizer (and resume state), loss, output files."""
        import torch

        config = self.config
        self.started = time.perf_counter()
        if config.num_threads is not None:
            torch.set_num_threads(max(1, int(config.num_threads)))
        self.rank, self.world = _distributed()
        self.main = self.rank == 0
        device, self.precision = _resolve_runtime(config)
        if self.world > 1 and device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank))}"
            torch.cuda.set_device(device)
        self.device = device
        seed_everything(config.seed)
        all_train = self.train_cases + self.replay_cases
        if self.dataset is None:
            if not all_train:
                raise InputError("no training cases")
            self.dataset = build_training_dataset(config, all_train)
        self.per_epoch = _steps_per_epoch(len(self.dataset), config.batch_size, self.world)
        if self.per_epoch < 1 or len(self.dataset) // self.world < config.batch_size:
            logger.warning("fewer samples (%d) than the batch size (%d)", len(self.dataset), config.batch_size)
        self.total_steps = int(config.steps) if config.steps is not None else int(config.epochs) * self.per_epoch
        self._setup_network()
        self.loss_fn = _build_loss(config).to(device)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.output = config.output if self.main else None
        self.resume_out = resume_path_for(self.output) if self.output is not None else None
        self.log = CsvLog(config.log_csv if self.main else None, log_columns([c.name for c in config.classes[1:]]))
        self.training_record = self._training_record()

    def _setup_network(self) -> None:
        import torch

        config, device = self.config, self.device
        net = self.network if self.network is not None else _build_network(config)
        self.channels_last = self.precision in ("bf16", "fp16") or device.startswith("cuda")
        net = net.to(device)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if self.param_groups is not None:
            groups = [dict(g) for g in self.param_groups]
        else:
            groups = [{"params": list(net.parameters())}]
        for group in groups:
            group["lr_scale"] = float(group.get("lr_scale", 1.0))
        self.net = net
        self.optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.averaged = _weight_average(net, config.ema_decay)
        if config.resume is not None:
            self._resume()
        self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.weights.state_dict().items()})
        self.model: Any = net
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(net, device_ids=[device] if device.startswith("cuda") else None)

    def _resume(self) -> None:
        config, net = self.config, self.net
        model_state, opt_state, state = load_resume_state(config.resume)
        if state.get("architecture") != getattr(net, "arch_name", config.architecture):
            raise InputError(
                f"{config.resume}: checkpoint is a {state.get('architecture')!r} network, "
                f"this run trains {getattr(net, 'arch_name', config.architecture)!r}"
            )
        try:
            net.load_state_dict(model_state, strict=True)
            self.optimizer.load_state_dict(opt_state)
        except (RuntimeError, ValueError, KeyError) as error:
            raise InputError(f"{config.resume}: checkpoint does not match this network ({error})") from None
        averaged = state.get("averaged_weights")
        if self.averaged is not None:  # a checkpoint without an average (EMA newly on) starts it from the weights
            self.averaged.load_state_dict(averaged if averaged else net.state_dict(), strict=True)
        self.step_count = int(state["step"])
        self.best_score, self.best_step = state.get("best_score"), state.get("best_step")
        self.history = list(state.get("history", []))
        self.bad_validations = int(state.get("bad_validations", 0))
        logger.info("resumed from %s at step %d", config.resume, self.step_count)

    def _training_record(self) -> dict[str, Any]:
        import torch

        config, train_cases, val_cases = self.config, self.train_cases, self.val_cases
        record = {
            "recipe": config.recipe,
            "config": config.to_dict(),
            "train_cases": [c.case_id for c in train_cases],
            "val_cases": [c.case_id for c in val_cases],
            "replay_cases": [c.case_id for c in self.replay_cases],
            "train_patients": sorted({c.patient for c in train_cases}),
            "val_patients": sorted({c.patient for c in val_cases}),
            "data_paths": sorted({p for c in [*train_cases, *val_cases] for p in c.paths.values()}),
            "seed": config.seed,
            "total_steps": self.total_steps,
            "world_size": self.world,
            "device": self.device,
            "precision": self.precision,
            "torch_version": torch.__version__,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            **(self.provenance or {}),
        }
        try:
            from .. import __version__

            record["package_version"] = __version__
        except ImportError:  # pragma: no cover
            pass
        return record

    # State ---------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.step_count // self.per_epoch

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def weights(self):
        """The network that is validated and saved: the weight average when the run keeps one."""
        return self.averaged if self.averaged is not None else self.net

    def loop_state(self) -> dict[str, Any]:
        """What a resume checkpoint records besides the tensors."""
        return {
            "step": self.step_count,
            "epoch": self.epoch,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "history": self.history,
            "bad_validations": self.bad_validations,
            "architecture": getattr(self.net, "arch_name", self.config.architecture),
            "config": self.config.to_dict(),
        }

    # Phases --------------------------------------------------------------------------------------
    def loader(self, epoch: int):
        """The data loader of ``epoch`` (from the current step on, after a resume)."""
        import torch

        config = self.config
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        order = _epoch_order(self.dataset, config, epoch, self.rank, self.world)
        skip = (self.step_count % self.per_epoch) * config.batch_size
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=config.batch_size,
            sampler=order[skip:],
            num_workers=resolve_workers(config.num_workers),
            drop_last=len(order) - skip >= config.batch_size,
            pin_memory=self.device.startswith("cuda"),
        )

    def step(self, batch: dict[str, Any]) -> tuple[float, float]:
        """One optimizer step on ``batch``; returns ``(loss, learning rate)``."""
        import torch

        config, device, net, optimizer = self.config, self.device, self.net, self.optimizer
        lr = _lr_at(config, self.step_count, self.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        image = batch["image"].to(device, non_blocking=True)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        target = batch["target"].to(device, non_blocking=True)
        known = batch["known"].to(device, non_blocking=True)
        with autocast(device, self.precision):
            logits = self.model(image)
        loss = self.loss_fn(logits, target, known)
        if self.loss_hook is not None:
            extra = self.loss_hook(net, batch, logits)
            if extra is not None:
                loss = loss + extra
        if not torch.isfinite(loss):
            raise InputError(f"training diverged at step {self.step_count} (loss {float(loss)})")
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if config.grad_clip:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
            optimizer.step()
        if self.averaged is not None:
            _update_average(self.averaged, net, self.config.ema_decay)
        self.step_count += 1
        return float(loss.detach()), lr

    def keep_best(self, score: float | None) -> bool:
        """Whether ``score`` improves on the best (rank 0); if so the weights are kept in memory."""
        if not self.main:
            return False
        improved = score is None or self.best_score is None or score > self.best_score + self.config.min_delta
        if improved:  # no validation data (score None): the latest weights are the best we know
            self.best_score, self.best_step, self.bad_validations = score, self.step_count, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.weights.state_dict().items()}
        else:
            self.bad_validations += 1
        return improved

    def validate(self, loss_value: float | None, lr: float) -> tuple[TrainEvent, bool, bool]:
        """Validate (rank 0), keep the best, log; returns ``(event, improved, stop early)``."""
        config, step = self.config, self.step_count
        t0 = time.perf_counter()
        means: dict[int, float] = {}
        if self.val_cases and self.main:
            means, _ = validate(self.weights, config, self.val_cases, self.device, self.precision)
        score = float(np.mean(list(means.values()))) if means else None
        improved = self.keep_best(score)
        named = {config.classes[v].name: round(d, 5) for v, d in means.items()}
        row = {
            "step": step,
            "epoch": self.epoch,
            "train_loss": None if loss_value is None else round(loss_value, 6),
            "lr": lr,
            "val_mean_dice": None if score is None else round(score, 5),
            **{f"dice_{n.replace(' ', '_')}": d for n, d in named.items()},
            "seconds": round(self.seconds(), 1),
            "best": int(improved),
        }
        self.history.append(row)
        self.log.write(row)
        stop = config.patience is not None and self.bad_validations >= config.patience
        stop = _broadcast_flag(stop, self.world)
        message = f"validation took {time.perf_counter() - t0:.1f} s"
        event = TrainEvent(
            "validation", step, self.total_steps, self.epoch, loss_value, lr, named, score, message, self.seconds()
        )
        return event, improved, stop

    def save_best(self, metrics: dict[str, Any]) -> Path | None:
        """Write the current weights as the best model file (rank 0, when there is an output)."""
        if self.output is None:
            return None
        record = {**self.training_record, "steps": self.step_count, "best_step": self.step_count, "finished": None}
        return save_model(self.weights, _metadata(self.weights, self.config, record, metrics), self.output)

    def checkpoint(self) -> None:
        """Write the resume checkpoint (weights, optimizer, loop state)."""
        if self.resume_out is not None:
            _save_resume(self.resume_out, self.net, self.optimizer, self.loop_state(), self.averaged)

    def after_validation(self, event: TrainEvent, improved: bool, epoch: int) -> Generator[TrainEvent, None, None]:
        """Rank 0: save an improved model (yielding a ``checkpoint`` event), then the resume checkpoint."""
        if not self.main:
            return
        if improved:
            metrics = {"val_dice": event.val_dice, "val_mean_dice": event.val_mean, "step": self.step_count}
            path = self.save_best(metrics)
            if path is not None:
                yield TrainEvent(
                    "checkpoint",
                    self.step_count,
                    self.total_steps,
                    epoch,
                    message=f"saved best model to {path}",
                    val_mean=event.val_mean,
                    seconds=self.seconds(),
                )
        self.checkpoint()

    def result(self, cancelled: bool = False, early: bool = False) -> TrainResult:
        """The outcome, with a CPU copy of the network holding the best weights."""
        best_net = copy.deepcopy(self.net).cpu()
        best_net.load_state_dict(self.best_state)
        best_net.eval()
        output = self.output
        saved = output if output is not None and output.is_file() else None
        return TrainResult(
            saved,
            self.best_score,
            self.best_step,
            self.history,
            self.step_count,
            self.total_steps,
            cancelled,
            early,
            self.resume_out,
            best_net,
        )

    # Driver --------------------------------------------------------------------------------------
    def events(self) -> Generator[TrainEvent, None, TrainResult]:
        """Set up, then step, validate, keep the best and checkpoint until done; yields every event."""
        self.setup()
        config = self.config
        self.net.train()
        running, running_count, since_val, since_count = 0.0, 0, 0.0, 0
        validated_at = self.step_count if config.resume is not None else -1
        cancelled = early = False
        epoch = self.epoch
        try:
            while self.step_count < self.total_steps:
                epoch = self.epoch
                for batch in self.loader(epoch):
                    if self.cancel is not None and self.cancel.is_set():
                        cancelled = True
                        break
                    value, lr = self.step(batch)
                    running, running_count = running + value, running_count + 1
                    since_val, since_count = since_val + value, since_count + 1
                    yield TrainEvent(
                        "step", self.step_count, self.total_steps, epoch, value, lr, seconds=self.seconds()
                    )
                    if self.step_count % config.val_every == 0 or self.step_count >= self.total_steps:
                        event, improved, stop = self.validate(since_val / max(since_count, 1), lr)
                        validated_at = self.step_count
                        since_val, since_count = 0.0, 0
                        yield event
                        yield from self.after_validation(event, improved, epoch)
                        if stop:
                            early = True
                            break
                    if self.step_count >= self.total_steps:
                        break
                if cancelled or early:
                    break
            if cancelled:
                if self.main:
                    self.checkpoint()
            elif validated_at != self.step_count and self.step_count > 0:
                lr = _lr_at(config, self.step_count, self.total_steps)
                event, improved, _ = self.validate(since_val / max(since_count, 1), lr)
                yield event
                if self.main:
                    if improved:
                        self.save_best(
                            {"val_dice": event.val_dice, "val_mean_dice": event.val_mean, "step": self.step_count}
                        )
                    self.checkpoint()
            outcome = self.result(cancelled, early)
            message = "cancelled" if cancelled else "stopped early" if early else "finished"
            yield TrainEvent(
                "done",
                self.step_count,
                self.total_steps,
                epoch,
                running / max(running_count, 1),
                message=f"{message} after {self.step_count} steps; "
                f"best mean Dice {self.best_score} at step {self.best_step}",
                val_mean=self.best_score,
                seconds=self.seconds(),
                result=outcome,
            )
            return outcome
        finally:
            # Closed, cancelled, interrupted or failed: every file was written atomically (temp file +
            # rename), so the model, the resume checkpoint and the CSV are each either old or new, never partial.
            logger.debug("training generator left at step %d of %d", self.step_count, getattr(self, "total_steps", 0))


def _weight_average(network, decay: float):
    """A copy of ``network`` that will hold the exponential moving average of its weights (None when off)."""
    if not decay:
        return None
    averaged = copy.deepcopy(network)
    for parameter in averaged.parameters():
        parameter.requires_grad_(False)
    return averaged


def _update_average(averaged, network, decay: float) -> None:
    """``averaged = decay * averaged + (1 - decay) * network`` for weights and float buffers (batch-norm
    statistics); integer buffers (batch counts) are copied."""
    import torch

    with torch.no_grad():
        for mine, theirs in zip(averaged.state_dict().values(), network.state_dict().values()):
            if mine.dtype.is_floating_point:
                mine.lerp_(theirs.detach(), 1.0 - decay)
            else:
                mine.copy_(theirs)


def _broadcast_flag(flag: bool, world: int) -> bool:
    if world <= 1:
        return flag
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.broadcast(tensor, src=0)
    return bool(int(tensor.item()))


def _build_loss(config: TrainConfig):
    from ..losses import build_loss

    return build_loss(config.loss, **config.loss_kwargs)


def run_training(
    config: TrainConfig, train_cases: Sequence[TrainingCase], val_cases: Sequence[TrainingCase] = (), **kwargs
) -> TrainResult:
    """Drain :func:`train` and return its :class:`TrainResult`."""
    from .._generators import drain

    return drain(train(config, train_cases, val_cases, **kwargs))
