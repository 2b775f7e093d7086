"""Sending weights to a worker group through a channel."""

from __future__ import annotations

import torch

from rlinf import Channel, Worker
from rlinf.workers.weights import receive_state, send_state


class Holder(Worker):
    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.version = -1

    def load(self, state: dict[str, torch.Tensor] | Channel, version: int) -> None:
        self.state = receive_state(state, version)
        self.version = version

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
