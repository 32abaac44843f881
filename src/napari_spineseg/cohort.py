"""Cohort segmentation: every study of a directory, serially or one study per task on a Dask cluster.

    for progress in segment_cohort("cohort/", "out/", scheduler="local:2"):
        print(progress.result.study, progress.result.status)

Studies are the volume files (``.mha/.mhd/.nii/.nii.gz/.nrrd/.nhdr``; label files such as
``*_seg.*`` and hidden entries are skipped) and DICOM series directories found under the input
directory, in name order.  Each is written to ``OUTPUT_DIR/<study>_seg.nii.gz`` atomically with a
provenance record (:mod:`napari_spineseg.outputs`: the study's path and checksum, the model's
checksum, the settings), so on the next run an output is reused only when its record matches the
study, the model and the settings and the file is as spineseg wrote it: an interrupted cohort
resumes where it stopped, and a study is never paired with another's output.  A name keeps the
study its record names (a new study with a clashing name gets ``-2``); an existing file that
spineseg did not write (a manual label map) is never replaced nor reported as a result: the study
is an ``error`` unless ``overwrite``.  A CSV report (study, status, seconds, output,
``volume_ml_<class>`` per model class, error) is rewritten atomically as results arrive.

``scheduler`` is ``None`` (serial, in this process), ``"local"`` / ``"local:N"`` (a
:class:`distributed.LocalCluster` of N single-threaded worker processes), the address of a running
Dask scheduler (``tcp://host:8786``) or a :class:`distributed.Client`.  Every worker process loads
the model once and keeps it for all its studies.  Serial and distributed runs call the same
:func:`segment_study`, so they write the same labels.

Only file and directory names (relative to the input directory) and DICOM series descriptions
name studies in the report and the logs, never DICOM patient attributes.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import Cancelled, InputError, ModelFileError, SpinesegError
from .inference import Predictor, SegmentationSettings
from .io import (
    VOLUME_SUFFIXES,
    atomic_path,
    is_dicom_file,
    looks_like_label_file,
    read_volume,
    strip_suffix,
    volume_suffix,
    write_labels,
    write_volume,
)
from .modelfile import DEFAULT_MODEL_NAME, read_metadata, resolve_model
from .outputs import (
    OutputSet,
    file_sha256,
    files_sha256,
    fit_name,
    make_record,
    owned_record,
    read_record,
    settings_record,
)
from .schema import LabelClass

if TYPE_CHECKING:
    from distributed import Client

    from .volume import Volume

logger = logging.getLogger(__name__)

REPORT_NAME = "spineseg-report.csv"
OUTPUT_SUFFIX = "_seg.nii.gz"
UNCERTAINTY_SUFFIX = "_uncertainty.nii.gz"
STATUSES = ("done", "skipped", "error", "failed")
TORCH_THREADS_ENV = "SPINESEG_TORCH_THREADS"


# Studies -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    """One study of a cohort: a volume file, or one DICOM series of a directory (``series_id``)."""

    name: str  # unique, file-system safe; the report's ``study`` column
    source: Path
    output: Path
    series_id: str | None = None
    key: str = ""  # the source relative to the input directory (``#<series id>`` added): binds records
    source_sha256: str = ""  # filled in by segment_cohort before the study is segmented

    @property
    def uncertainty_output(self) -> Path:
        return self.output.with_name(self.output.name[: -len(OUTPUT_SUFFIX)] + UNCERTAINTY_SUFFIX)


@dataclass(frozen=True)
class StudyResult:
    """What happened to one study; ``volumes_ml`` maps class value -> volume (mL)."""

    study: str
    status: str  # done | skipped | error | failed
    seconds: float = 0.0
    output: str = ""  # file name in the output directory
    volumes_ml: dict[int, float] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class CohortProgress:
    """Yielded by :func:`segment_cohort` after every study: its result and the running count."""

    result: StudyResult
    done: int
    total: int


def safe_name(text: str) -> str:
    """``text`` with every character but letters, digits, ``-_.`` replaced by ``_`` (cli convention)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text).strip("_") or "series"


