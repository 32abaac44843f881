"""Output safety for the ``segment`` command and cohort runs: nothing of the user's is replaced.

The rules (checked before any segmentation):

* an output is never an input study, one of its files (a detached data file, a slice of the
  source DICOM series) nor, for a ``.dcm`` output, inside a source series folder (it would join
  the series on the next read);
* two outputs of one run never share a path (derived names get ``-2``, ``-3``, ...; paths the
  user gave are refused);
* an existing file is replaced only when spineseg wrote it: every output gets a provenance
  record, the hidden sidecar ``.<name>.spineseg.json`` (source and model checksums, settings and
  the output's own SHA-256).  A file without a record, or changed since (a label map the user
  corrected and saved), is the user's and is replaced only with ``--overwrite``;
* names fit the file system (with room for the temporary names of atomic writes).

Outputs of one study are written to a hidden folder beside their destinations and renamed
together at the end with SIGINT held off, so an interrupt leaves the old set or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import InputError, SpinesegError
from .provenance import file_sha256

RECORD_SUFFIX = ".spineseg.json"
RECORD_TOOL = "napari-spineseg"
MAX_STEM_CHARS = 100  # derived names (series descriptions, relative paths) are cut to this
NAME_ROOM = 48  # bytes kept free under NAME_MAX for ``.<name>.<pid>.<random>.part<suffix>``
STALE_PENDING_SECONDS = 15 * 60
DETACHED_DATA = {".mhd": (".raw", ".zraw"), ".nhdr": (".raw", ".raw.gz")}


def shown(path: str | os.PathLike, limit: int = 120) -> str:
    """``path`` for a one-line message: long paths keep their start and end."""
    text = str(path)
    return text if len(text) <= limit else f"{text[: limit // 2 - 2]}...{text[-(limit // 2 - 1) :]}"


def fit_name(stem: str, limit: int = MAX_STEM_CHARS) -> str:
    """``stem`` cut to ``limit`` characters; a cut name ends in 8 hex digits of the whole one's hash."""
    if len(stem) <= limit:
        return stem
    digest = hashlib.sha256(stem.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{stem[: limit - 9].rstrip('._-')}-{digest}"


def name_max(directory: Path) -> int:
    """The longest file name (bytes) the file system of ``directory`` (or its nearest parent) takes."""
    for parent in (directory, *directory.parents):
        if parent.exists():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                return int(os.pathconf(parent, "PC_NAME_MAX"))
            break
    return 255


def check_name_fits(path: Path) -> None:
    """Refuse a path with a component too long for the file system (with room for temporaries)."""
    limit = name_max(path.parent)
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise InputError(f"{shown(path)}: a name in this path is longer than {limit} bytes")
    if len(os.fsencode(path.name)) + NAME_ROOM > limit:
        raise InputError(
            f"{shown(path)}: the file name is too long ({len(os.fsencode(path.name))} bytes; "
            f"at most {limit - NAME_ROOM} here)"
        )


def files_sha256(paths: Iterable[str | os.PathLike]) -> str:
    """One SHA-256 over several files (a DICOM series) in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file (links and case-insensitive file systems included)."""
    with contextlib.suppress(OSError, ValueError):
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    return path_key(a) == path_key(b)


def path_key(path: str | os.PathLike) -> str:
    """A comparison key of a (maybe not yet existing) path: real path, case-folded."""
    return os.path.normcase(os.path.realpath(os.path.expanduser(path))).casefold()


def data_files(path: Path) -> list[Path]:
    """The data files a detached header (``.mhd``/``.nhdr``) ``path`` may come with (maybe absent)."""
    from .io import strip_suffix, volume_suffix

    stem = strip_suffix(path)
    found = [path.with_name(stem + suffix) for suffix in DETACHED_DATA.get(volume_suffix(path), ())]
    if path.is_file():
        with contextlib.suppress(OSError):
            for line in path.read_bytes()[:65536].decode("latin-1").splitlines():
                key, sep, value = line.partition("=" if "=" in line else ":")
                if sep and key.strip().lower() in ("elementdatafile", "data file", "datafile"):
                    value = value.strip()
                    if value and value.upper() not in ("LOCAL", "LIST") and "%" not in value:
                        found.append(path.parent / value.split()[0])
    return found


# Provenance records ---------------------------------------------------------------------------


def record_path(path: str | os.PathLike) -> Path:
    """The hidden sidecar holding the provenance record of output ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}{RECORD_SUFFIX}")


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance record of output ``path``, or None (absent, unreadable, not ours)."""
    try:
        record = json.loads(record_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("written_by") == RECORD_TOOL else None


def owned_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record of ``path`` when spineseg wrote the file as it is now (its SHA-256 matches), else None."""
    record = read_record(path)
    if record is None or not Path(path).is_file():
        return None
    try:
        return record if record.get("sha256") == file_sha256(path) else None
    except OSError:
        return None


def make_record(kind: str, **fields: Any) -> dict[str, Any]:
    """A provenance record (``sha256`` of the output is filled in when it is written)."""
    from . import __version__

    return {"written_by": RECORD_TOOL, "version": __version__, "kind": kind, **fields}


def check_replaceable(path: Path, overwrite: bool, source: str | None = None) -> None:
    """Refuse to replace an existing ``path`` unless spineseg wrote it (for ``source``) or ``overwrite``."""
    if path.is_dir():
        raise InputError(f"{shown(path)}: is a directory, not an output file")
    if not path.exists() and not path.is_symlink():
        return
    if overwrite:
        return
    record = owned_record(path)
    if record is None:
        raise InputError(
            f"{shown(path)}: exists and was not written by spineseg (or was changed since); "
            "not replaced: choose another output or add --overwrite"
        )
    if source is not None and record.get("source") and not same_path(record["source"], source):
        raise InputError(
            f"{shown(path)}: holds the output of another study ({shown(record['source'], 80)}); "
            "not replaced: choose another output or add --overwrite"
        )


# Writing a study's outputs together ----------------------------------------------------------


def _remove_stale_pending(directory: Path) -> None:
    """Remove staging folders of detached outputs that a killed run left (process gone, 15 minutes old)."""
    with contextlib.suppress(OSError):
        for entry in directory.glob(".*.part"):
            pid = entry.name.rsplit(".", 3)[-3] if entry.name.count(".") >= 3 else ""
            if not entry.is_dir() or not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
                continue
            except ProcessLookupError:
                pass
            except OSError:
                continue
            if time.time() - entry.stat().st_mtime > STALE_PENDING_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)


class OutputSet:
    """The outputs of one study: written to hidden temporaries, then renamed into place together.

    ``stage(path, write, record)`` calls ``write(temporary)``: a hidden ``.<name>.<pid>.<random>.part<suffix>``
    beside ``path`` (for detached ``.mhd``/``.nhdr`` pairs, ``<name>`` inside such a hidden folder).
    :meth:`commit` writes each record then renames each file (data files before their header) with
    SIGINT held off.  Leaving the ``with`` block without a commit removes everything staged, so an
    error or an interrupt leaves the previous outputs as they were.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path, dict[str, Any]]] = []
        self._temporaries: list[Path] = []

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, *exc: object) -> None:
        for temp in self._temporaries:
            if temp.is_dir():
                shutil.rmtree(temp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    temp.unlink()
        self._temporaries.clear()

    def stage(self, destination: Path, write: Callable[[Path], Any], record: dict[str, Any]) -> None:
        from .io import volume_suffix

        destination.parent.mkdir(parents=True, exist_ok=True)
        suffix = volume_suffix(destination) or destination.suffix
        token = f".{destination.name}.{os.getpid()}.{os.urandom(4).hex()}.part"
        if suffix in DETACHED_DATA:
            _remove_stale_pending(destination.parent)
            folder = destination.parent / token
            folder.mkdir()
            self._temporaries.append(folder)
            temp = folder / destination.name
        else:
            temp = destination.parent / f"{token}{suffix}"
            self._temporaries.append(temp)
        try:
            write(temp)
        except SpinesegError as error:  # name the destination, not the temporary file
            raise type(error)(str(error).replace(str(temp), str(destination))) from None
        self._staged.append((temp, destination, dict(record, sha256=file_sha256(temp))))

    def commit(self) -> list[Path]:
        """Move every staged output into place (records first); returns the destinations."""
        with _sigint_held():
            for temp, destination, record in self._staged:
                _write_record(destination, record)
                if temp.parent == destination.parent:
                    os.replace(temp, destination)
                    continue
                for item in [*(d for d in data_files(temp) if d.is_file()), temp]:  # the header last
                    os.replace(item, destination.parent / item.name)
        return [destination for _, destination, _ in self._staged]


def _write_record(destination: Path, record: dict[str, Any]) -> None:
    from .io import atomic_path

    with atomic_path(record_path(destination)) as temp:
        temp.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold SIGINT off (main thread, POSIX); a Ctrl-C pressed meanwhile is delivered afterwards."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def unique_paths(paths: Sequence[Path], taken: Iterable[str] = ()) -> list[Path]:
    """``paths`` with clashes (case-insensitive, after resolving) renamed ``<stem>-2<suffix>``, ``-3``, ..."""
    from .io import strip_suffix, volume_suffix

    used = set(taken)
    result = []
    for path in paths:
        candidate, count = path, 1
        while path_key(candidate) in used:
            count += 1
            suffix = volume_suffix(path) or path.suffix
            stem = strip_suffix(path) if volume_suffix(path) else path.stem
            marker = "_seg" if stem.endswith("_seg") else ""
            base = stem[: -len(marker)] if marker else stem
            candidate = path.with_name(f"{base}-{count}{marker}{suffix}")
        used.add(path_key(candidate))
        result.append(candidate)
    return result


def settings_record(settings: Any) -> dict[str, Any]:
    """The parts of :class:`~napari_spineseg.inference.SegmentationSettings` that change the labels."""
    return {
        "planes": [str(getattr(p, "value", p)) for p in settings.planes],
        "fusion": str(getattr(settings.fusion, "value", settings.fusion)),
        "postprocess": bool(settings.postprocess),
        "lesion_gate": bool(settings.lesion_gate),
        "plane_weights": settings.plane_weights,
    }
