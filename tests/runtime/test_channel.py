"""Channels between real worker processes and the driver."""

from __future__ import annotations

import asyncio
import collections
import os
import time

import numpy as np
import pytest
import torch

from rlinf import Channel, ChannelClosed, Worker


class Producer(Worker):
    def produce(self, ch: Channel, n: int, start: int) -> int:
        for i in range(start, start + n):
            ch.put(i, version=self.rank)
        return n

    def produce_tensors(self, ch: Channel, sizes: list[int]) -> list[float]:
        sums = []
        for i, n in enumerate(sizes):
            t = torch.arange(n, dtype=torch.float32) + i
            sums.append(float(t.sum()))
            ch.put({"i": i, "t": t, "np": np.full(n // 4 + 1, i, dtype=np.int16)}, version=7)
        return sums

    def held_items(self) -> tuple[int, int]:
        """Items this process still holds for consumers, and bytes in use in its shared-memory pool."""
        from rlinf.channel import _process

        server = _process()._server
        pool = _process()._pool
        return (0 if server is None else len(server)), (0 if pool is None else pool.used)


class Consumer(Worker):
    def consume(self, ch: Channel, delay: float = 0.0) -> list[int]:
        out = []
        for x in ch:
            out.append(x)
            if delay:
                time.sleep(delay)
        return out

    def consume_tensors(self, ch: Channel) -> list[tuple[int, float, bool, int]]:
        out = []
        for item in ch.items():
            p = item.payload
            ok = bool((torch.from_numpy(p["np"].astype(np.int64)) == p["i"]).all())
            out.append((p["i"], float(p["t"].sum()), ok, item.meta.version))
        return out

    def consume_async(self, ch: Channel) -> list[int]:
        async def run() -> list[int]:
            return [x async for x in ch]

        return asyncio.run(run())

    def rss_mb(self) -> float:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024
        return 0.0


def test_4_producers_4_consumers_10000_items_each(fresh_groups):
    cluster = fresh_groups
    ch = Channel("many", maxsize=512)
    producers = Producer.launch(cluster, [0, 1, 0, 1], name="producers")
    consumers = Consumer.launch(cluster, [0, 1, 0, 1], name="consumers")
    n = 10_000
    got = consumers.call(Consumer.consume, ch)
    # each producer rank r puts r*n .. r*n+n-1
    handles = [producers.on(r).call(Producer.produce, ch, n, r * n) for r in range(4)]
    assert [h.wait()[0] for h in handles] == [n] * 4
    ch.close()
    results = got.wait(timeout=300)
    everything = [x for part in results for x in part]
    counts = collections.Counter(everything)
    assert len(everything) == 4 * n, "items lost or duplicated"
    assert set(counts) == set(range(4 * n)) and max(counts.values()) == 1
    assert all(len(part) > 0 for part in results), "every consumer takes part"
    for part in results:  # FIFO: each producer's items reach any one consumer in order
        for r in range(4):
            mine = [x for x in part if r * n <= x < (r + 1) * n]
            assert mine == sorted(mine)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.parametrize("floats", [1 << 20, 1 << 18], ids=["4MiB-items", "1MiB-items"])
def test_full_channel_blocks_producer_and_memory_stays_bounded(fresh_groups, floats):
    cluster = fresh_groups
    ch = Channel(f"bounded-{floats}", maxsize=4)
    producer = Producer.launch(cluster, [0], name="big-producer")
    consumer = Consumer.launch(cluster, [1], name="slow-consumer")
    pid = producer.info[0]["pid"]
    base = _rss_mb(pid)
    n = (160 << 20) // (4 * floats)  # 160 MiB of float32 in all, in items too large to pass the hub
    sizes = [floats] * n
    h = producer.call(Producer.produce_tensors, ch, sizes)
    time.sleep(2.0)
    stats = ch.stats()
    assert stats["size"] <= 4 and stats["blocked_producers"] == 1, stats
    assert not h.done(), "the producer must block while nobody consumes"
    # only the queued items and the blocked one (a few MiB each) stay alive, not 160 MiB; the
    # margin covers memory the allocator keeps after freeing the tensors already sent
    assert _rss_mb(pid) - base < 110
    got = consumer.call(Consumer.consume_tensors, ch)
    sums = h.wait(timeout=120)[0]
    ch.close()
    out = got.wait(timeout=120)[0]
    assert [o[0] for o in out] == list(range(n))
    assert [o[1] for o in out] == sums
    assert all(o[2] for o in out) and all(o[3] == 7 for o in out)
    # the consumer has freed every item, so the producer holds nothing (and its pool space is back)
    deadline = time.monotonic() + 10
    while producer.call(Producer.held_items).wait()[0] != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert producer.call(Producer.held_items).wait()[0] == (0, 0)


def test_close_ends_iteration_for_every_consumer(fresh_groups):
    ch = Channel("closing", maxsize=8)
    consumers = Consumer.launch(fresh_groups, [0, 1, 0], name="waiters")
    h = consumers.call(Consumer.consume, ch)
    time.sleep(1.0)
    for i in range(5):
        ch.put(i)
    ch.close()
    parts = h.wait(timeout=30)
    assert sorted(x for p in parts for x in p) == list(range(5))
    with pytest.raises(ChannelClosed):
        ch.put(99)
    with pytest.raises(ChannelClosed):
        ch.get()


def test_async_consumer_and_driver_side_use(fresh_groups):
    ch = Channel("async", maxsize=3)
    consumer = Consumer.launch(fresh_groups, [1], name="async-consumer")
    h = consumer.call(Consumer.consume_async, ch)
    for i in range(20):
        ch.put({"i": i, "x": torch.ones(3) * i})
    ch.close()
    out = h.wait(timeout=60)[0]
    assert [o["i"] for o in out] == list(range(20))
    assert all(torch.equal(o["x"], torch.ones(3) * o["i"]) for o in out)


def test_metadata_and_get_batch_weights(cluster):
    ch = Channel("meta", maxsize=0)
    t0 = time.time()
    for w in [1, 2, 3, 4]:
        ch.put(f"w{w}", version=5, weight=w)
    item = ch.get_item()
    assert item.payload == "w1"
    assert item.meta.version == 5 and item.meta.producer == "driver" and item.meta.rank == -1
    assert t0 <= item.meta.put_time <= item.meta.get_time <= time.time()
    # weights 2 + 3 = 5 >= 4: the batch stops there
    assert ch.get_batch(4) == ["w2", "w3"]
    ch.put("w5", weight=5)
    # elastic: at least 1, up to 9 of what has arrived -> 4 + 5
    assert ch.get_batch(1, max_weight=9) == ["w4", "w5"]
    ch.close()
    assert ch.get_batch(1) == []
    with pytest.raises(ValueError, match="weight must be > 0"):
        ch.get_batch(0)


def test_get_timeout_loses_nothing(cluster):
    ch = Channel("timeouts", maxsize=1)
    with pytest.raises(TimeoutError):
        ch.get(timeout=0.2)
    ch.put("a")
    with pytest.raises(TimeoutError):
        ch.put("b", timeout=0.2)  # full: not delivered
    assert ch.get(timeout=5) == "a"
    assert ch.qsize() == 0


def test_async_cancel_loses_nothing(cluster):
    ch = Channel("cancel", maxsize=0)

    async def scenario() -> list:
        waiter = asyncio.ensure_future(ch.aget())
        await asyncio.sleep(0.1)
        waiter.cancel()
        await ch.aput("kept")
        await asyncio.sleep(0.2)
        return [await ch.aget()]

    assert asyncio.run(scenario()) == ["kept"]


def test_channel_by_name_is_shared_and_bad_args_rejected(cluster):
    a = Channel("shared-name", maxsize=2)
    b = Channel("shared-name")
    a.put(1)
    assert b.get() == 1
    with pytest.raises(ValueError, match="maxsize must be >= 0"):
        Channel("x", maxsize=-1)


def test_stopping_iteration_early_puts_prefetched_items_back(cluster):
    ch = Channel("early-stop", maxsize=0)
    ch.put_many(range(10))
    seen = []
    for x in ch:
        seen.append(x)
        if len(seen) == 2:
            break  # the iterator had taken more than two; they go back to the front
    ch.close()
    assert seen == [0, 1]
    assert list(ch) == list(range(2, 10))


class Host(Worker):
    def host(self, name: str) -> Channel:
        return Channel(name, maxsize=2, host="here")

    def drain(self, ch: Channel) -> list[int]:
        return list(ch)


def test_channel_hosted_by_its_consumer_is_found_by_name(fresh_groups):
    consumer = Host.launch(fresh_groups, [1], name="hosting-consumer")
    hosted = consumer.call(Host.host, "hosted").wait()[0]
    assert hosted._hub != Channel("plain-for-compare")._hub  # the queue lives in the consumer
    by_name = Channel("hosted")  # any process finds it through the cluster hub
    assert by_name._hub == hosted._hub and by_name.maxsize == 2
    h = consumer.call(Host.drain, hosted)
    by_name.put_many(range(20))
    by_name.close()
    assert h.wait(timeout=60)[0] == list(range(20))
    with pytest.raises(Exception, match="already exists elsewhere"):
        consumer.call(Host.host, "plain-for-compare").wait()


class LateProducer(Worker):
    def put_across_close(self, ch: Channel, go: Channel) -> str:
        ch.put("first")  # answered: the hub reports room, so the next put is sent ahead
        go.get()  # the driver closes `ch` meanwhile
        ch.put("second")  # sent ahead; the hub answers only that it was refused
        try:
            ch.flush()
        except ChannelClosed as e:
            return str(e)
        return "no error"


def test_put_sent_ahead_into_a_closed_channel_is_reported(fresh_groups):
    ch, go = Channel("late", maxsize=0), Channel("late-go", maxsize=0)
    producer = LateProducer.launch(fresh_groups, [0], name="late-producer")
    h = producer.call(LateProducer.put_across_close, ch, go)
    assert ch.get(timeout=30) == "first"
    ch.close()
    go.put("go")
    assert "1 earlier item(s) put here were not delivered" in h.wait(timeout=30)[0]


def test_large_items_fall_back_to_sockets_when_shared_memory_is_full(cluster, monkeypatch):
    from rlinf import channel as channel_module

    pool = channel_module._process().shm_pool()
    if pool is None:
        pytest.skip("no /dev/shm on this machine")
    monkeypatch.setattr(pool, "alloc", lambda n: None)  # as if the pool were full
    ch = Channel("no-room-in-shm", maxsize=0)
    t = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB: large enough to bypass the hub
    ch.put(t)
    got = ch.get_item()
    assert torch.equal(got.payload, t)


@pytest.mark.parametrize(
    "item", [7, "text", None, 2.5, b"raw", {"a": [1, 2]}, torch.arange(3), np.arange(600, dtype=np.float64)]
)
def test_payload_shortcut_matches_full_decoding(item):
    """``get`` decodes only the payload; it must agree with the full decoding for every frame type."""
    import zmq

    from rlinf.channel import _encode, _load, _payload

    frames, _ = _encode(item, 3, 2.0)
    _, producer, rank, version, weight, _ = _load(frames)
    assert (producer, rank, version, weight) == ("driver", -1, 3, 2.0)
    for first in (frames[0], memoryview(frames[0]), zmq.Frame(frames[0])):  # as each transport delivers it
        got = _payload([first, *frames[1:]])
        if isinstance(item, torch.Tensor | np.ndarray):
            assert got.tolist() == item.tolist()
        else:
            assert got == item


SECOND_CLUSTER = """
from rlinf import Channel, Cluster, Worker

class Echo(Worker):
    def echo(self, inp, out):
        out.put(inp.get() + 1)

for round in range(2):  # a second cluster in the same process finds its own hub
    with Cluster() as cluster:
        group = Echo.launch(cluster, [0])
        inp, out = Channel(f"in-{round}"), Channel(f"out-{round}")
        inp.put(round)
        group.call(Echo.echo, inp, out).wait()
        print("round", round, "got", out.get(timeout=30), flush=True)
"""


def test_a_second_cluster_in_one_process_gets_working_channels(tmp_path):
    """Channels made after a cluster stopped and another started talk to the new cluster's hub."""
    import subprocess
    import sys

    script = tmp_path / "two_clusters.py"
    script.write_text(SECOND_CLUSTER)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "round 0 got 1" in out.stdout and "round 1 got 2" in out.stdout, out.stdout
