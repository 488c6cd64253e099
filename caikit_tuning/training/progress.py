"""Where training progress goes besides the log: a worker process reports it upward.

A job runner sets a sink; the loop calls `report` after each logged step. With no
sink set, reporting costs nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

_SINK: contextvars.ContextVar[Callable[[dict], None] | None] = contextvars.ContextVar(
    "training_progress_sink", default=None
)


@contextlib.contextmanager
def progress_sink(sink: Callable[[dict], None]) -> Iterator[None]:
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def report(entry: dict) -> None:
    sink = _SINK.get()
    if sink is not None:
        sink(entry)