def _visible_entries(directory: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as scan:
            return sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as error:
        raise InputError(f"{directory}: cannot list ({error.strerror or error})") from None


def has_dicom_files(directory: str | os.PathLike) -> bool:
    """True when ``directory`` directly holds DICOM files (it is a series directory)."""
    return any(e.is_file() and is_dicom_file(e.path) for e in _visible_entries(Path(directory)))


def is_cohort_directory(path: str | os.PathLike) -> bool:
    """A directory that is not itself a DICOM series and holds volume files or subdirectories."""
    path = Path(path).expanduser()
    if not path.is_dir() or has_dicom_files(path):
        return False
    return any(e.is_dir() or (e.is_file() and volume_suffix(e.name) in VOLUME_SUFFIXES) for e in _visible_entries(path))


def _series_label(directory: Path, series_id: str) -> str:
    """``<description>_<number>`` of a series (safe DICOM tags only), for directories with several series."""
    import SimpleITK as sitk

    from .io import safe_dicom_tags

    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), series_id)
    tags = safe_dicom_tags(files[0]) if files else {}
    return "_".join(t for t in (tags.get("series_description"), tags.get("series_number")) if t) or "series"


def discover_studies(input_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> list[Study]:
    """The studies under ``input_dir`` in a deterministic order, with their planned outputs.

    A file ``a/b.nii.gz`` becomes study ``a_b`` (output ``a_b_seg.nii.gz``); a DICOM directory
    ``p1/t2`` becomes ``p1_t2`` (with ``_<series description>_<number>`` added when it holds
    several series).  Names that clash get ``-2``, ``-3``, ...  The output directory (default
    ``input_dir``) is never searched.
    """
    from .io import series_ids

    root = Path(input_dir).expanduser()
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    output = Path(output_dir).expanduser() if output_dir is not None else root
    skip = {output.resolve()} - {root.resolve()}
    found: list[tuple[tuple[str, ...], Path, str | None]] = []
    visited: set[Path] = set()

    def walk(directory: Path) -> None:
        real = directory.resolve()
        if real in visited or real in skip:
            return
        visited.add(real)
        entries = _visible_entries(directory)
        parts = directory.relative_to(root).parts or (root.resolve().name,)
        if any(e.is_file() and is_dicom_file(e.path) for e in entries):
            series = sorted(series_ids(directory))
            for series_id in series:
                extra = (_series_label(directory, series_id),) if len(series) > 1 else ()
                found.append(((*parts, *extra), directory, series_id))
        for entry in entries:
            if (
                entry.is_file()
                and volume_suffix(entry.name) in VOLUME_SUFFIXES
                and not looks_like_label_file(entry.name)
            ):
                found.append(((*directory.relative_to(root).parts, strip_suffix(entry.name)), Path(entry.path), None))
        for entry in entries:
            if entry.is_dir():
                walk(Path(entry.path))

    walk(root)
    keys = [_study_key(root, source, series_id) for _, source, series_id in found]
    recorded = _recorded_keys(output)  # name -> the study key its record names
    claimed = {name.lower(): key for name, key in recorded.items()}
    bound = {key: name for name, key in recorded.items()}
    studies, used = [], set()
    for (parts, source, series_id), key in zip(found, keys):
        name = bound.pop(key, None) if key in bound and bound[key].lower() not in used else None
        if name is None:
            base = fit_name("_".join(safe_name(p) for p in parts))
            name, count = base, 1
            while name.lower() in used or claimed.get(name.lower(), key) != key:
                count += 1
                name = f"{base}-{count}"
        used.add(name.lower())
        studies.append(Study(name, source, output / f"{name}{OUTPUT_SUFFIX}", series_id, key))
    return studies


def _study_key(root: Path, source: Path, series_id: str | None) -> str:
    try:
        relative = source.relative_to(root).as_posix()
    except ValueError:
        relative = str(source)
    return f"{relative}#{series_id}" if series_id else relative


def _recorded_keys(output: Path) -> dict[str, str]:
    """Study names of the label maps in ``output`` that have a record, mapped to the study key it names."""
    claimed: dict[str, str] = {}
    if not output.is_dir():
        return claimed
    for record_file in output.glob(f".*{OUTPUT_SUFFIX}.spineseg.json"):
        labels = output / record_file.name[1 : -len(".spineseg.json")]
        record = read_record(labels)
        if record is not None and record.get("study_key") and labels.exists():
            claimed[labels.name[: -len(OUTPUT_SUFFIX)]] = str(record["study_key"])
    return claimed


def _source_size(study: Study) -> tuple[int, int, int] | None:
    """The ``(x, y, z)`` size of a study from its header(s) only, or None when unknown."""
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        if study.series_id is None:
            reader.SetFileName(str(study.source))
            reader.ReadImageInformation()
            size = reader.GetSize()
            return tuple(int(s) for s in size[:3]) if len(size) >= 3 else None  # type: ignore[return-value]
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(study.source), study.series_id)
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        size = reader.GetSize()
        depth = len(files) if len(files) > 1 else (size[2] if len(size) > 2 else 1)
        return int(size[0]), int(size[1]), int(depth)
    except (RuntimeError, IndexError):
        return None


