"""Three-plane slice-wise inference with fusion, as a cancellable generator and a predictor object.

For every chosen plane the study (in canonical orientation, see :mod:`slicing`) is streamed in
batches of slices through the 2-D network; class probabilities are resampled back to the slice
grid and accumulated *in place* into one fused accumulator (float16, background implicit), so
three planes never hold three probability volumes.  The fused label map is taken back to the
study's own voxels (lossless axis permutation/flips) and post-processed per class.

    predictor = Predictor(SegmentationSettings(planes=ALL_PLANES, fusion="mean"))
    predictor.load("spineseg-default")
    result = predictor.predict(volume)            # or: for event in predictor.run(volume): ...
    result.labels                                  # Volume on the study's grid (uint8/uint16)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from .errors import Cancelled, InputError
from .modelfile import DEFAULT_MODEL_NAME, LoadedModel, ModelMetadata, load_model
from .orientation import ALL_PLANES, Plane
from .postprocess import PostprocessConfig, postprocess_labels
from .preprocess import PreprocessConfig, resample_back, resample_slices
from .resident import FusionPlan, accumulate, device_batch_size, segment_resident
from .runtime import (  # devices and precision live in .runtime; re-exported here for existing callers
    autocast,
    available_devices,  # noqa: F401
    cpu_supports_bf16,  # noqa: F401
    resolve_device,
    resolve_precision,
)
from .slicing import PreparedStudy, plane_pixel_spacing, plane_view, prepare_study, slice_batch
from .volume import Volume

logger = logging.getLogger(__name__)


class FusionMode(str, Enum):
    """How per-plane class probabilities become one label map."""

    MEAN = "mean"  # mean probability (default)
    WEIGHTED = "weighted"  # weighted mean, weights from the model file (or settings)
    VOTE = "vote"  # majority vote of per-plane argmax (ties: mean probability)


class UncertaintyMode(str, Enum):
    ENTROPY = "entropy"  # normalised entropy of the fused probabilities (0..1)
    DISAGREEMENT = "disagreement"  # fraction of planes whose argmax differs from the fused label


@dataclass
class SegmentationSettings:
    """Run-time choices of a segmentation (the model file supplies everything else)."""

    planes: Sequence[Plane | str] = ALL_PLANES
    fusion: FusionMode | str = FusionMode.MEAN
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 16
    uncertainty: UncertaintyMode | str | None = None
    postprocess: bool = True
    plane_weights: dict[str, float] | None = None  # overrides the model's weights for "weighted"
    fuse_layers: bool = True  # fold batch norm and fuse activations into convolutions (inference copy)
    lesion_gate: bool = True  # use the model's lesion-presence gate, if it has one (see napari_spineseg.lesion_gate)
    # Test-time left-right mirror (averages the prediction of the study and of its mirror image:
    # twice the network time).  None: as the model file says (``extra.inference.test_time_mirror``).
    test_time_mirror: bool | None = None
    # Device-resident inference (:mod:`.resident`): the study goes to the device once and only the
    # label map comes back.  None: on CUDA; True forces it (also on the CPU: the tests' reference);
    # False keeps the host path.  Per-slice filters (CLAHE, denoising) always take the host path.
    resident: bool | None = None

    def __post_init__(self) -> None:
        self.planes = tuple(dict.fromkeys(p if isinstance(p, Plane) else Plane.parse(str(p))[0] for p in self.planes))
        if not self.planes:
            raise InputError("choose at least one plane")
        try:
            self.fusion = FusionMode(self.fusion)
        except ValueError:
            raise InputError(f"unknown fusion {self.fusion!r}: choose mean, weighted or vote") from None
        if self.uncertainty is not None:
            try:
                self.uncertainty = UncertaintyMode(self.uncertainty)
            except ValueError:
                raise InputError(f"unknown uncertainty {self.uncertainty!r}: choose entropy or disagreement") from None
        if int(self.batch_size) < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")
        if self.plane_weights is not None:
            from .modelfile import check_plane_weights

            try:
                self.plane_weights = check_plane_weights(self.plane_weights)
            except (ValueError, TypeError) as error:
                raise InputError(str(error)) from None


@dataclass(frozen=True)
class ProgressEvent:
    """Progress of a segmentation: ``done`` of ``total`` slices in ``plane``; ``fraction`` overall."""

    stage: str  # "prepare", "plane", "fuse", "done"
    plane: str | None = None
    done: int = 0
    total: int = 0
    fraction: float = 0.0


@dataclass
class SegmentationResult:
    """Label map (and optional uncertainty map) on the input study's voxel grid."""

    labels: Volume
    uncertainty: Volume | None = None
    seconds: float = 0.0
    model_name: str = ""
    planes: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)


