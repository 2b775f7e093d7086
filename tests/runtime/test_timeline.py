"""Per-stage summaries, iteration windows and the Gantt chart from synthetic spans with known numbers;
the report a tiny GRPO run writes into its run directory."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from rlinf.timeline import (
    CATEGORIES,
    clip_tracks,
    format_summary,
    iteration_windows,
    plot_gantt,
    read_chrome_trace,
    representative_window,
    stage_summary,
    write_run_report,
)
from rlinf.trace import Span, Track, write_chrome_trace


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


def _actor_steps() -> Track:
    """Three steps (push_weights then train), a checkpoint save, and the final push before evaluation."""
    return Track(
        "actor rank 0",
        [
            _span("ActorWorker.__init__", "call", -5, -1),
            _span("ActorWorker.push_weights", "call", 0, 1),
            _span("ActorWorker.train", "call", 1, 5),
            _span("ActorWorker.save_checkpoint", "call", 5.5, 5.8),
            _span("ActorWorker.push_weights", "call", 6, 7),
            _span("ActorWorker.train", "call", 7, 10),
            _span("ActorWorker.push_weights", "call", 11, 12),
            _span("ActorWorker.train", "call", 12, 15),
            _span("ActorWorker.push_weights", "call", 16, 16.5),
        ],
    )


def test_iteration_windows_by_hand():
    tracks = [
        Track("driver", [_span("x", "call", 0, 100)]),
        Track("actor rank 1", [_span("ActorWorker.train", "call", 2, 3)]),  # only rank 0 marks iterations
        _actor_steps(),
    ]
    windows = iteration_windows(tracks)
    # an iteration opens with the first call after the previous train (the checkpoint save is in the 2nd)
    assert [(w.start, w.end) for w in windows] == [(0, 5), (5.5, 10), (11, 15)]
    assert [(w.index, w.count) for w in windows] == [(0, 3), (1, 3), (2, 3)]
    middle = representative_window(windows)
    assert middle is not None and (middle.index, middle.seconds) == (1, 4.5)
    assert representative_window(windows[:2]) == windows[1]  # of two: the second, past warm-up
    assert representative_window(windows[:1]) == windows[0]
    assert representative_window([]) is None
    assert iteration_windows(tracks, stage="critic") == []
    assert iteration_windows(tracks, method="score") == []


def test_clip_tracks_cuts_and_drops_spans():
    track = Track("rollout rank 0", [_span("a", "call", 0, 4), _span("b", "call", 5, 9), _span("c", "call", 12, 13)])
    [clipped] = clip_tracks([track], 3, 6)
    assert [(s.name, s.start, s.end) for s in clipped.spans] == [("a", 3, 4), ("b", 5, 6)]


def test_run_report_summarises_the_whole_run_and_the_middle_iteration(tmp_path):
    rollout = Track(
        "rollout rank 0",
        [
            _span("RolloutWorker.generate", "call", 1, 4),
            _span("RolloutWorker.generate", "call", 7.5, 9.5),
            _span("put samples", "channel", 8, 8.5),  # backpressure inside the 2nd iteration
            _span("switch", "switch", 7.5, 7.75),
        ],
    )
    tracks = [Track("driver", []), rollout, _actor_steps()]
    text = write_run_report(tracks, tmp_path)
    assert (tmp_path / "summary.txt").read_text() == text
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    whole, rest = text.split("one iteration: ", 1)
    assert rest.startswith("2 of 3, 4.50 s")
    # whole run: rollout 5 s in calls, 4.25 s busy; in the iteration [5.5, 10]: 2 s in calls, 1.25 s busy
    row = next(line for line in whole.splitlines() if line.startswith("rollout"))
    assert row.split()[1:4] == ["1", "5.00s", "4.25"]
    row = next(line for line in rest.splitlines() if line.startswith("rollout"))
    assert row.split()[1:4] == ["1", "2.00s", "1.25"]
    assert "0.50 s ( 25.0%)" in row and "0.25 s ( 12.5%)" in row  # waiting on output, switching
    row = next(line for line in rest.splitlines() if line.startswith("actor"))
    assert row.split()[1:3] == ["1", "4.30s"]  # save_checkpoint 0.3 s + push 1 s + train 3 s


def test_run_report_without_iterations_draws_the_whole_run(tmp_path):
    tracks = [Track("train rank 0", [_span("Stage.generate", "call", 0, 2)])]
    text = write_run_report(tracks, tmp_path)
    assert "no actor.train call in the trace" in text
    assert (tmp_path / "timeline.png").is_file()


def test_chrome_trace_round_trip_keeps_the_summary(tmp_path):
    tracks = [Track("driver", []), _actor_steps(), Track("rollout rank 0", [_span("get x", "channel", 1, 2)])]
    back = read_chrome_trace(write_chrome_trace(tmp_path / "trace.json", tracks))
    assert [t.name for t in back] == ["driver", "actor rank 0", "rollout rank 0"]
    assert [(s.name, s.cat) for s in back[1].spans] == [(s.name, s.cat) for s in tracks[1].spans]
    for got, want in zip(stage_summary(back), stage_summary(tracks), strict=True):
        assert got.stage == want.stage and got.call_s == pytest.approx(want.call_s)
        assert got.seconds == pytest.approx(want.seconds)


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_math_tiny.yaml"


def _row(text: str, stage: str) -> list[float]:
    """``in calls`` then the seconds of each category, from a stage's row of a summary table."""
    line = next(line for line in text.splitlines() if line.startswith(stage + " "))
    call_s = re.search(r"([\d.]+)s ", line)
    assert call_s is not None, line
    return [float(call_s.group(1))] + [float(x) for x in re.findall(r"([\d.]+) s \(\s*[\d.]+%\)", line)]


def test_tiny_grpo_run_writes_summary_and_timeline(cluster, tmp_path, capsys):
    from rlinf.models import build_tiny_model
    from tests.workflows._tiny_run import metric_records, run_tiny

    model_dir = build_tiny_model(tmp_path / "tiny-nano", size="nano", seed=0)
    run_dir = tmp_path / "run"
    assert run_tiny("grpo", EXAMPLE, model_dir, run_dir) == 0
    text = (run_dir / "summary.txt").read_text()
    assert text in capsys.readouterr().out  # printed at the end of the run
    whole, iteration = text.split("one iteration: ", 1)
    assert iteration.startswith("2 of 2, ")  # steps=2: the second step, past warm-up
    for part in (whole, iteration):
        assert all(c in part for c in ("busy", "waiting on input", "waiting on output", "switching"))
        for stage in ("rollout", "reward", "actor"):
            call_s, *seconds = _row(part, stage)
            assert call_s > 0 and sum(seconds) == pytest.approx(call_s, abs=0.03)
    # the whole-run table is the summary of the trace written beside it
    for st in stage_summary(read_chrome_trace(run_dir / "trace.json")):
        call_s, *seconds = _row(whole, st.stage)
        assert call_s == pytest.approx(st.call_s, abs=0.006)
        assert seconds == pytest.approx([st.seconds[c] for c in CATEGORIES], abs=0.006)
    png = (run_dir / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 800 and height > 200
    # the reward worker reports the micro-batches it took: 8 groups per step on one rank
    _, steps = metric_records(run_dir)
    for r in steps:
        assert r["reward/micro_batch_mean"] * r["reward/micro_batches"] == pytest.approx(8)
        assert 1 <= r["reward/micro_batch_min"] <= r["reward/micro_batch_max"] <= 8
