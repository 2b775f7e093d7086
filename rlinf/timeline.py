"""What a run's spans say: per-stage busy / waiting / switching shares, and a Gantt chart.

``write_run_report`` puts both into a run directory: ``summary.txt`` (the whole run and one
iteration) and ``timeline.png`` (a Gantt of that iteration).

A rank's time inside its method calls is split into:
    waiting on input   blocked in ``Channel.get`` (the stage before it is slower)
    waiting on output  blocked in ``Channel.put`` on a full channel (the stage after it is slower)
    switching          device-lock hand-overs: waiting for the devices, offload, onload
    busy               everything else inside the call: its own work
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rlinf.trace import Span, Track

CATEGORIES = ("busy", "waiting on input", "waiting on output", "switching")
_COLORS = {
    "busy": "#2e7d32",
    "waiting on input": "#f9a825",
    "waiting on output": "#c62828",
    "switching": "#6a1b9a",
}


@dataclass(frozen=True)
class StageTime:
    """Seconds a stage (all ranks of one track name prefix) spent in each category."""

    stage: str
    ranks: int
    call_s: float
    seconds: dict[str, float]

    def share(self, category: str) -> float:
        return self.seconds[category] / self.call_s if self.call_s > 0 else 0.0


def _category(span: Span) -> str | None:
    if span.cat == "channel":
        return "waiting on input" if span.name.startswith("get ") else "waiting on output"
    if span.cat in ("switch", "offload", "onload"):
        return "switching"
    return None


def _stage_of(track: str) -> str:
    return track.rsplit(" rank ", 1)[0]


def stage_summary(tracks: Sequence[Track]) -> list[StageTime]:
    """Per stage, the seconds in each category, summed over its ranks (the driver is left out)."""
    out: dict[str, StageTime] = {}
    for track in tracks:
        if " rank " not in track.name:
            continue
        calls = [s for s in track.spans if s.cat == "call" and not s.name.endswith(".__init__")]
        call_s = sum(s.end - s.start for s in calls)
        secs = dict.fromkeys(CATEGORIES, 0.0)
        for s in track.spans:
            cat = _category(s)
            if cat is None:
                continue
            # only time inside a method call counts: a rank idle between calls is not "waiting"
            inside = sum(max(0.0, min(s.end, c.end) - max(s.start, c.start)) for c in calls)
            secs[cat] += inside
        secs["switching"] = min(secs["switching"], call_s)
        secs["busy"] = max(0.0, call_s - secs["waiting on input"] - secs["waiting on output"] - secs["switching"])
        stage = _stage_of(track.name)
        prev = out.get(stage)
        if prev is None:
            out[stage] = StageTime(stage, 1, call_s, secs)
        else:
            merged = {k: prev.seconds[k] + secs[k] for k in CATEGORIES}
            out[stage] = StageTime(stage, prev.ranks + 1, prev.call_s + call_s, merged)
    return list(out.values())


def format_summary(stages: Sequence[StageTime]) -> str:
    """A table: one row per stage, seconds and % of its call time per category."""
    head = f"{'stage':<14} {'ranks':>5} {'in calls':>9}  " + "  ".join(f"{c:>19}" for c in CATEGORIES)
    lines = [head, "-" * len(head)]
    for st in stages:
        cells = "  ".join(f"{st.seconds[c]:8.2f} s ({100 * st.share(c):5.1f}%)" for c in CATEGORIES)
        lines.append(f"{st.stage:<14} {st.ranks:>5} {st.call_s:8.2f}s  {cells}")
    return "\n".join(lines)


def plot_gantt(
    tracks: Sequence[Track],
    path: str | os.PathLike[str],
    start: float | None = None,
    end: float | None = None,
    title: str | None = None,
) -> Path:
    """Draws one row per rank: busy, waiting and switching intervals between ``start`` and ``end``.

    Args:
        tracks: what ``Cluster.collect_tracks()`` returns.
        path: the PNG to write.
        start, end: seconds since the epoch; default the whole span of the method calls.
        title: a line above the chart.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [t for t in tracks if " rank " in t.name]
    calls = [s for t in ranks for s in t.spans if s.cat == "call" and not s.name.endswith(".__init__")]
    if not calls:
        raise ValueError("no method-call spans to draw; run a workflow before plotting its timeline.")
    t0 = min(s.start for s in calls) if start is None else start
    t1 = max(s.end for s in calls) if end is None else end
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.5))
    for row, track in enumerate(reversed(ranks)):
        track_calls = [s for s in track.spans if s.cat == "call" and not s.name.endswith(".__init__")]
        for s in track_calls:  # busy first; waits and switches are drawn over it
            a, b = max(s.start, t0), min(s.end, t1)
            if b > a:
                ax.broken_barh([(a - t0, b - a)], (row - 0.4, 0.8), color=_COLORS["busy"])
                if b - a > 0.08 * (t1 - t0):  # name the call where there is room for it
                    label = s.name.rsplit(".", 1)[-1]
                    ax.text(a - t0 + 0.005 * (t1 - t0), row + 0.28, label, fontsize=7, color="white", va="center")
        for s in track.spans:
            cat = _category(s)
            a, b = max(s.start, t0), min(s.end, t1)
            if cat is None or b <= a:
                continue
            ax.broken_barh([(a - t0, b - a)], (row - 0.4, 0.8), color=_COLORS[cat])
    ax.set_yticks(range(len(ranks)), [t.name for t in reversed(ranks)])
    ax.set_xlabel("seconds")
    ax.set_xlim(0, t1 - t0)
    if title:
        ax.set_title(title, fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=_COLORS[c]) for c in CATEGORIES]
    fig.legend(handles, CATEGORIES, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))  # room below the axes for the legend
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---- one iteration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IterationWindow:
    """The time one iteration took, as seen from the anchor rank (seconds since the epoch).

    Args:
        index: which iteration (0-based) among ``count`` found.
        count: iterations found in the trace.
        start: start of the first call on the anchor rank after the previous iteration's anchor call.
        end: end of this iteration's anchor call.
    """

    index: int
    count: int
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def iteration_windows(tracks: Sequence[Track], stage: str = "actor", method: str = "train") -> list[IterationWindow]:
    """Cuts the run into iterations, one per ``method`` call on rank 0 of ``stage``.

    An iteration starts with the first call on that rank after the previous ``method`` call ended
    (in the LLM workflows: ``publish_weights``, which closes the step before) and ends when its ``method``
    call ends. Calls of one rank never overlap, so the windows are disjoint and in order.

    Args:
        tracks: what ``Cluster.collect_tracks()`` returns.
        stage: the anchor component (the track ``<stage> rank 0``).
        method: the method whose calls close an iteration.

    Returns:
        The windows in time order; empty if the anchor rank never ran ``method``.
    """
    anchor = next((t for t in tracks if t.name == f"{stage} rank 0"), None)
    if anchor is None:
        return []
    calls = sorted(_calls(anchor), key=lambda s: s.start)
    bounds: list[tuple[float, float]] = []
    opened: float | None = None
    for call in calls:
        if opened is None:
            opened = call.start
        if call.name.rsplit(".", 1)[-1] == method:
            bounds.append((opened, call.end))
            opened = None
    return [IterationWindow(i, len(bounds), a, b) for i, (a, b) in enumerate(bounds)]


