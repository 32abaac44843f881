"""``spineseg segment`` of single studies: every output planned and checked before any segmentation.

Before the model runs, each study's outputs (labels, ``--dicom-seg``, ``--uncertainty``) are
named and checked (:mod:`napari_spineseg.outputs`): derived names that clash within the run get
``-2``, ``-3``, ...; an output that is an input file, a slice of a source series, another output
of the run, a name too long, an unknown format, or an existing file spineseg did not write is
refused in one line and nothing is segmented.  Studies that cannot be segmented (constant, no
finite value) are refused one by one.  Each study's outputs are renamed into place together.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, SpinesegError
from .outputs import (
    OutputSet,
    check_name_fits,
    check_replaceable,
    data_files,
    file_sha256,
    files_sha256,
    fit_name,
    make_record,
    path_key,
    settings_record,
    shown,
    unique_paths,
)


@dataclass
class Job:
    """One study of a ``segment`` run and where its outputs go."""

    item: str  # the INPUT argument it comes from
    index: int  # its position among the volumes of ``item``
    name: str
    source: Path  # the study file or DICOM series directory
    files: list[Path]  # every file of the study (never written)
    stem: str  # the derived output name (without ``_seg.nii.gz``)
    labels: Path = Path()
    dicom_seg: Path | None = None
    uncertainty: Path | None = None
    levels: Path | None = None  # the level map (its JSON sidecar beside it)
    outputs: list[tuple[str, Path]] = field(default_factory=list)

    @property
    def series_dir(self) -> Path | None:
        return self.source if self.source.is_dir() else None


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text).strip("_") or "series"


def _job_of(item: str, index: int, volume: Any, several_volumes: bool) -> Job:
    from .io import strip_suffix

    source = Path(volume.path)
    dicom = [Path(f) for f in volume.metadata.get("dicom_files") or ()]
    files = dicom or [source, *data_files(source)]
    stem = _safe(volume.name) if several_volumes or source.is_dir() else strip_suffix(source)
    return Job(item, index, volume.name, source, files, fit_name(stem))


def _discover(inputs: list[str]) -> tuple[list[Job], dict[str, list[Any]], int]:
    """The studies of ``inputs``: DICOM inputs (and a single input) are read now, other files later."""
    from .io import is_dicom_file, read_volumes, strip_suffix

    jobs: list[Job] = []
    kept: dict[str, list[Any]] = {}
    failures = 0
    for item in inputs:
        path = Path(item).expanduser()
        if len(inputs) > 1 and not path.is_dir() and not is_dicom_file(path):
            stem = strip_suffix(path)
            jobs.append(Job(item, 0, stem, path, [path, *data_files(path)], fit_name(stem)))
            continue
        try:
            volumes = read_volumes(item)
        except SpinesegError as error:
            failures += 1
            print(f"spineseg: error: {error}", file=sys.stderr)
            continue
        if len(inputs) == 1:
            kept[item] = volumes
        jobs += [_job_of(item, i, v, len(volumes) > 1) for i, v in enumerate(volumes)]
    return jobs, kept, failures


def as_directory(option: str, what: str) -> bool:
    """Whether an output option names a directory; refuses an unknown file extension."""
    from .io import DICOM_SUFFIXES, volume_suffix

    path = Path(option).expanduser()
    suffix = volume_suffix(path)
    if (suffix and suffix not in DICOM_SUFFIXES) or suffix == ".dcm":
        return False
    if path.is_dir() or option.endswith(("/", os.sep)) or (not path.exists() and not path.suffix):
        return True
    if path.exists() and not path.suffix:
        raise InputError(f"{what} {shown(option)}: an existing file that is neither a directory nor a known format")
    raise InputError(
        f"{what} {shown(option)}: unknown output format {path.suffix!r} (use .nii.gz, .nii, .mha, .mhd, .nrrd, "
        ".nhdr or .dcm; a new directory needs a name without an extension or a trailing /)"
    )


def plan_outputs(jobs: list[Job], args: argparse.Namespace) -> None:
    """Name every output of ``jobs`` (labels, DICOM-SEG, uncertainty); InputError for a bad option."""
    from .io import volume_suffix

    several = len(jobs) > 1
    if args.output and not as_directory(args.output, "-o"):
        output = Path(args.output).expanduser()
        if several:
            raise InputError(f"{shown(output)}: several studies need an output directory, not a file")
        jobs[0].labels = output
    else:
        directory = Path(args.output).expanduser() if args.output else None
        folders = [directory or (j.source if j.source.is_dir() else j.source.parent) for j in jobs]
        derived = [folder / f"{j.stem}_seg.nii.gz" for folder, j in zip(folders, jobs)]
        for job, path in zip(jobs, unique_paths(derived)):
            job.labels = path
    for job in jobs:
        name = job.labels.name
        suffix = "_seg.nii.gz" if name.endswith("_seg.nii.gz") else volume_suffix(name)
        base = name[: -len(suffix)] if suffix else name
        if args.dicom_seg:
            seg = Path(args.dicom_seg).expanduser()
            if seg.is_dir() or as_directory(args.dicom_seg, "--dicom-seg"):
                job.dicom_seg = seg / f"{base}.dcm"
            elif several:
                raise InputError(f"--dicom-seg {shown(seg)}: several studies need a directory for their DICOM-SEGs")
            elif volume_suffix(seg) != ".dcm":
                raise InputError(f"--dicom-seg {shown(seg)}: a DICOM Segmentation file must end in .dcm")
            else:
                job.dicom_seg = seg
        if args.uncertainty:
            unc = Path(args.uncertainty).expanduser()
            if as_directory(args.uncertainty, "--uncertainty"):
                job.uncertainty = unc / f"{base}_uncertainty.nii.gz"
            elif several:
                raise InputError(f"--uncertainty {shown(unc)}: several studies need a directory for their maps")
            elif volume_suffix(unc) == ".dcm":
                raise InputError(f"--uncertainty {shown(unc)}: an uncertainty map cannot be a DICOM file")
            else:
                job.uncertainty = unc
        if getattr(args, "levels", None):
            job.levels = _levels_path(args.levels, base, several)
        named = (("labels", job.labels), ("DICOM-SEG", job.dicom_seg), ("uncertainty", job.uncertainty))
        job.outputs = [(what, path) for what, path in named if path is not None]
        if job.levels is not None:
            from .levels import sidecar_path

            job.outputs += [("level map", job.levels), ("level sidecar", sidecar_path(job.levels))]


def _levels_path(option: str, base: str, several: bool) -> Path:
    """Where ``--levels`` puts a study's level map: the file given, or ``<base>_levels.nii.gz`` in a directory."""
    from .io import LABEL_SUFFIXES, volume_suffix

    path = Path(option).expanduser()
    if as_directory(option, "--levels"):
        return path / f"{base}_levels.nii.gz"
    if several:
        raise InputError(f"--levels {shown(path)}: several studies need a directory for their level maps")
    if volume_suffix(path) not in LABEL_SUFFIXES:
        raise InputError(f"--levels {shown(path)}: a level map is a label file ({', '.join(LABEL_SUFFIXES)})")
    return path


