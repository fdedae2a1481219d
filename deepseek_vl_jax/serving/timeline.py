"""Where a serving run's wall time goes: spans (kind, thread, start, end) recorded by the engine loop and the HTTP
layer when a `Timeline` is attached (`Engine.timeline`; None, the default, records nothing and blocks on nothing).

With a timeline the engine waits for each program's result inside its span (`block_until_ready`), so a span is the
program's time, not its dispatch; this is for measuring, not serving. `summary()` sums each kind per thread and
names the engine thread's time not covered by any span (Python between the calls)."""

from __future__ import annotations

import collections
import contextlib
import threading
import time

import jax


class Timeline:
    def __init__(self):
        self.spans: list[tuple[str, str, float, float]] = []
        self._lock = threading.Lock()
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def span(self, kind: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            t1 = time.perf_counter()
            with self._lock:
                self.spans.append((kind, threading.current_thread().name, t0, t1))

    def run(self, kind: str, fn, *args):
        """fn(*args) inside a span, waiting for its device results."""
        with self.span(kind):
            return jax.block_until_ready(fn(*args))

    def reset(self) -> None:
        with self._lock:
            self.spans.clear()
            self.start = time.perf_counter()

    def summary(self, begin: float | None = None, end: float | None = None) -> dict:
        """Seconds per thread and kind within [begin, end] (perf_counter times; default: all), span counts, and the
        engine thread's wall time outside every span ("uncovered")."""
        with self._lock:
            spans = list(self.spans)
        begin = self.start if begin is None else begin
        end = time.perf_counter() if end is None else end
        total = collections.defaultdict(lambda: collections.defaultdict(float))
        count = collections.defaultdict(lambda: collections.defaultdict(int))
        for kind, thread, t0, t1 in spans:
            t0, t1 = max(t0, begin), min(t1, end)
            if t1 > t0:
                total[thread][kind] += t1 - t0
                count[thread][kind] += 1
        out = {"wall_s": end - begin, "threads": {}}
        for thread, kinds in total.items():
            entry = {k: {"s": round(v, 4), "calls": count[thread][k]} for k, v in sorted(kinds.items())}
            if thread == "dsvl-engine":
                entry["uncovered"] = {"s": round(end - begin - sum(kinds.values()), 4)}
            out["threads"][thread] = entry
        return out