def source_checksum(study: Study) -> str:
    """The SHA-256 of a study's file(s) (a DICOM series: of its files in series order)."""
    import SimpleITK as sitk

    try:
        if study.series_id is None:
            return file_sha256(study.source)
        return files_sha256(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(study.source), study.series_id))
    except (OSError, RuntimeError):
        return ""  # unreadable: segment_study reports it


def _binding(study: Study, model: ModelRef, settings: SegmentationSettings) -> dict[str, Any]:
    """What a record must say for its output to count as this study's result."""
    return {
        "study_key": study.key,
        "source_sha256": study.source_sha256,
        "model_sha256": model.digest,
        "settings": settings_record(settings),
    }


def resume_state(
    study: Study,
    classes: Sequence[LabelClass],
    model: ModelRef,
    settings: SegmentationSettings,
    overwrite: bool = False,
) -> StudyResult | None:
    """``skipped`` (volumes of the existing output) when ``study``'s outputs are its complete results,
    ``error`` when an output file exists that spineseg did not write (unless ``overwrite``), else None.

    A result counts when every output (the uncertainty map too when asked for) has a record naming
    this study (key and source checksum), the model's checksum and the settings, and the file is
    unchanged since.  A damaged file with a spineseg record is segmented again.
    """
    uncertainty = settings.uncertainty is not None
    outputs = [study.output, *([study.uncertainty_output] if uncertainty else [])]
    wanted = _binding(study, model, settings)
    mode = str(getattr(settings.uncertainty, "value", settings.uncertainty))
    current = True
    for path in outputs:
        if not path.exists():
            current = False
            continue
        record = owned_record(path)
        if record is None:
            if overwrite or _damaged_own_output(path):
                current = False
                continue
            return StudyResult(
                study.name,
                "error",
                error=f"{path.name} exists and was not written by spineseg (or was changed since): "
                "not replaced; use another output directory or --overwrite",
            )
        if any(record.get(k) != v for k, v in wanted.items()) or (
            path != study.output and record.get("uncertainty") != mode
        ):
            current = False
    if not current or not study.source_sha256:
        return None
    started = time.perf_counter()
    try:
        labels = read_volume(study.output)
    except SpinesegError as error:
        logger.warning("%s: unreadable output, segmenting again (%s)", study.name, _scrub(str(error), study))
        return None
    expected = _source_size(study)
    if expected is None or labels.geometry.size != expected:
        logger.warning(
            "%s: output size %s differs from the study's %s, segmenting again",
            study.name,
            labels.geometry.size,
            expected,
        )
        return None
    volumes = class_volumes(labels, classes)
    return StudyResult(study.name, "skipped", time.perf_counter() - started, study.output.name, volumes)


def _damaged_own_output(path: Path) -> bool:
    """An output with a spineseg record that no longer reads (a killed copy, a truncated file)."""
    if read_record(path) is None:
        return False
    try:
        read_volume(path)
    except SpinesegError:
        return True
    return False


def class_volumes(labels: Volume, classes: Sequence[LabelClass]) -> dict[int, float]:
    """Class value -> volume (mL) of a label map, as :func:`review.review_labels` measures it."""
    from .review import review_labels

    review = review_labels(labels.array, labels.geometry, classes)
    return {summary.value: summary.volume_ml for summary in review.classes}


