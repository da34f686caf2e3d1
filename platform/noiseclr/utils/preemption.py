"""SIGTERM as a preemption notice (a spot instance's, a scheduler's): the training loop finishes
the step it is in, writes a checkpoint and stops with `errors.Preempted`, instead of dying
between checkpoints and losing every step since the last one."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_REQUESTED = threading.Event()


def requested() -> bool:
    """Whether a SIGTERM arrived while `notice` was in force."""
    return _REQUESTED.is_set()


@contextmanager
def notice() -> Iterator[None]:
    """Turn SIGTERM into a request to stop at the next step boundary, for the duration. Only the
    main thread can install a signal handler; elsewhere (a Ray Tune trial's thread) SIGTERM keeps
    its default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _REQUESTED.clear()
    previous = signal.signal(signal.SIGTERM, lambda *_: _REQUESTED.set())
    try:
        yield
    finally:
        # None: the previous handler was not installed from Python; the default is the nearest
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        _REQUESTED.clear()
