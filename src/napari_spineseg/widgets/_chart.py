"""A live training chart (loss and per-class validation Dice) for a dock widget.

Drawing is the only GUI-thread cost of training, so it is kept small: the axes are fixed when a
run starts (steps ``0..total``, Dice ``0..1``, loss on a log scale ``0.01..10``), drawn once, and
afterwards only the lines are re-drawn over the saved background (matplotlib blitting), at most
every ``min_interval`` seconds.  The latest points are drawn a little later, never dropped.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QVBoxLayout, QWidget

_BACKGROUND = "#262930"  # napari's dark theme
_FOREGROUND = "#d6d0ce"
_LOSS_RANGE = (0.01, 10.0)


class TrainingChart(QWidget):
    """Training loss (top) and validation Dice per class (bottom) against the step."""

    def __init__(self, parent: QWidget | None = None, min_interval: float = 0.5) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

        self.min_interval = float(min_interval)
        self.figure = Figure(figsize=(4.0, 3.2), dpi=90, facecolor=_BACKGROUND)
        self.figure.subplots_adjust(left=0.16, right=0.97, top=0.96, bottom=0.13, hspace=0.2)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(240)
        self.loss_axes, self.dice_axes = self.figure.subplots(2, 1, sharex=True)
        for axes, label in ((self.loss_axes, "loss"), (self.dice_axes, "Dice")):
            axes.set_facecolor(_BACKGROUND)
            axes.tick_params(colors=_FOREGROUND, labelsize=7)
            axes.set_ylabel(label, color=_FOREGROUND, fontsize=8)
            axes.grid(True, color="#4a4d55", linewidth=0.5)
            for spine in axes.spines.values():
                spine.set_color(_FOREGROUND)
        self.loss_axes.set_yscale("log")
        # Few ticks, plain labels: every tick is a set of artists built on the first drawing (no
        # log-scale minor ticks, no mathtext "10^-1"), which is what that drawing costs.
        self.loss_axes.yaxis.set_major_locator(FixedLocator([0.01, 0.1, 1.0, 10.0]))
        self.loss_axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
        self.loss_axes.yaxis.set_minor_locator(NullLocator())
        self.dice_axes.yaxis.set_major_locator(FixedLocator([0.0, 0.5, 1.0]))
        self.dice_axes.xaxis.set_major_locator(MaxNLocator(4, integer=True))
        self.dice_axes.set_xlabel("step", color=_FOREGROUND, fontsize=8)
        (self._loss_line,) = self.loss_axes.plot([], [], color="#ffa726", linewidth=1, animated=True)
        self._background: Any = None
        self.canvas.mpl_connect("draw_event", self._on_full_draw)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.draws = 0  # line updates
        self.full_draws = 0
        self._scheduled = False
        self._dice_lines: dict[str, Any] = {}
        self.colours: dict[str, Any] = {}
        self.reset(1, {})

    def reset(self, total_steps: int, colours: Mapping[str, tuple[float, ...]]) -> None:
        """Start a run: fix the axes and create one Dice line per class (``colours``: name → RGBA)."""
        self.loss: list[tuple[int, float]] = []
        self.dice: dict[str, list[tuple[int, float]]] = {}
        for line in self._dice_lines.values():
            line.remove()
        self._dice_lines = {}
        self.colours = dict(colours)
        for name in colours:
            self._line(f"corrected/{name}")
        self.loss_axes.set_xlim(0, max(1, int(total_steps)))
        self.loss_axes.set_ylim(*_LOSS_RANGE)
        self.dice_axes.set_ylim(-0.02, 1.02)
        self._last_draw = 0.0
        self._dirty = False
        self._background = None  # drawn in a later event-loop turn (not in the Start click) or by redraw()
        self.canvas.draw_idle()

    def add(self, step: int, loss: float | None = None, dice: Mapping[str, float] | None = None) -> None:
        """Record points (cheap); draws now or schedules a drawing."""
        if loss is not None:
            self.loss.append((int(step), float(loss)))
        for name, value in (dice or {}).items():
            self.dice.setdefault(name, []).append((int(step), float(value)))
        self._dirty = True
        if not self.redraw() and not self._scheduled:
            self._scheduled = True
            QTimer.singleShot(int(1000 * self.min_interval), self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        self.redraw(force=True)

    def redraw(self, force: bool = False) -> bool:
        """Re-draw the lines if something changed and the last drawing is old enough (or ``force``)."""
        now = time.perf_counter()
        if not self._dirty or (not force and now - self._last_draw < self.min_interval):
            return False
        self._last_draw, self._dirty = now, False
        if self.loss:
            self._loss_line.set_data(*zip(*self.loss))
        else:
            self._loss_line.set_data([], [])
        needs_axes = False
        for key, points in self.dice.items():
            self._line(key).set_data(*zip(*points))
        steps = [s for s, _ in self.loss]
        if steps and max(steps) > self.loss_axes.get_xlim()[1]:
            self.loss_axes.set_xlim(0, max(steps))
            needs_axes = True
        if needs_axes or self._background is None:
            self._full_draw()
        else:
            self.canvas.restore_region(self._background)
            self._draw_lines()
            self.canvas.blit(self.figure.bbox)
        self.draws += 1
        return True

    def _line(self, key: str) -> Any:
        """The line of ``"<group>/<class>"`` (dashed for the fixed validation set)."""
        line = self._dice_lines.get(key)
        if line is None:
            group, _, name = key.rpartition("/")
            style = "--" if group == "fixed" else "-"
            (line,) = self.dice_axes.plot(
                [], [], style, marker="o", markersize=3, color=self.colours.get(name), animated=True
            )
            self._dice_lines[key] = line
        return line

    def _full_draw(self) -> None:
        self.canvas.draw()  # triggers _on_full_draw
        self.full_draws += 1

    def _on_full_draw(self, _event: Any) -> None:
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._draw_lines()

    def _draw_lines(self) -> None:
        self.loss_axes.draw_artist(self._loss_line)
        for line in self._dice_lines.values():
            self.dice_axes.draw_artist(line)