def representative_window(windows: Sequence[IterationWindow]) -> IterationWindow | None:
    """The middle iteration (the second of two): past the first one's warm-up, before the end."""
    return windows[len(windows) // 2] if windows else None


def clip_tracks(tracks: Sequence[Track], start: float, end: float) -> list[Track]:
    """The same tracks with every span cut to ``[start, end]``; spans outside it are dropped."""
    out = []
    for t in tracks:
        spans = [replace(s, start=max(s.start, start), end=min(s.end, end)) for s in t.spans]
        out.append(Track(t.name, [s for s in spans if s.end > s.start], t.sort_index))
    return out


def read_chrome_trace(path: str | os.PathLike[str]) -> list[Track]:
    """Reads a trace written by ``Cluster.write_trace`` back into tracks (times in seconds)."""
    doc = json.loads(Path(path).read_text())
    names: dict[int, str] = {}
    spans: dict[int, list[Span]] = {}
    for e in doc.get("traceEvents", []):
        if e.get("ph") == "M" and e.get("name") == "process_name":
            names[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "X":
            start = e["ts"] / 1e6
            span = Span(e["name"], e.get("cat", ""), start, start + e["dur"] / 1e6, e.get("tid", 0), e.get("args"))
            spans.setdefault(e["pid"], []).append(span)
    return [Track(name, spans.get(pid, []), pid) for pid, name in sorted(names.items())]


# ---- the run directory's report ------------------------------------------------------------------

_LEGEND = (
    "busy: the stage's own work inside its method calls; waiting on input: blocked in Channel.get (the stage "
    "before it is slower);\nwaiting on output: blocked on a full channel (backpressure: the stage after it is "
    "slower); switching: device-lock hand-overs (waiting for the devices, offload, onload)."
)


def run_report(
    tracks: Sequence[Track], stage: str = "actor", method: str = "train"
) -> tuple[str, IterationWindow | None]:
    """The text of ``summary.txt``: where each stage's time went over the whole run and in one iteration.

    Args:
        tracks: what ``Cluster.collect_tracks()`` returns.
        stage: the component whose ``method`` calls mark iterations (see ``iteration_windows``).
        method: the method that closes an iteration.

    Returns:
        (the text, the iteration shown, or ``None`` when the anchor never ran ``method``).
    """
    window = representative_window(iteration_windows(tracks, stage, method))
    parts = ["where each stage's time went, whole run (seconds and % of its time inside method calls)"]
    parts.append(format_summary(stage_summary(tracks)))
    if window is not None:
        k = window.index + 1
        first = f"the call after {method} call {k - 1}" if k > 1 else "its first call"
        parts.append(
            f"\none iteration: {k} of {window.count}, {window.seconds:.2f} s ({stage} rank 0 from {first} "
            f"to the end of {method} call {k}; drawn in timeline.png)"
        )
        parts.append(format_summary(stage_summary(clip_tracks(tracks, window.start, window.end))))
    else:
        parts.append(f"\nno {stage}.{method} call in the trace: timeline.png shows the whole run")
    parts.append("\n" + _LEGEND)
    return "\n".join(parts) + "\n", window


def write_run_report(
    tracks: Sequence[Track], run_dir: str | os.PathLike[str], stage: str = "actor", method: str = "train"
) -> str:
    """Writes ``summary.txt`` and ``timeline.png`` (a Gantt of one middle iteration) into ``run_dir``.

    Args:
        tracks: what ``Cluster.collect_tracks()`` returns (the same tracks the trace is written from).
        run_dir: the run directory.
        stage: the component whose ``method`` calls mark iterations.
        method: the method that closes an iteration.

    Returns:
        The summary text, for printing at the end of the run.
    """
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    text, window = run_report(tracks, stage, method)
    if any(_calls(t) for t in tracks if " rank " in t.name):
        if window is None:
            plot_gantt(tracks, out / "timeline.png", title="whole run")
        else:
            title = f"iteration {window.index + 1} of {window.count} ({window.seconds:.2f} s)"
            plot_gantt(tracks, out / "timeline.png", window.start, window.end, title=title)
    else:
        text += "no worker ran a method call: no timeline.png\n"
    (out / "summary.txt").write_text(text)
    return text


def _calls(track: Track) -> list[Span]:
    return [s for s in track.spans if s.cat == "call" and not s.name.endswith(".__init__")]
