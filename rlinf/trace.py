"""Spans recorded in every process and written as one Chrome/Perfetto trace."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_EVENTS = 200_000  # per process; older spans are kept, newer ones are counted as dropped


@dataclass(frozen=True)
class Span:
    """One timed interval. Times are seconds since the epoch (comparable across processes)."""

    name: str
    cat: str  # "call", "channel", "switch", "offload", "onload", "compute", ...
    start: float
    end: float
    thread: int
    args: dict[str, Any] | None = None


class Tracer:
    """Collects spans of one process; thread-safe."""

    def __init__(self) -> None:
        self._spans: list[tuple[str, str, float, float, int, dict[str, Any] | None]] = []
        self._lock = threading.Lock()
        self.dropped = 0
        self.enabled = True

    def add(self, name: str, cat: str, start: float, end: float, args: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        # kept as a tuple until drained: building the frozen Span costs more than all the rest
        record = (name, cat, start, end, threading.get_ident(), args)
        with self._lock:
            if len(self._spans) >= MAX_EVENTS:
                self.dropped += 1
            else:
                self._spans.append(record)

    @contextmanager
    def span(self, name: str, cat: str, args: dict[str, Any] | None = None) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.add(name, cat, start, time.time(), args)

    def drain(self) -> list[Span]:
        """Returns the spans recorded so far and forgets them."""
        with self._lock:
            records, self._spans = self._spans, []
        return [Span(*r) for r in records]


_tracer = Tracer()


def tracer() -> Tracer:
    """The tracer of the current process."""
    return _tracer


@dataclass(frozen=True)
class Track:
    """The spans of one process, shown as one track (e.g. ``ActorWorker rank 0``)."""

    name: str
    spans: Sequence[Span]
    sort_index: int = 0


def chrome_trace(tracks: Sequence[Track]) -> dict[str, Any]:
    """Builds a Chrome trace-event document: one process track per entry, one row per thread."""
    events: list[dict[str, Any]] = []
    for pid, track in enumerate(tracks, start=1):
        events.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": track.name}})
        events.append({"ph": "M", "pid": pid, "name": "process_sort_index", "args": {"sort_index": pid}})
        threads: dict[int, int] = {}
        for s in track.spans:
            tid = threads.setdefault(s.thread, len(threads))
            events.append(
                {
                    "ph": "X",
                    "pid": pid,
                    "tid": tid,
                    "name": s.name,
                    "cat": s.cat,
                    "ts": s.start * 1e6,
                    "dur": max(0.0, s.end - s.start) * 1e6,
                    "args": s.args or {},
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str | os.PathLike[str], tracks: Sequence[Track]) -> Path:
    """Writes ``tracks`` as a Chrome trace JSON (opens in ui.perfetto.dev or chrome://tracing)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(chrome_trace(tracks)))
    tmp.replace(out)
    return out
