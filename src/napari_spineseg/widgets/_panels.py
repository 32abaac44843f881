"""Qt building blocks of the dock panels: a scrolling layout, tables sized to their rows, class legends."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel

from ..schema import LabelClass


def legend_html(classes: Iterable[LabelClass]) -> str:
    """Coloured swatches and names of the non-background classes."""
    rows = []
    for label_class in classes:
        if label_class.value == 0:
            continue
        r, g, b = (round(255 * c) for c in label_class.color[:3])
        rows.append(
            f"<span style='color:#{r:02x}{g:02x}{b:02x}; font-size:14pt'>&#9632;</span> "
            f"{label_class.value} {label_class.name}"
        )
    return "<br>".join(rows) or "<i>no classes</i>"


def legend_label() -> QLabel:
    label = QLabel()
    label.setTextFormat(Qt.TextFormat.RichText)
    label.setWordWrap(True)
    return label


def scrolling_layout(widget: Any) -> Any:
    """A vertical layout inside a scroll area filling ``widget`` (docks stay within the window)."""
    from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = QScrollArea(widget)
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    inner = QWidget(scroll)
    scroll.setWidget(inner)
    outer.addWidget(scroll)
    return QVBoxLayout(inner)


def fill_table(table: Any, headers: list[str], rows: list[list[Any]], max_rows: int = 8) -> None:
    """Replace a QTableWidget's content (read-only cells; floats shown with 2-3 decimals)."""
    from qtpy.QtWidgets import QHeaderView, QTableWidgetItem

    table.clear()
    table.setColumnCount(len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            if isinstance(value, float):
                text = "–" if value != value else "∞" if value == float("inf") else f"{value:.3g}"
            else:
                text = str(value)
            item = QTableWidgetItem(text)
            item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
            if isinstance(value, (int, float)):
                item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
            table.setItem(r, c, item)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    table.verticalHeader().setVisible(False)
    fit_height(table, max_rows)


def fit_height(table: Any, max_rows: int = 8) -> None:
    """Size a table to its rows (at most ``max_rows`` visible, then it scrolls)."""
    rows = min(table.rowCount(), max_rows)
    height = table.horizontalHeader().height() + 2 * table.frameWidth()
    height += sum(table.rowHeight(r) for r in range(rows)) or table.verticalHeader().defaultSectionSize()
    table.setFixedHeight(height + table.horizontalScrollBar().sizeHint().height() + 2)  # room for a scrollbar