# The model, once per process -----------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A model as the client resolved it: the user's name, the file and its SHA-256."""

    name: str
    path: str
    digest: str

    @classmethod
    def resolve(cls, model: str | os.PathLike) -> ModelRef:
        path = resolve_model(model).resolve()
        return cls(str(model), str(path), file_sha256(path))


_PREDICTORS: dict[str, Predictor] = {}
_PREDICTOR_LOCK = threading.Lock()


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


def cached_predictor(model: ModelRef, settings: SegmentationSettings) -> Predictor:
    """This process's predictor for ``model`` and ``settings`` (loaded on first use, then kept).

    In a Dask worker, torch uses ``$SPINESEG_TORCH_THREADS`` threads, else one: each worker thread
    runs one study, so ``--nthreads`` × ``--nworkers`` should match the cores.  A worker whose model
    file differs from the client's (other path contents or version) refuses to run.
    """
    key = f"{model.digest}|{settings!r}"
    with _PREDICTOR_LOCK:
        predictor = _PREDICTORS.get(key)
        if predictor is not None:
            return predictor
        _PREDICTORS.clear()  # one model per process
        if _in_dask_worker():
            import torch

            threads = int(os.environ.get(TORCH_THREADS_ENV) or 1)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(max(1, threads))
        path = Path(model.path) if Path(model.path).is_file() else resolve_model(model.name)
        if file_sha256(path) != model.digest:
            raise ModelFileError(f"{path}: this worker's model file differs from the client's {model.name!r}")
        predictor = Predictor(settings)
        predictor.load(path)
        _PREDICTORS[key] = predictor
        logger.info("loaded model %s on %s (%s)", model.name, predictor.device, predictor.precision)
        return predictor


# One study -----------------------------------------------------------------------------------


def _scrub(message: str, study: Study) -> str:
    """An error message with the input/output directories cut away (file names only)."""
    for directory in sorted({str(study.source.parent), str(study.output.parent)}, key=len, reverse=True):
        message = message.replace(directory + os.sep, "")
    return " ".join(message.split())


def _read_study(study: Study) -> Volume:
    if study.series_id is None:
        return read_volume(study.source)
    from .io import read_series

    return read_series(study.source, study.series_id)


def segment_study(
    study: Study,
    model: ModelRef,
    settings: SegmentationSettings,
    write_uncertainty: bool = False,
    cancel: threading.Event | None = None,
) -> StudyResult:
    """Read, segment and write one study; user errors become ``error``, anything else ``failed``.

    The task function of distributed runs and the body of serial ones.  :class:`Cancelled`
    propagates (nothing is written).
    """
    started = time.perf_counter()
    try:
        from .preflight import check_segmentable

        predictor = cached_predictor(model, settings)
        volume = _read_study(study)
        check_segmentable(volume)
        result = predictor.predict(volume, cancel)
        assert predictor.model is not None
        record = dict(_binding(study, model, settings), source=str(study.source), model=model.name)
        with OutputSet() as outputs:
            if write_uncertainty and result.uncertainty is not None:
                mode = str(getattr(settings.uncertainty, "value", settings.uncertainty))
                unc = make_record("uncertainty", **record, uncertainty=mode)
                outputs.stage(study.uncertainty_output, lambda p: write_volume(result.uncertainty, p), unc)
            outputs.stage(study.output, lambda p: write_labels(result.labels, p), make_record("labels", **record))
            outputs.commit()
        # Measured on the file as written (float32 NIfTI spacing), so a later skipped run reports the same.
        volumes = class_volumes(read_volume(study.output), predictor.model.metadata.classes)
        return StudyResult(study.name, "done", time.perf_counter() - started, study.output.name, volumes)
    except Cancelled:
        raise
    except SpinesegError as error:
        return StudyResult(study.name, "error", time.perf_counter() - started, error=_scrub(str(error), study))
    except Exception as error:
        message = f"{type(error).__name__}: {_scrub(str(error), study)}"
        return StudyResult(study.name, "failed", time.perf_counter() - started, error=message)


# The report ----------------------------------------------------------------------------------


