"""SIGINT / SIGTERM during training: finish the current step, save a checkpoint on every host, stop.

TPU VMs are preempted with SIGTERM; Ctrl-C sends SIGINT. The first signal only sets a flag that the loop reads
after each step (the hosts agree on it with one all-gather, so all of them save the same step collectively); a
second signal interrupts at once (KeyboardInterrupt), without saving.
"""

from __future__ import annotations

import logging
import signal
import threading

import numpy as np

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context manager that turns the first SIGINT/SIGTERM into `self.signum` (handlers restored on exit).
    Installs nothing outside the main thread (signal handlers can only be set there)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: finishing this step, then saving a checkpoint (again to stop at once)",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def agreed(self) -> bool:
        """True on every process when any process was asked to stop (one all-gather when multi-host)."""
        import jax

        local = self.signum is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([float(local)]))
        return bool(np.asarray(flags).sum() > 0)
