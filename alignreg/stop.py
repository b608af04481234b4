"""Graceful stop on SIGTERM (SLURM preemption, ``kill``) and Ctrl-C (SIGINT).

Either signal sets a flag; the training loop finishes the step it is in, writes a checkpoint and returns,
so the same command resumes the run (``resume: auto`` / ``resume: true``). A second Ctrl-C stops at once
(``KeyboardInterrupt``, the step in progress is lost, the last checkpoint is not).
"""
from __future__ import annotations

import signal
import sys
from typing import Optional

_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}


def exit_code(stopped_by: Optional[str]) -> int:
    """Exit code of a command whose run ended normally (None) or stopped by ``stopped_by``: 0 after SIGTERM
    (a batch script requeues the job), 130 after Ctrl-C, as for any interrupted command."""
    return 130 if stopped_by == "Ctrl-C" else 0


class GracefulStop:
    """Context manager: installs the handlers (main thread only; elsewhere it is inert) and restores the
    previous ones on exit. ``requested``: a stop was asked for; ``name``: by which signal."""

    def __init__(self):
        self.name: Optional[str] = None
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.name is not None

    def __enter__(self) -> "GracefulStop":
        for sig in _NAMES:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be handled here
                self._old.clear()
                break
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        if self.name is None:
            self.name = _NAMES[signum]
            if signum == signal.SIGINT:
                sys.stderr.write("\nCtrl-C: finishing the current step, then writing a checkpoint "
                                 "(press Ctrl-C again to stop at once)\n")
                sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
