"""Signals held while the store is written: a Ctrl-C or SIGTERM waits until the write is whole.

Apart from writes.py because opening a store (location.open_store) holds them too while the write
path imports location: in writes.py, location and writes would import each other.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_HELD_DURING_WRITES = [signal.SIGINT, signal.SIGTERM]


def hold_during_writes(signum: int) -> None:
    """Hold `signum` too while the store is written (a scheduler's requeue signal, see cli.py)."""
    if signum not in _HELD_DURING_WRITES:
        _HELD_DURING_WRITES.append(signum)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C or SIGTERM until the block ends, so no write to the store is cut off halfway.

    MLflow's SQLite sessions roll back on Exception, not on KeyboardInterrupt; an interrupt in
    the middle of one can leave a transaction open that the KILLED status update then waits on.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list = []
    held = tuple(_HELD_DURING_WRITES)
    previous = {s: signal.signal(s, lambda *args: received.append(args)) for s in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        signum, frame = received[0]
        handler = previous[signum]
        if callable(handler):  # the handler we stood in for sees the signal too
            handler(signum, frame)
        if signum == signal.SIGINT and handler != signal.SIG_IGN:
            raise KeyboardInterrupt
        if signum == signal.SIGTERM and handler == signal.SIG_DFL:
            signal.raise_signal(signum)  # its default, now restored: the process ends
