"""Collocated workers taking turns on the same devices through the cluster-wide lock."""

from __future__ import annotations

import itertools
import time

from rlinf import Placement, Worker


class Hammer(Worker):
    """Holds the device lock in a loop and logs what happens, with wall-clock times."""

    def __init__(self) -> None:
        self.log: list[tuple[float, str, str]] = []
        self.weights_on_device = True

    def offload(self) -> None:
        self.log.append((time.time(), self.group_name, "offload"))
        self.weights_on_device = False

    def onload(self) -> None:
        self.log.append((time.time(), self.group_name, "onload"))
        self.weights_on_device = True

    def hammer(self, rounds: int, hold_s: float) -> list[tuple[float, str, str]]:
        for _ in range(rounds):
            with self.device_lock():
                if not self.weights_on_device:
                    raise RuntimeError("computing while offloaded")
                self.log.append((time.time(), self.group_name, "enter"))
                time.sleep(hold_s)
                self.log.append((time.time(), self.group_name, "exit"))
            time.sleep(0.001)
        return self.log


def test_two_collocated_workers_never_hold_the_lock_together(fresh_groups):
    cluster = fresh_groups
    placement = Placement.collocated(["actor", "rollout"], len(cluster.devices), devices="0")
    actor = Hammer.launch(cluster, placement, name="actor")
    rollout = Hammer.launch(cluster, placement, name="rollout")
    ha = actor.call(Hammer.hammer, 25, 0.005)
    hr = rollout.call(Hammer.hammer, 25, 0.005)
    events = sorted(ha.wait(timeout=120)[0] + hr.wait(timeout=120)[0])

    # 1. critical sections never overlap
    holder = None
    for _, who, what in events:
        if what == "enter":
            assert holder is None, f"{who} entered while {holder} held the lock"
            holder = who
        elif what == "exit":
            assert holder == who
            holder = None

    # 2. at every hand-over the previous holder offloads before the next one onloads and enters
    sections = [(t, who) for t, who, what in events if what == "enter"]
    handovers = sum(1 for a, b in itertools.pairwise(sections) if a[1] != b[1])
    assert handovers >= 5, "the two workers should take turns, not run one after the other"
    state = {"actor": "resident", "rollout": "resident"}
    for _, who, what in events:
        if what == "offload":
            assert state[who] == "resident"
            state[who] = "offloaded"
        elif what == "onload":
            assert state[who] == "offloaded"
            state[who] = "resident"
        elif what == "enter":
            other = "rollout" if who == "actor" else "actor"
            assert state[who] == "resident" and state[other] == "offloaded", (who, state)
    offloads = sum(1 for e in events if e[2] == "offload")
    assert offloads == handovers or offloads == handovers + 1  # +1: the very first acquire

    # 3. every hand-over's duration is recorded
    switches = actor.switch_times()[0] + rollout.switch_times()[0]
    assert len(switches) == 50 and all(s >= 0 for s in switches)


def test_disjoint_devices_do_not_wait_for_each_other(fresh_groups):
    cluster = fresh_groups
    placement = Placement.disaggregated({"a": "0", "b": "1"}, len(cluster.devices))
    a = Hammer.launch(cluster, placement, name="a")
    b = Hammer.launch(cluster, placement, name="b")
    start = time.monotonic()
    ha, hb = a.call(Hammer.hammer, 10, 0.1), b.call(Hammer.hammer, 10, 0.1)
    ea, eb = ha.wait(timeout=60)[0], hb.wait(timeout=60)[0]
    assert time.monotonic() - start < 1.8  # about 1 s each, side by side rather than 2 s in turn
    assert not any(e[2] == "offload" for e in ea + eb)