def check_outputs(jobs: list[Job], overwrite: bool) -> None:
    """Refuse outputs that are inputs, source-series files, another output, too long or someone else's."""
    from .io import volume_suffix

    inputs: dict[str, Job] = {}
    inodes: dict[tuple[int, int], Job] = {}
    for job in jobs:
        for path in job.files:
            inputs[path_key(path)] = job
            try:
                stat = path.stat()
                inodes[(stat.st_dev, stat.st_ino)] = job
            except OSError:
                pass
    series_dirs = {path_key(j.series_dir): j for j in jobs if j.series_dir is not None}
    seen: dict[str, str] = {}
    for job in jobs:
        for what, path in job.outputs:
            check_name_fits(path)
            for candidate in (path, *data_files(path)):
                owner = inputs.get(path_key(candidate))
                if owner is None and candidate.exists():
                    stat = candidate.stat()
                    owner = inodes.get((stat.st_dev, stat.st_ino))
                if owner is not None:
                    raise InputError(
                        f"{shown(candidate)}: is a file of the input study {shown(owner.source, 80)}; "
                        f"refusing to write the {what} over it"
                    )
            if volume_suffix(path) == ".dcm" and path_key(path.parent) in series_dirs:
                raise InputError(
                    f"{shown(path)}: refusing to write a DICOM file into the source series folder "
                    "(it would become part of the series); choose another folder"
                )
            key = path_key(path)
            if key in seen:
                raise InputError(f"{shown(path)}: named for both the {seen[key]} and the {what} of {job.name[:60]}")
            seen[key] = f"{what} of {job.name[:60]}"
            check_replaceable(path, overwrite, source=str(job.source.resolve()))


def _source_checksum(job: Job) -> str:
    try:
        return file_sha256(job.files[0]) if len(job.files) == 1 or not job.series_dir else files_sha256(job.files)
    except OSError:
        return ""


def _write_outputs(job: Job, volume: Any, result: Any, model: Any, record: dict[str, Any], levels: Any = None) -> None:
    """Write the outputs of one study together (see :class:`~napari_spineseg.outputs.OutputSet`)."""
    from .dicomseg import write_dicom_seg
    from .io import volume_suffix, write_labels, write_volume

    def dicom_seg(path: Path) -> None:
        write_dicom_seg(result.labels, volume, path, model_metadata=model.metadata)

    with OutputSet() as outputs:
        if volume_suffix(job.labels) == ".dcm":
            outputs.stage(job.labels, dicom_seg, make_record("dicom-seg", **record))
        else:
            outputs.stage(job.labels, lambda p: write_labels(result.labels, p), make_record("labels", **record))
        if job.dicom_seg is not None:
            outputs.stage(job.dicom_seg, dicom_seg, make_record("dicom-seg", **record))
        if job.uncertainty is not None and result.uncertainty is not None:
            unc = make_record("uncertainty", **record)
            outputs.stage(job.uncertainty, lambda p: write_volume(result.uncertainty, p), unc)
        if job.levels is not None and levels is not None:
            _stage_levels(outputs, job.levels, levels, result.labels.geometry, record)
        outputs.commit()


