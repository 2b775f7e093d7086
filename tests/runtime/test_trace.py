"""A run's trace: one Chrome trace JSON with a track per rank."""

from __future__ import annotations

import json
import time

from rlinf import Channel, Worker


class Stage(Worker):
    def work(self, ch: Channel, n: int) -> int:
        if self.rank == 0:
            for i in range(n):
                time.sleep(0.01)
                ch.put(i)
            return n
        return sum(1 for _ in ch)


def test_trace_has_a_track_per_rank_with_calls_and_channel_waits(fresh_groups, tmp_path):
    cluster = fresh_groups
    ch = Channel("traced", maxsize=2)
    group = Stage.launch(cluster, [0, 1], name="stage")
    h = group.on(0).call(Stage.work, ch, 10)
    g = group.on(1).call(Stage.work, ch, 10)
    h.wait()
    ch.close()
    assert g.wait() == [10]
    path = cluster.write_trace(tmp_path / "trace.json")
    doc = json.loads(path.read_text())
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    assert {"driver", "stage rank 0", "stage rank 1"} <= names
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert any(e["name"] == "Stage.work" and e["cat"] == "call" for e in spans)
    assert any(e["name"] == "get traced" and e["cat"] == "channel" for e in spans)
    assert all(e["dur"] >= 0 for e in spans)
