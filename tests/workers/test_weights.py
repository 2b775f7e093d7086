"""Sending weights to a worker group through a channel."""

from __future__ import annotations

import threading
import time

import torch

from rlinf import Channel, Worker
from rlinf.workers.weights import (
    clear_published,
    newest_state,
    publish_state,
    rank_weights_channel,
    receive_state,
    send_state,
)


class Holder(Worker):
    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.version = -1

    def load(self, state: dict[str, torch.Tensor] | Channel, version: int) -> None:
        self.state = receive_state(state, version)
        self.version = version

    def pull(self, need: int) -> int:
        state, self.version = newest_state(rank_weights_channel(self.group_name, self.rank), self.version, need)
        if state is not None:
            self.state = state
        return self.version

    def summary(self) -> tuple[int, dict[str, float]]:
        return self.version, {k: float(v.sum()) for k, v in self.state.items()}


def test_every_rank_gets_its_copy_and_stale_copies_are_skipped(fresh_groups):
    cluster = fresh_groups
    holders = Holder.launch(cluster, [0, 1], name="holders")
    big = {"w": torch.ones(512, 512), "b": torch.arange(10, dtype=torch.float32)}  # 1 MiB: through shared memory
    # a copy left behind by a sync that failed half-way: older version, must not be loaded
    stale = {"w": torch.zeros(512, 512), "b": torch.zeros(10)}
    Channel(f"rlinf/weights/{holders.name}", maxsize=0).put(stale, version=2)
    send_state(holders, Holder.load, big, version=3)
    assert holders.call(Holder.summary).wait() == [(3, {"w": 512.0 * 512, "b": 45.0})] * 2
    # the next sync finds the channel empty again and works the same way
    send_state(holders, Holder.load, {"w": torch.full((512, 512), 2.0), "b": torch.ones(10)}, version=4)
    assert holders.call(Holder.summary).wait() == [(4, {"w": 2.0 * 512 * 512, "b": 10.0})] * 2


def test_a_plain_state_passes_through():
    state = {"w": torch.ones(2)}
    assert receive_state(state, 0) is state


def test_a_pull_takes_the_newest_copy_and_waits_only_for_a_version_it_needs(cluster):
    ch = rank_weights_channel("pull-test", 0)
    assert newest_state(ch, have=0, need=0) == (None, 0)  # nothing published, nothing needed: no wait
    for v in (1, 2):
        ch.put({"w": torch.full((2,), float(v))}, version=v)
    state, version = newest_state(ch, have=0, need=1)
    assert version == 2 and state is not None and state["w"].tolist() == [2.0, 2.0]
    assert ch.qsize() == 0  # the older copy was dropped, not left behind
    ch.put({"w": torch.ones(2)}, version=2)
    assert newest_state(ch, have=2, need=2) == (None, 2)  # not newer than what we have
    threading.Timer(0.3, lambda: ch.put({"w": torch.zeros(2)}, version=3)).start()
    start = time.monotonic()
    state, version = newest_state(ch, have=2, need=3)  # must wait for version 3
    assert version == 3 and time.monotonic() - start >= 0.25
    # copies an earlier run left behind are dropped by the next rank of that name before it pulls
    ch.put({"w": torch.ones(2)}, version=9)
    assert clear_published("pull-test", 0) == 1 and ch.qsize() == 0


def test_published_weights_reach_every_rank_when_it_pulls(fresh_groups):
    holders = Holder.launch(fresh_groups, [0, 1], name="pullers")
    holders.call(Holder.pull, -1).wait()  # nothing yet, nothing needed (a Holder starts at version -1)
    publish_state(holders, {"w": torch.ones(512, 512)}, version=1)
    publish_state(holders, {"w": torch.full((512, 512), 2.0)}, version=2)
    assert holders.call(Holder.pull, 1).wait() == [2, 2]  # both ranks skip to the newest
    assert holders.call(Holder.summary).wait() == [(2, {"w": 2.0 * 512 * 512})] * 2
    pulls = holders.call(Holder.pull, 3)  # waits for a version that is not published yet
    time.sleep(0.3)
    assert not pulls.done()
    publish_state(holders, {"w": torch.zeros(512, 512)}, version=3)
    assert pulls.wait(timeout=30) == [3, 3]
