"""Helpers for the core's long-running generators (progress events out, a result at the end)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

Result = TypeVar("Result")


def drain(generator: Generator[Any, Any, Result]) -> Result:
    """Run ``generator`` to the end, discarding its progress events; return its result."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value
