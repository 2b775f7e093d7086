"""Per-stage summaries and the Gantt chart, from synthetic spans with known numbers."""

from __future__ import annotations

import pytest

from rlinf.timeline import format_summary, plot_gantt, stage_summary
from rlinf.trace import Span, Track


def _span(name: str, cat: str, start: float, end: float) -> Span:
    return Span(name, cat, start, end, thread=1)


def test_stage_summary_by_hand(tmp_path):
    # rollout rank 0: a 10 s call with 2 s blocked on a full output channel and 1 s switching
    # actor rank 0: a 10 s call with 4 s waiting for input; a 5 s wait outside any call is ignored
    tracks = [
        Track("driver", [_span("x", "call", 0, 100)]),
        Track(
            "rollout rank 0",
            [
                _span("Rollout.generate", "call", 0, 10),
                _span("put samples", "channel", 3, 5),
                _span("switch", "switch", 6, 7),
            ],
        ),
        Track(
            "actor rank 0",
            [
                _span("Actor.train", "call", 0, 10),
                _span("get samples", "channel", 0, 4),
                _span("get samples", "channel", 20, 25),
            ],
        ),
        Track("actor rank 1", [_span("Actor.train", "call", 0, 10)]),
    ]
    stages = {s.stage: s for s in stage_summary(tracks)}
    assert set(stages) == {"rollout", "actor"}
    r = stages["rollout"]
    assert r.seconds == {"busy": 7.0, "waiting on input": 0.0, "waiting on output": 2.0, "switching": 1.0}
    a = stages["actor"]
    assert a.ranks == 2 and a.call_s == 20.0
    assert a.seconds["waiting on input"] == 4.0 and a.seconds["busy"] == 16.0
    assert a.share("waiting on input") == pytest.approx(0.2)
    assert "waiting on output" in format_summary(list(stages.values()))
    png = plot_gantt(tracks, tmp_path / "gantt.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gantt_without_calls_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no method-call spans"):
        plot_gantt([Track("driver", [])], tmp_path / "x.png")
