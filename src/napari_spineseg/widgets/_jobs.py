"""Background jobs of the dock widgets: notifications, thread workers, event-loop turns, warm-up.

Nothing here imports torch.  Workers run generators built by the widgets; they receive plain
arrays and geometry (never layers or widgets) and report through :class:`Outcome`, so an error
becomes one notification line and never a traceback dialog.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import Cancelled, SpinesegError

logger = logging.getLogger(__name__)


def notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


@dataclass
class Outcome:
    """How a job ended: a value, a one-line error, or cancelled."""

    value: Any = None
    error: str | None = None
    cancelled: bool = False


_IMPORT_LOCK = threading.Lock()  # one warm-up at a time: torch must not be imported by two threads at once


def guarded(job: Callable[[], Generator[Any, None, Any]], what: str) -> Generator[Any, None, Outcome]:
    """Run ``job()`` (a generator) and turn its end into an :class:`Outcome` (never raises)."""
    with _IMPORT_LOCK:  # let a running warm-up finish its imports first (no two threads import torch)
        pass
    try:
        value = yield from job()
    except Cancelled:
        return Outcome(cancelled=True)
    except SpinesegError as error:
        return Outcome(error=str(error))
    except MemoryError:
        return Outcome(error=f"{what}: not enough memory")
    except Exception as error:  # a bug must not take the viewer down
        logger.exception("%s failed", what)
        return Outcome(error=f"{what}: unexpected error ({type(error).__name__}: {error})")
    return Outcome(value)


def start_job(
    job: Callable[[], Generator[Any, None, Any]],
    what: str,
    on_yield: Callable[[Any], None],
    on_done: Callable[[Outcome], None],
    sync: bool = False,
):
    """Run ``job`` in a napari thread worker (or drain it here when ``sync``).

    ``on_yield``/``on_done`` always run on the GUI thread.  Returns the worker (``None`` if sync).
    ``worker.quit()`` ends the job at its next yield and reports it as cancelled.
    """
    if sync:
        generator = guarded(job, what)
        while True:
            try:
                on_yield(next(generator))
            except StopIteration as stop:
                on_done(stop.value)
                return None
    from napari.qt.threading import create_worker

    worker = create_worker(guarded, job, what, _start_thread=False)
    worker.yielded.connect(on_yield)
    worker.returned.connect(on_done)
    worker.aborted.connect(lambda: on_done(Outcome(cancelled=True)))
    worker.start()
    return worker


# Imported the first time a Labels/Image layer is added (pandas for features, the label colormap
# helpers): loading them in the background keeps adding the first result layer short.
LAYER_MODULES = ("pandas", "skimage", "skimage.color.colorconv", "skimage.exposure", "scipy.linalg")


#: Pause between two GUI turns: a timer (not a posted event) lets Qt paint, take input and fire
#: other timers in between (a chain of posted events runs before the timers of the same loop pass).
TURN_PAUSE_MS = 1


def in_event_loop_turns(turns: Iterator[Any], finish: Callable[[], None], sync: bool = False) -> None:
    """Advance ``turns`` (a generator: each ``yield`` ends a turn) one event-loop turn at a time.

    Then call ``finish`` (always, even after an error).  Adding a layer costs tens of milliseconds
    in napari/vispy; splitting the work keeps every turn short.  ``sync`` runs them all now
    (tests, scripts).
    """

    def run() -> None:
        while True:
            try:
                next(turns)
            except StopIteration:
                finish()
                return
            except Exception as error:  # a broken step must not leave the widget "running"
                logger.exception("showing the result failed")
                notify_error(f"showing the result failed: {error}")
                finish()
                return
            if not sync:
                from qtpy.QtCore import QTimer

                QTimer.singleShot(TURN_PAUSE_MS, run)
                return

    run()


def warm_up(
    modules: Iterable[str],
    on_done: Callable[[], None] | None = None,
    parent: Any = None,
    then: Sequence[Callable[[], None]] = (),
) -> threading.Event:
    """Import ``modules`` in a background thread; the returned event is set when they are loaded.

    torch, pandas (napari's Labels features) and ``torch._dynamo`` (imported by every torch
    optimizer) take seconds to import: done on first use they would freeze the viewer.
    ``then`` (Qt-free first-use work, e.g. :func:`._layers.prepare_layers`) runs in the same
    thread after the imports.  ``on_done`` runs on the GUI thread afterwards, polled by a timer
    owned by ``parent`` (so a widget closed meanwhile is never called back).  The thread is a
    daemon with no Qt objects: closing the viewer while it imports is safe.
    """
    done = threading.Event()

    def job() -> None:
        with _IMPORT_LOCK:
            for name in modules:
                if name in sys.modules:
                    continue
                try:
                    importlib.import_module(name)
                except Exception as error:  # reported when the module is really needed
                    logger.warning("cannot import %s: %s", name, error)
            for work in then:
                try:
                    work()
                except Exception as error:  # only a speed-up
                    logger.warning("warm-up %s failed: %s", getattr(work, "__name__", work), error)
        done.set()

    if not then and all(name in sys.modules for name in modules):
        done.set()
    else:
        threading.Thread(target=job, name="spineseg-warm-up", daemon=True).start()
    if on_done is not None:
        if done.is_set():
            on_done()
        else:
            from qtpy.QtCore import QTimer

            timer = QTimer(parent)
            timer.setInterval(100)

            def poll() -> None:
                if done.is_set():
                    timer.stop()
                    on_done()

            timer.timeout.connect(poll)
            timer.start()
    return done