def volume_column(label_class: LabelClass) -> str:
    """``volume_ml_<class name>`` with the name lower-cased and non-alphanumerics as ``_``."""
    return "volume_ml_" + (re.sub(r"[^0-9a-z]+", "_", label_class.name.lower()).strip("_") or str(label_class.value))


class CohortReport:
    """The CSV report, rewritten atomically (at most every ``interval`` seconds, and on :meth:`flush`)."""

    def __init__(
        self, path: str | os.PathLike, studies: Sequence[Study], classes: Sequence[LabelClass], interval: float = 1.0
    ) -> None:
        self.path = Path(path)
        self.order = {study.name: index for index, study in enumerate(studies)}
        self.classes = [c for c in classes if c.value != 0]
        self.columns = ["study", "status", "seconds", "output", *(volume_column(c) for c in self.classes), "error"]
        self.rows: dict[str, StudyResult] = {}
        self.interval = interval
        self._written = -float("inf")

    def add(self, result: StudyResult) -> None:
        self.rows[result.study] = result
        if time.monotonic() - self._written >= self.interval:
            self.flush()

    def flush(self) -> None:
        from .errors import VolumeWriteError

        try:
            with atomic_path(self.path) as temp, open(temp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(self.columns)
                for result in sorted(self.rows.values(), key=lambda r: self.order.get(r.study, len(self.order))):
                    has_volumes = result.status in ("done", "skipped")
                    volumes = [
                        f"{result.volumes_ml.get(c.value, 0.0):.6f}" if has_volumes else "" for c in self.classes
                    ]
                    writer.writerow(
                        [result.study, result.status, f"{result.seconds:.3f}", result.output, *volumes, result.error]
                    )
        except OSError as error:
            raise VolumeWriteError(f"{self.path}: cannot write the report ({error.strerror or error})") from None
        self._written = time.monotonic()

    def results(self) -> list[StudyResult]:
        return sorted(self.rows.values(), key=lambda r: self.order.get(r.study, len(self.order)))


# Schedulers ----------------------------------------------------------------------------------


def local_workers(scheduler: str) -> int | None:
    """N for ``local:N`` (``local`` = one worker per CPU core), None for a scheduler address."""
    text = scheduler.strip().lower()
    if text != "local" and not text.startswith("local:"):
        return None
    if text == "local":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        workers = int(text.split(":", 1)[1])
    except ValueError:
        workers = 0
    if workers < 1:
        raise InputError(f"--scheduler {scheduler!r}: use local, local:N (N >= 1 workers) or a scheduler address")
    return workers


@contextlib.contextmanager
def _dask_logs_quiet() -> Iterator[None]:
    """Dask's INFO chatter (scheduler/nanny start and stop) only when the root logger is at INFO or below."""
    dask_logger = logging.getLogger("distributed")
    level = dask_logger.level
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        dask_logger.setLevel(max(logging.WARNING, level))
    try:
        yield
    finally:
        dask_logger.setLevel(level)


@contextlib.contextmanager
def open_client(scheduler: str, timeout: float = 30.0) -> Iterator[Client]:
    """A Dask client for ``local[:N]`` (a LocalCluster, closed on exit) or a scheduler address."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - distributed is a dependency
        raise InputError("distributed runs need the 'distributed' package (pip install 'dask[distributed]')") from None
    workers = local_workers(scheduler)
    with _dask_logs_quiet():
        if workers is not None:
            with (
                LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,  # no dashboard; its HTTP server on a free port, not 8787
                    scheduler_kwargs={"dashboard_address": ":0"},
                    silence_logs=logging.ERROR,
                ) as cluster,
                Client(cluster) as client,
            ):
                yield client
            return
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError, ValueError) as error:
            raise InputError(f"cannot connect to the Dask scheduler at {scheduler!r} ({error})") from None
        with client:
            yield client


# The cohort ----------------------------------------------------------------------------------


def segment_cohort(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    model: str | os.PathLike = DEFAULT_MODEL_NAME,
    settings: SegmentationSettings | None = None,
    scheduler: str | Client | None = None,
    report: str | os.PathLike | None = None,
    cancel: threading.Event | None = None,
    report_interval: float = 1.0,
    overwrite: bool = False,
) -> Generator[CohortProgress, None, list[StudyResult]]:
    """Segment every study under ``input_dir``, yielding a :class:`CohortProgress` per study.

    Complete outputs are skipped first; the rest run serially (``scheduler=None``) or one study
    per Dask task.  Closing the generator or setting ``cancel`` stops the run (pending tasks are
    cancelled; a LocalCluster is shut down); finished outputs and the report stay valid.  Returns
    the results in study order.  The model is resolved here, so a bad model stops everything
    before any study is read.  ``overwrite`` replaces output files that spineseg did not write
    (by default such a study is an ``error`` and the file is kept).
    """
    settings = settings or SegmentationSettings()
    model_ref = ModelRef.resolve(model)
    classes = read_metadata(model_ref.path).classes
    root = Path(input_dir).expanduser()
    output = Path(output_dir).expanduser() if output_dir is not None else root
    if volume_suffix(output) in VOLUME_SUFFIXES:
        raise InputError(f"{output}: a cohort needs an output directory, not a file")
    studies = discover_studies(root, output)
    if not studies:
        raise InputError(f"{root}: no studies found (volume files {', '.join(VOLUME_SUFFIXES)} or DICOM directories)")
    uncertainty = settings.uncertainty is not None
    studies = [replace(study, source_sha256=source_checksum(study)) for study in studies]
    writer = CohortReport(report or output / REPORT_NAME, studies, classes, report_interval)
    total, done = len(studies), 0
    results: Iterator[StudyResult] | None = None
    try:
        todo = []
        for study in studies:
            state = resume_state(study, classes, model_ref, settings, overwrite)
            if state is None:
                todo.append(study)
                continue
            writer.add(state)
            done += 1
            yield CohortProgress(state, done, total)
        writer.flush()
        if scheduler is None:
            results = (
                segment_study(study, model_ref, settings, uncertainty, cancel) for study in todo if _go_on(cancel)
            )
        else:
            results = _distributed_results(scheduler, todo, model_ref, settings, uncertainty, cancel)
        for result in results:
            writer.add(result)
            done += 1
            logger.info("%s: %s (%.1f s) %s", result.study, result.status, result.seconds, result.error)
            yield CohortProgress(result, done, total)
        _go_on(cancel)
    finally:
        if isinstance(results, Generator):
            results.close()  # cancels pending tasks and shuts a LocalCluster down now, not at garbage collection
        writer.flush()
    return writer.results()


def _go_on(cancel: threading.Event | None) -> bool:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cohort segmentation cancelled")
    return True


def _distributed_results(
    scheduler: str | Client,
    studies: Sequence[Study],
    model: ModelRef,
    settings: SegmentationSettings,
    uncertainty: bool,
    cancel: threading.Event | None,
) -> Iterator[StudyResult]:
    """Results of one task per study, in completion order; the client (if ours) closes at the end."""
    if not studies:
        return
    from distributed import wait

    with contextlib.ExitStack() as stack:
        client = stack.enter_context(open_client(scheduler)) if isinstance(scheduler, str) else scheduler
        futures = client.map(
            segment_study, studies, model=model, settings=settings, write_uncertainty=uncertainty, pure=False, retries=0
        )
        study_of: dict[Any, Study] = dict(zip(futures, studies))
        index_of = {future: index for index, future in enumerate(futures)}
        pending = set(futures)
        try:
            while pending:
                _go_on(cancel)
                try:
                    finished, pending = wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    continue
                for future in sorted(finished, key=index_of.__getitem__):
                    yield _task_result(future, study_of[future])
        finally:
            # Cancel every task, not just the pending ones: that also forgets the finished ones (their
            # results were taken), so the scheduler holds nothing of this run afterwards (newer
            # distributed releases a finished key only when asked).
            client.cancel(futures)
            del futures, study_of, index_of, pending


def _task_result(future: Any, study: Study) -> StudyResult:
    """The result of a finished task; a task that died with its worker is ``failed``."""
    try:
        return future.result()
    except Exception as error:
        return StudyResult(study.name, "failed", error=f"{type(error).__name__}: {_scrub(str(error), study)}")