def _stage_levels(outputs: OutputSet, path: Path, levels: Any, geometry: Any, record: dict[str, Any]) -> None:
    """Stage the level map and its JSON sidecar (renamed together with the study's other outputs)."""
    import json

    from .io import write_labels
    from .levels import result_record, sidecar_path

    text = json.dumps(result_record(levels), indent=2) + "\n"
    outputs.stage(path, lambda p: write_labels(levels.level_map, p, geometry), make_record("levels", **record))
    outputs.stage(
        sidecar_path(path), lambda p: p.write_text(text, encoding="utf-8"), make_record("levels-sidecar", **record)
    )


def run_with_progress(predictor: Any, volume: Any, quiet: bool) -> Any:
    """Drain ``predictor.run(volume)`` behind a percentage bar on stderr (none when ``quiet``)."""
    from tqdm import tqdm

    with tqdm(total=100, desc=volume.name[:30], unit="%", leave=False, disable=quiet) as bar:
        generator = predictor.run(volume)
        while True:
            try:
                event = next(generator)
            except StopIteration as stop:
                return stop.value
            bar.n = round(100 * event.fraction)
            bar.set_postfix_str(event.plane or event.stage)
            bar.refresh()


def _segment_job(job: Job, volume: Any, predictor: Any, model: Any, args: argparse.Namespace, common: dict) -> None:
    from .dicomseg import require_dicom_source
    from .io import volume_suffix
    from .preflight import check_segmentable, preflight

    check_segmentable(volume)
    for warning in preflight(volume):
        if warning.code not in ("reader", "constant"):
            print(f"spineseg: warning: {job.name[:60]}: {warning}", file=sys.stderr)
    if volume_suffix(job.labels) == ".dcm" or job.dicom_seg is not None:
        require_dicom_source(volume)  # before the (slow) segmentation
    result = run_with_progress(predictor, volume, args.quiet)
    record = dict(common, source=str(job.source.resolve()), source_sha256=_source_checksum(job))
    levels = None
    if job.levels is not None:
        from .levels import identify_levels

        levels = identify_levels(result.labels)
    _write_outputs(job, volume, result, model, record, levels)
    if levels is not None:
        named = " ".join(i.name for i in levels.instances if i.kind == "body" and i.name)
        print(f"{job.name}: levels {named if levels.named else f'uncertain ({levels.reason})'} -> {job.levels}")
    if job.dicom_seg is not None:
        print(f"{job.name}: DICOM-SEG -> {job.dicom_seg}")
    print(f"{job.name}: {result.seconds:.1f} s -> {job.labels}")
    from .plausibility import segmentation_warnings

    for warning in segmentation_warnings(result.labels, volume, model.metadata.classes):
        print(f"spineseg: warning: {job.name[:60]}: {warning}", file=sys.stderr)


def run_segment(args: argparse.Namespace, settings: Any) -> int:
    """``spineseg segment`` of files and DICOM series (not cohort directories); the exit status."""
    from .inference import Predictor
    from .io import read_volumes

    predictor = Predictor(settings)
    model = predictor.load(args.model)  # model problems stop everything before any study is read
    print(f"model {model.metadata.name} on {predictor.device} ({predictor.precision})", file=sys.stderr)
    jobs, kept, failures = _discover(list(args.inputs))
    if not jobs:
        return 1
    plan_outputs(jobs, args)
    check_outputs(jobs, bool(getattr(args, "overwrite", False)))
    common = {
        "model": model.metadata.name,
        "model_sha256": file_sha256(model.path) if getattr(model, "path", None) else "",
        "settings": settings_record(settings),
    }
    for item, group in itertools.groupby(jobs, key=lambda j: j.item):
        group = list(group)
        try:
            volumes = kept.get(item) or read_volumes(item)
        except SpinesegError as error:
            failures += len(group)
            print(f"spineseg: error: {error}", file=sys.stderr)
            continue
        for job in group:
            try:
                if job.index >= len(volumes):
                    raise InputError(f"{shown(item)}: changed while the run was being planned")
                _segment_job(job, volumes[job.index], predictor, model, args, common)
            except SpinesegError as error:
                failures += 1
                print(f"spineseg: error: {job.name[:60]}: {error}", file=sys.stderr)
    return 1 if failures else 0