class Predictor:
    """Settings in the constructor, ``load(model)`` separately, then ``predict``/``run`` per study."""

    def __init__(self, settings: SegmentationSettings | None = None) -> None:
        self.settings = settings or SegmentationSettings()
        self.model: LoadedModel | None = None
        self.lesion_gate = None  # napari_spineseg.lesion_gate.GateRunner when the model has a gate
        self.test_time_mirror = False  # resolved from the settings and the model in load()
        self.device = resolve_device(self.settings.device)
        self.precision = resolve_precision(self.settings.precision, self.device)

    # Model -------------------------------------------------------------------------------------
    def load(self, model: str | Path | LoadedModel = DEFAULT_MODEL_NAME) -> LoadedModel:
        """Load weights (to the CPU first), build the inference copy (:mod:`.models.fused`), move it to the device."""
        import torch

        from .lesion_gate import gate_runner
        from .models.fused import fuse_for_inference

        loaded = model if isinstance(model, LoadedModel) else load_model(model)
        network = loaded.network.eval()
        if self.settings.fuse_layers:
            # An inference copy: batch norm folded into the convolutions, activations fused (CPU).
            dtype = torch.bfloat16 if (self.device == "cpu" and self.precision == "bf16") else torch.float32
            network = fuse_for_inference(network, dtype)
        if self.device != "cpu" or self.precision == "bf16":
            network = network.to(device=self.device, memory_format=torch.channels_last)
        self.model = LoadedModel(network, loaded.metadata, loaded.path)
        self.lesion_gate = gate_runner(loaded, self.settings, self.device, self.precision)
        self.test_time_mirror = (
            model_test_time_mirror(loaded.metadata)
            if self.settings.test_time_mirror is None
            else bool(self.settings.test_time_mirror)
        )
        return self.model

    def _require_model(self) -> LoadedModel:
        if self.model is None:
            self.load()
        assert self.model is not None
        return self.model

    # Running -----------------------------------------------------------------------------------
    def predict(self, volume: Volume, cancel: threading.Event | None = None) -> SegmentationResult:
        """Segment ``volume`` synchronously (drains :meth:`run`)."""
        from ._generators import drain

        return drain(self.run(volume, cancel))

    def run(
        self, volume: Volume, cancel: threading.Event | None = None
    ) -> Generator[ProgressEvent, None, SegmentationResult]:
        """Segment ``volume``, yielding :class:`ProgressEvent` after every batch.

        Stops with :class:`Cancelled` at the next batch once ``cancel`` is set (or when the
        consumer closes the generator); nothing is written by this method.
        """
        model = self._require_model()
        metadata = model.metadata
        settings = self.settings
        planes = [p for p in settings.planes if p.value in metadata.planes] or list(settings.planes)
        started = time.perf_counter()
        _check_volume(volume)
        yield ProgressEvent("prepare", fraction=0.0)
        preprocess = PreprocessConfig.from_dict(metadata.preprocess) if metadata.preprocess else PreprocessConfig()
        study = prepare_study(volume, preprocess, dtype=np.float16)
        class_values = np.asarray(metadata.class_values)
        plan = self._fusion_plan(planes, int(np.prod(study.image.shape)))
        if self._use_resident(preprocess):
            fused_index, uncertainty = yield from segment_resident(
                study,
                planes,
                plan,
                preprocess,
                metadata.context_slices,
                device=self.device,
                channels_last=self.device != "cpu" or self.precision == "bf16",
                probabilities=self.device_probabilities,
                batch_size=lambda plane, pixels, network_pixels: device_batch_size(
                    self.device, _batch_for_area(settings.batch_size, pixels, preprocess, study, plane), network_pixels
                ),
                event=ProgressEvent,
                cancel=cancel,
            )
        else:
            fused_index, uncertainty = yield from self._segment_host(study, planes, plan, preprocess, cancel)
        lookup = class_values.astype(np.uint8 if class_values.max() < 256 else np.uint16)
        labels_canonical = lookup[fused_index]  # (an int64 lookup would briefly cost 8 bytes per voxel)
        labels_array = study.to_original(labels_canonical)
        if settings.postprocess and metadata.postprocess:
            config = PostprocessConfig.from_dict(metadata.postprocess)
            labels_array = postprocess_labels(labels_array, volume.geometry.spacing_zyx, config)
        labels = Volume(labels_array, volume.geometry, f"{volume.name} segmentation", volume.path, {})
        labels.metadata.update({"model": metadata.name, "planes": [p.value for p in planes]})
        uncertainty_volume = None
        if uncertainty is not None:
            uncertainty_volume = Volume(
                study.to_original(uncertainty), volume.geometry, f"{volume.name} uncertainty", volume.path, {}
            )
        seconds = time.perf_counter() - started
        yield ProgressEvent("done", fraction=1.0)
        return SegmentationResult(
            labels,
            uncertainty_volume,
            seconds,
            metadata.name,
            tuple(p.value for p in planes),
            list(volume.metadata.get("warnings", [])),
        )

    # Internals ---------------------------------------------------------------------------------
    def _fusion_plan(self, planes: Sequence[Plane], voxels: int) -> FusionPlan:
        """Accumulator and fusion choices of a run over ``voxels`` canonical voxels."""
        settings = self.settings
        n_classes = len(self._require_model().metadata.class_values)
        weights = self._plane_weights(planes)
        vote = settings.fusion is FusionMode.VOTE
        # Fused accumulator over foreground classes only (background = total weight - sum).
        # Large studies: an 8-bit accumulator of probabilities quantised to 1/252 of the total weight
        # (argmax changes only where two classes are within ~1 %), half the memory of float16.
        quantised = not vote and voxels * (n_classes - 1) * 2 > ACCUMULATOR_BYTES
        return FusionPlan(
            n_classes,
            weights,
            float(sum(weights[p] for p in planes)),
            vote,
            QUANTISED_TOTAL if quantised else None,
            settings.uncertainty is UncertaintyMode.ENTROPY,
            settings.uncertainty is UncertaintyMode.DISAGREEMENT,
        )

    def device_probabilities(self, tensor, plane: Plane):
        """Class probabilities ``[B, C, h, w]`` (float32, on the device) of a network input on the device,
        the lesion gate applied (the gate's numpy step makes one round trip through the host)."""
        import torch

        probabilities = self._network_probabilities(tensor, plane)
        if self.lesion_gate is not None:
            gated = self.lesion_gate.apply(tensor, probabilities.cpu().numpy())
            probabilities = torch.from_numpy(gated).to(probabilities.device)
        return probabilities

    def _use_resident(self, preprocess: PreprocessConfig) -> bool:
        """Whether this run takes the device-resident path (see :attr:`SegmentationSettings.resident`)."""
        choice = self.settings.resident
        if choice is None:
            choice = self.device.startswith("cuda")
        if choice and _has_slice_steps(preprocess):
            logger.info("per-slice filters run on the host: the device-resident path is not used")
            return False
        return bool(choice)

    def _segment_host(
        self,
        study: PreparedStudy,
        planes: Sequence[Plane],
        plan: FusionPlan,
        preprocess: PreprocessConfig,
        cancel: threading.Event | None,
    ) -> Generator[ProgressEvent, None, tuple[np.ndarray, np.ndarray | None]]:
        """The host path: batches sliced in numpy, fused in a host accumulator; the fused class index."""
        import torch

        settings, metadata = self.settings, self._require_model().metadata
        shape = study.image.shape
        accumulator = np.zeros((*shape, plan.n_classes if plan.vote else plan.n_classes - 1), dtype=np.uint8)
        if not plan.vote and plan.quantised_total is None:
            accumulator = np.zeros((*shape, plan.n_classes - 1), dtype=np.float16)
        plane_argmax = np.zeros((len(planes), *shape), dtype=np.uint8) if plan.disagreement else None
        total = sum(shape[p.canonical_array_axis] for p in planes)
        done_overall = 0
        for plane_index, plane in enumerate(planes):
            stack = plane_view(study.image, plane)
            target = torch.from_numpy(plane_view(accumulator, plane))  # a strided view, no copy
            count = stack.shape[0]
            batch_size = _batch_for_area(settings.batch_size, int(np.prod(stack.shape[1:3])), preprocess, study, plane)
            for start in range(0, count, batch_size):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("segmentation cancelled")
                indices = np.arange(start, min(start + batch_size, count))
                rows = slice(start, start + len(indices))  # a view: no gather/scatter copies
                probabilities = self._infer_batch(study, stack, indices, plane, preprocess, metadata.context_slices)
                # (accumulated in torch: vectorised float16 conversion, no temporaries in numpy)
                accumulate(target, rows, probabilities, plan, plane)
                if plane_argmax is not None:
                    plane_view(plane_argmax[plane_index], plane)[rows] = probabilities.argmax(dim=1).numpy()
                done_overall += len(indices)
                yield ProgressEvent("plane", plane.value, int(indices[-1]) + 1, count, done_overall / max(total, 1))
        yield ProgressEvent("fuse", fraction=1.0)
        del stack, target
        study.image = np.empty((0, 0, 0), np.float16)  # the slices are done: free them before fusing
        fused_index, uncertainty = self._fuse(
            accumulator, plan.fuse_total, plane_argmax, len(planes), plan.entropy, vote=plan.vote
        )
        del accumulator
        return fused_index, uncertainty

    def _plane_weights(self, planes: Sequence[Plane]) -> dict[Plane, float]:
        if self.settings.fusion is not FusionMode.WEIGHTED:
            return dict.fromkeys(planes, 1.0)
        source = self.settings.plane_weights or (self.model.metadata.plane_weights if self.model else {}) or {}
        weights = {p: float(source.get(p.value, 1.0)) for p in planes}
        if not all(np.isfinite(w) and w >= 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise InputError(f"plane weights must be non-negative and not all zero, got {source}")
        return weights

    def _infer_batch(
        self,
        study: PreparedStudy,
        stack: np.ndarray,
        indices: np.ndarray,
        plane: Plane,
        preprocess: PreprocessConfig,
        context_slices: int,
    ):
        """Class probabilities ``[B, C, H, W]`` (a float32 CPU tensor) for slices ``indices`` of ``stack``."""
        import torch

        from .preprocess import preprocess_slice

        batch = slice_batch(stack, indices, context_slices)
        pixel_spacing = plane_pixel_spacing(study.spacing_zyx, plane)
        if _has_slice_steps(preprocess):
            batch = np.stack(
                [np.stack([preprocess_slice(ch, pixel_spacing, preprocess) for ch in item]) for item in batch]
            ).astype(np.float32)
        height, width = batch.shape[-2:]
        model_spacing = preprocess.pixel_spacing_mm
        if model_spacing is not None:
            batch = resample_slices(batch, pixel_spacing, (model_spacing, model_spacing), order=1)
        tensor = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        if self.device != "cpu" or self.precision == "bf16":
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        probabilities = self._network_probabilities(tensor, plane).cpu()
        if self.lesion_gate is not None:  # zero lesion probability on slices the gate calls lesion-free
            probabilities = torch.from_numpy(self.lesion_gate.apply(tensor, probabilities.numpy()))
        if probabilities.shape[-2:] != (height, width):
            probabilities = torch.from_numpy(resample_back(probabilities.numpy(), (height, width), order=1))
        return probabilities

    def _network_probabilities(self, tensor, plane: Plane):
        """Softmax of the network (and of the mirror image, when asked) for a batch on the device."""
        import torch

        network = self._require_model().network
        with torch.inference_mode(), autocast(self.device, self.precision):
            probabilities = torch.softmax(network(tensor), dim=1, dtype=torch.float32)
            if self.test_time_mirror:
                probabilities += _mirrored_probabilities(network, tensor, plane)
                probabilities *= 0.5
        return probabilities

    @staticmethod
    def _fuse(
        accumulator: np.ndarray,
        total_weight: float,
        plane_argmax: np.ndarray | None,
        n_planes: int,
        entropy: bool,
        vote: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Argmax of the fused accumulator (chunked along axis 0 to bound temporaries)."""
        shape = accumulator.shape[:3]
        fused = np.zeros(shape, dtype=np.uint8)
        uncertainty = np.zeros(shape, dtype=np.float32) if (plane_argmax is not None or entropy) else None
        import torch

        chunk = max(1, (1 << 22) // max(1, int(np.prod(accumulator.shape[1:]))))  # ~4 M values per chunk
        for start in range(0, shape[0], chunk):
            if not vote and not entropy:  # argmax only: the best foreground class against the background
                part_t = torch.from_numpy(accumulator[start : start + chunk]).float()
                background = float(total_weight) - part_t.sum(dim=-1)
                winner, best = part_t.max(dim=-1)
                fused[start : start + chunk] = torch.where(winner > background, best + 1, 0).numpy()
            elif vote:
                part = accumulator[start : start + chunk].astype(np.float32)
                fused[start : start + chunk] = part.argmax(axis=-1)
                probabilities = part / np.float32(n_planes)
            else:
                part = accumulator[start : start + chunk].astype(np.float32)
                background = np.float32(total_weight) - part.sum(axis=-1, keepdims=True)
                probabilities = np.concatenate([background, part], axis=-1) / np.float32(total_weight)
                fused[start : start + chunk] = probabilities.argmax(axis=-1)
            if entropy and uncertainty is not None:
                uncertainty[start : start + chunk] = entropy_map(probabilities)
            if plane_argmax is not None and uncertainty is not None:
                agree = (plane_argmax[:, start : start + chunk] == fused[start : start + chunk][None]).sum(axis=0)
                uncertainty[start : start + chunk] = 1.0 - agree / np.float32(n_planes)
        return fused, uncertainty


def model_test_time_mirror(metadata: ModelMetadata) -> bool:
    """Whether a model asks for the test-time left-right mirror (``extra.inference.test_time_mirror``)."""
    inference = (getattr(metadata, "extra", None) or {}).get("inference") or {}
    return bool(inference.get("test_time_mirror", False))


def _mirrored_probabilities(network, tensor, plane: Plane):
    """Class probabilities of the left-right mirror image of a batch, mapped back onto the batch's pixels.

    In canonical slices (:mod:`.slicing`) left-right is the column axis of axial and coronal slices
    and the slice order of sagittal ones (the context channels); the sagittal output needs no
    mapping back, since the mirrored slice stack is predicted at the same slice position.
    """
    import torch

    if Plane(plane) is Plane.SAGITTAL:
        return torch.softmax(network(torch.flip(tensor, dims=[1])), dim=1, dtype=torch.float32)
    mirrored = torch.softmax(network(torch.flip(tensor, dims=[-1])), dim=1, dtype=torch.float32)
    return torch.flip(mirrored, dims=[-1])


# Pixels per batch (at the model's pixel spacing): bounds the activations of a batch, whatever
# the slice size (10 slices of 224², 2 of 512²): a 512³ study then segments in < 2 GB.
BATCH_PIXEL_BUDGET = 8 * 256 * 256
# Above this size a float16 fusion accumulator gives way to an 8-bit one (e.g. 512³ with 3 classes).
ACCUMULATOR_BYTES = 512 * 1024 * 1024
QUANTISED_TOTAL = 252.0  # full certainty of all planes; rounding (≤ 0.5 per plane, 3 planes) stays ≤ 255


def _batch_for_area(requested: int, slice_pixels: int, preprocess: PreprocessConfig, study, plane: Plane) -> int:
    """The batch size: at most ``requested`` slices and :data:`BATCH_PIXEL_BUDGET` network pixels."""
    if preprocess.pixel_spacing_mm:
        spacing = plane_pixel_spacing(study.spacing_zyx, plane)
        scale = (spacing[0] / preprocess.pixel_spacing_mm) * (spacing[1] / preprocess.pixel_spacing_mm)
        slice_pixels = int(slice_pixels * scale)
    return max(1, min(int(requested), BATCH_PIXEL_BUDGET // max(1, slice_pixels)))


def entropy_map(probabilities: np.ndarray) -> np.ndarray:
    """Normalised entropy (0..1) over the last axis of a probability array."""
    p = np.clip(probabilities.astype(np.float32), 1e-6, 1.0)
    return (-(p * np.log(p)).sum(axis=-1) / np.log(p.shape[-1])).astype(np.float32)


def _has_slice_steps(config: PreprocessConfig) -> bool:
    return bool(config.clahe or config.denoise_nlmeans or config.bilateral or config.gaussian_sigma_mm > 0)


def _check_volume(volume: Volume) -> None:
    array = volume.array
    if array.ndim != 3:
        raise InputError(f"{volume.name}: need a 3-D study, got shape {array.shape}")
    if min(array.shape) < 1:
        raise InputError(f"{volume.name}: empty study (shape {array.shape})")
    if array.dtype.kind not in "iufb":
        raise InputError(f"{volume.name}: unsupported voxel type {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{volume.name}: the study contains NaN or infinite voxels")
