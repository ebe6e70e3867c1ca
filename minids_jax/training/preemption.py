"""Stopping cleanly: SIGTERM/SIGINT end the run after the current step instead of killing it,
and every process of a multi-process job agrees on the step at which to stop.

    with StopGuard() as guard:
        for each step: ...; if guard.requested(): save and leave

A second signal acts as it would without the guard (SIGINT: KeyboardInterrupt), or a second
SIGINT calls `on_second_interrupt` (the command line's exit, cli.exit_interrupted).
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopGuard:
    def __init__(self, on_second_interrupt: Callable[[], None] | None = None):
        self.on_second_interrupt = on_second_interrupt
        self.signal: int | None = None  # the signal that asked to stop, once one has
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopGuard:
        if threading.current_thread() is threading.main_thread():  # else Python forbids it
            self._previous = {signum: signal.signal(signum, self._on_signal)
                              for signum in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def _on_signal(self, signum, frame) -> None:
        # Under the command line a second Ctrl-C exits 130 at once from here: a
        # KeyboardInterrupt raised inside this handler was seen to end the process by the
        # signal now and then, without the CLI's one-line message.
        if self.signal is not None:  # asked twice: give up on saving, act as before
            if signum == signal.SIGINT and self.on_second_interrupt is not None:
                self.on_second_interrupt()
            previous = self._previous.get(signum)
            if callable(previous):  # e.g. Python's SIGINT handler: KeyboardInterrupt
                previous(signum, frame)
                return
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signal = signum
        print(f"{self.name} received: finishing the current step and saving a checkpoint "
              f"(send it again to stop at once, without saving).", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether to stop after this step; in a multi-process job, if any process was asked
        (all must stop, and save, at the same step)."""
        stop = self.signal is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            stop = bool(np.any(multihost_utils.process_allgather(np.int32(stop))))
            if stop and self.signal is None:
                self.signal = signal.SIGTERM
        return stop
