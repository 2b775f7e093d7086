"""What a run's spans say: per-stage busy / waiting / switching shares, and a Gantt chart.

A rank's time inside its method calls is split into:
    waiting on input   blocked in ``Channel.get`` (the stage before it is slower)
    waiting on output  blocked in ``Channel.put`` on a full channel (the stage after it is slower)
    switching          device-lock hand-overs: waiting for the devices, offload, onload
    busy               everything else inside the call: its own work
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
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
    tracks: Sequence[Track], path: str | os.PathLike[str], start: float | None = None, end: float | None = None
) -> Path:
    """Draws one row per rank: busy, waiting and switching intervals between ``start`` and ``end``.

    Args:
        tracks: what ``Cluster.collect_tracks()`` returns.
        path: the PNG to write.
        start, end: seconds since the epoch; default the whole span of the method calls.
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
        for s in track.spans:
            cat = _category(s)
            a, b = max(s.start, t0), min(s.end, t1)
            if cat is None or b <= a:
                continue
            ax.broken_barh([(a - t0, b - a)], (row - 0.4, 0.8), color=_COLORS[cat])
    ax.set_yticks(range(len(ranks)), [t.name for t in reversed(ranks)])
    ax.set_xlabel("seconds")
    ax.set_xlim(0, t1 - t0)
    handles = [plt.Rectangle((0, 0), 1, 1, color=_COLORS[c]) for c in CATEGORIES]
    ax.legend(handles, CATEGORIES, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4, frameon=False)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
