"""Ctrl-C that stops a search only where stopping is safe.

A KeyboardInterrupt raised inside a storage call (an SQLite transaction half done) leaves the session holding
its lock, and the clean-up that marks the candidates in flight as interrupted then fails with "database is
locked"; one raised inside a finalizer (a garbage-collected SQLAlchemy object) is dropped by Python and the
search would run on. So the handler raises at once only while the search waits on its workers with no storage
code on the stack; otherwise it remembers the press and ``check`` (called at the next safe point) raises it.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

STORAGE_MODULES = ("sqlalchemy", "optuna", "sqlite3")


def _runs_storage_code(frame: FrameType | None) -> bool:
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(STORAGE_MODULES):
            return True
        frame = frame.f_back
    return False


class CtrlC:
    """Installed with ``with``; outside it (a library caller) Python's own Ctrl-C handling applies."""

    def __init__(self) -> None:
        self.pressed = False
        self._waiting = False

    def __enter__(self) -> CtrlC:
        self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._on_unraisable
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        signal.signal(signal.SIGINT, self._previous_handler)
        sys.unraisablehook = self._previous_hook

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.pressed = True
        if self._waiting and not _runs_storage_code(frame):
            raise KeyboardInterrupt

    def _on_unraisable(self, unraisable: sys.UnraisableHookArgs) -> None:
        if not (self.pressed and unraisable.exc_type is KeyboardInterrupt):  # ours is raised again by check
            self._previous_hook(unraisable)

    def check(self) -> None:
        """Raise the remembered Ctrl-C: call where nothing is half written."""
        if self.pressed:
            raise KeyboardInterrupt

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Where Ctrl-C may stop at once: waiting on workers (an in-process worker's merge and evaluation)."""
        self.check()
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False
