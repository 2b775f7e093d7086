"""Channel throughput and latency against raw Ray object store and raw pyzmq, side by side.

Two workers pinned to the two CPU slots exchange float32 tensors of 64 KB, 1 MB and 8 MB:
    rlinf    Channel.put in one worker, Channel.get in the other
    ray      ray.put (numpy, its zero-copy case) in one worker, ray.get of the refs in the other
    pyzmq    PUSH/PULL with zero-copy frames between the same two processes
and a small item makes round trips (A -> B -> A): rlinf over two channels of the default capacity
(256; also with maxsize=4, where the hub's credit notes to the producer add a message every few
items) vs a pyzmq PAIR socket and a plain Ray actor call. Every number is the median of --repeats runs.

    python benchmarks/channel_throughput.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import ray
import torch
import zmq

from rlinf import Channel, Cluster, Worker
from rlinf.cluster import bind_ip

SIZES = {"64 KB": 64 << 10, "1 MB": 1 << 20, "8 MB": 8 << 20}
TOTAL_BYTES = 256 << 20  # per run and size, so each run moves the same amount


def count_for(nbytes: int) -> int:
    return max(20, min(2000, TOTAL_BYTES // nbytes))


class Bench(Worker):
    """Hosts both ends of every transport; methods are the producer or consumer side."""

    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.sock: Any = None

    # ---- rlinf channel ----
    def channel_send(self, ch: Channel, nbytes: int, n: int) -> float:
        start = time.time()
        for i in range(n):
            ch.put(torch.full((nbytes // 4,), float(i)))
        return start

    def channel_recv(self, ch: Channel, n: int) -> float:
        for _, t in zip(range(n), ch, strict=False):  # iterating: the usual consumer loop
            _ = float(t[-1])  # touch the data
        return time.time()

    # ---- raw ray object store ----
    def ray_send(self, nbytes: int, n: int) -> tuple[float, list[Any]]:
        start = time.time()
        refs = [ray.put(np.full(nbytes // 4, float(i), dtype=np.float32)) for i in range(n)]
        return start, refs

    def ray_recv(self, refs: list[Any]) -> float:
        for r in refs:
            a = ray.get(r)
            _ = float(a[-1])
        return time.time()

    # ---- raw pyzmq ----
    def zmq_bind(self, kind: int) -> str:
        self.sock = self.ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port(f"tcp://{bind_ip()}")
        return f"tcp://{bind_ip()}:{port}"

    def zmq_connect(self, kind: int, address: str) -> None:
        self.sock = self.ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def zmq_send(self, nbytes: int, n: int) -> float:
        self.sock.send(b"ready?")  # PAIR handshake so no message is sent before the peer listens
        self.sock.recv()
        start = time.time()
        for i in range(n):
            self.sock.send(np.full(nbytes // 4, float(i), dtype=np.float32), copy=False)
        return start

    def zmq_recv(self, n: int) -> float:
        self.sock.recv()
        self.sock.send(b"go")
        for _ in range(n):
            frame = self.sock.recv(copy=False)
            a = np.frombuffer(frame.buffer, dtype=np.float32)
            _ = float(a[-1])
        return time.time()

    # ---- latency ----
    def channel_ping(self, out: Channel, back: Channel, n: int) -> list[float]:
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            out.put(i)
            back.get()
            times.append(time.perf_counter() - t0)
        return times

    def channel_pong(self, inp: Channel, back: Channel, n: int) -> int:
        for _ in range(n):
            back.put(inp.get())
        return n

    def zmq_ping(self, n: int) -> list[float]:
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            self.sock.send(i.to_bytes(8, "little"))
            self.sock.recv()
            times.append(time.perf_counter() - t0)
        return times

    def zmq_pong(self, n: int) -> int:
        for _ in range(n):
            self.sock.send(self.sock.recv())
        return n

    def echo(self, x: int) -> int:
        return x

    def host_channel(self, name: str, maxsize: int = 256) -> Channel:
        """A channel whose queue lives in this process (``host="here"``): this worker consumes it."""
        return Channel(name, maxsize=maxsize, host="here")


def throughput(a: Any, b: Any, transport: str, nbytes: int, run: int) -> float:
    """MB/s from the producer's first send to the consumer's last receive."""
    n = count_for(nbytes)
    if transport == "rlinf":
        ch = Channel(f"bench-{nbytes}-{run}", maxsize=16)
        hr = b.call(Bench.channel_recv, ch, n)
        start = a.call(Bench.channel_send, ch, nbytes, n).wait()[0]
        end = hr.wait()[0]
    elif transport == "ray":
        start, refs = a.call(Bench.ray_send, nbytes, n).wait()[0]
        end = b.call(Bench.ray_recv, refs).wait()[0]
    else:
        address = b.call(Bench.zmq_bind, zmq.PAIR).wait()[0]
        a.call(Bench.zmq_connect, zmq.PAIR, address).wait()
        hr = b.call(Bench.zmq_recv, n)
        start = a.call(Bench.zmq_send, nbytes, n).wait()[0]
        end = hr.wait()[0]
    return n * nbytes / (end - start) / 1e6


LATENCY_ROWS = {
    "rlinf": "rlinf, queues in the cluster hub",
    "rlinf host=here": "rlinf, queues in their consumers",
    "rlinf host=here maxsize=4": "  same, maxsize=4",
    "pyzmq": "raw pyzmq (PAIR)",
    "ray actor call": "Ray actor call (driver -> B)",
}


def round_trip_us(a: Any, b: Any, transport: str, n: int, run: int) -> float:
    if transport.startswith("rlinf"):
        if transport == "rlinf":
            out, back = Channel(f"ping-{run}"), Channel(f"pong-{run}")
        else:  # each channel hosted by its consumer: B consumes `out`, A consumes `back`
            size = 4 if transport.endswith("maxsize=4") else 256
            out = b.call(Bench.host_channel, f"ping-here-{size}-{run}", size).wait()[0]
            back = a.call(Bench.host_channel, f"pong-here-{size}-{run}", size).wait()[0]
        hb = b.call(Bench.channel_pong, out, back, n)
        times = a.call(Bench.channel_ping, out, back, n).wait()[0]
        hb.wait()
    elif transport == "pyzmq":
        address = b.call(Bench.zmq_bind, zmq.PAIR).wait()[0]
        a.call(Bench.zmq_connect, zmq.PAIR, address).wait()
        hb = b.call(Bench.zmq_pong, n)
        times = a.call(Bench.zmq_ping, n).wait()[0]
        hb.wait()
    else:  # a plain Ray actor call from the driver, for reference
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            b.call(Bench.echo, i).wait()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[n // 10 :]) * 1e6  # skip warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--only", choices=["throughput", "latency"], default=None, help="run just one of the two parts")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()

    results: dict[str, Any] = {"throughput_MBps": {}, "round_trip_us": {}, "repeats": args.repeats}
    with Cluster() as cluster:
        a = Bench.launch(cluster, [0], name="bench-a")
        b = Bench.launch(cluster, [1], name="bench-b")
        if args.only != "latency":
            for label, nbytes in SIZES.items():
                runs: dict[str, list[float]] = {"rlinf": [], "ray": [], "pyzmq": []}
                for r in range(args.repeats):
                    for transport in runs:  # interleaved, so drift on a shared machine hits all alike
                        runs[transport].append(throughput(a, b, transport, nbytes, r))
                results["throughput_MBps"][label] = {k: statistics.median(v) for k, v in runs.items()}
                print(f"  {label}: " + ", ".join(f"{k} {statistics.median(v):.0f} MB/s" for k, v in runs.items()))
        if args.only != "throughput":
            lat: dict[str, list[float]] = {t: [] for t in LATENCY_ROWS}
            for r in range(args.repeats):
                for transport in lat:
                    n = args.pings if transport != "ray actor call" else max(200, args.pings // 5)
                    lat[transport].append(round_trip_us(a, b, transport, n, r))
                print(f"  round trip, run {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} us" for k, v in lat.items()))
            results["round_trip_us"] = {k: statistics.median(v) for k, v in lat.items()}
            # ratios taken run by run (the same minutes of a shared machine), then their median
            results["round_trip_ratio"] = {
                k: statistics.median(x / z for x, z in zip(v, lat["pyzmq"], strict=True)) for k, v in lat.items()
            }

    if results["throughput_MBps"]:
        print()
        print(f"Channel throughput, MB/s (median of {args.repeats} runs; two workers on two CPU slots)")
        print(f"{'payload':<8} {'rlinf':>9} {'raw Ray':>9} {'raw pyzmq':>10} {'rlinf / faster raw':>20}")
        for label, row in results["throughput_MBps"].items():
            best = max(row["ray"], row["pyzmq"])
            ratio = row["rlinf"] / best
            print(f"{label:<8} {row['rlinf']:>9.0f} {row['ray']:>9.0f} {row['pyzmq']:>10.0f} {ratio:>19.2f}x")
    if results["round_trip_us"]:
        rt, ratio = results["round_trip_us"], results["round_trip_ratio"]
        print()
        print(f"Small-item round trip A -> B -> A, microseconds (median of {args.repeats} runs)")
        print(f"{'transport':<34} {'us':>7} {'/ raw pyzmq, per run':>21}")
        for key, label in LATENCY_ROWS.items():
            print(f"{label:<34} {rt[key]:>7.0f} {ratio[key]:>20.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
