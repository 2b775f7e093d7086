"""Channel: a named, bounded FIFO between the driver and workers, sync and asyncio.

Control (the FIFO, backpressure, close) lives in the channel hub; small items travel through
it as zmq frames. Tensors and arrays whose buffers add up to ``DIRECT_BYTES`` or more stay in
the producer's process and the consumer fetches them straight from there as zero-copy frames,
so large payloads cross the machine once and never pass through the hub.

``put`` hands the item over: do not write into its tensors afterwards (as with
``torch.multiprocessing`` queues), since a consumer may still be reading them. While the hub has
reported room, ``put`` returns without waiting for its acknowledgement; a put that then finds the
channel closed is reported by the next ``put``/``flush()`` from the same thread, and a worker method
does not return before all of its puts are acknowledged.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import struct
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import zmq
import zmq.asyncio

from rlinf import serialization, shm
from rlinf.channel_hub import (
    CANCELLED,
    CLOSED,
    GET_ARGS,
    ITEMS,
    NOCHAN,
    OK,
    REDIRECT,
    ROOM,
    ChannelHub,
    Frames,
    batch_layout,
    bind_endpoint,
    connect_address,
    recv_frames,
    request_head,
    send_message,
    split_batch,
    this_machine,
)
from rlinf.errors import ChannelClosed, RlinfError
from rlinf.trace import tracer

DIRECT_BYTES = int(os.environ.get("RLINF_CHANNEL_DIRECT_BYTES", 256 * 1024))
FETCH_TIMEOUT_S = float(os.environ.get("RLINF_CHANNEL_FETCH_TIMEOUT_S", 120))
SEND_AHEAD = 64
ITER_PREFETCH = 8  # items one request of an iterating consumer may take
TRACE_MIN_S = 50e-6  # shorter channel waits are not recorded as spans
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")
# an item's first frame: whether its buffers are elsewhere, rank, version, weight, put time, name length
_META = struct.Struct("<?iqddH")
_NAME_LEN, _NAME_AT = struct.Struct("<H"), _META.size - 2
_INF = float("inf")
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


@dataclass(frozen=True)
class ItemMeta:
    """What travels with every item.

    Args:
        producer: the producing worker group's name, or ``"driver"``.
        rank: the producer's rank (-1 for the driver).
        version: the number the producer set, e.g. the policy version that made a sample.
        weight: the item's weight for ``get_batch`` (e.g. number of samples it holds).
        put_time: seconds since the epoch when it was put.
        get_time: seconds since the epoch when the consumer received it.
    """

    producer: str
    rank: int
    version: int
    weight: float
    put_time: float
    get_time: float = 0.0


@dataclass(frozen=True)
class Item:
    """An item with its metadata."""

    payload: Any
    meta: ItemMeta


class Channel:
    """A named, bounded FIFO; the same name means the same channel from any process.

    Args:
        name: channel name, unique in the cluster.
        maxsize: at most this many items are queued; ``put`` blocks beyond it. 0 means unbounded.
        host: ``"cluster"`` keeps the queue in the cluster's channel hub; ``"here"`` keeps it in a hub
            thread of the calling process, typically the channel's consumer, which saves one
            process hop per item (the lowest latency) but ends with that process. Other processes
            find it by name either way.
    """

    def __init__(self, name: str, maxsize: int = 256, *, host: Literal["cluster", "here"] = "cluster") -> None:
        if not name:
            raise ValueError("a channel needs a non-empty name, e.g. Channel('samples').")
        if maxsize < 0:
            raise ValueError(f"Channel({name!r}, maxsize={maxsize}): maxsize must be >= 0 (0 = unbounded).")
        if host not in ("cluster", "here"):
            raise ValueError(f"Channel({name!r}, host={host!r}): host must be 'cluster' or 'here'.")
        self.name = name
        self._key = name.encode()
        central = _process().hub_address()
        if host == "here":
            self._hub = _process().local_hub()
            reply = self._call(b"CREATE", [], args=_U32.pack(maxsize))
            alias = _process().conn(central).request(self._key, b"ALIAS", [self._hub.encode()])
            if alias.status != OK:
                raise RlinfError(
                    f"channel {name!r} already exists elsewhere ({bytes(alias.frames[0]).decode()}); "
                    f"pick another name or create it without host='here'."
                )
        else:
            self._hub = central
            reply = self._call(b"CREATE", [], args=_U32.pack(maxsize))
            if reply.status == REDIRECT:  # hosted by some process: talk to its hub directly
                self._hub = reply.extra.decode()
                reply = self._call(b"CREATE", [], args=_U32.pack(maxsize))
        self.maxsize = _U32.unpack(reply.extra)[0]

    @classmethod
    def _attach(cls, name: str, maxsize: int, hub: str) -> Channel:
        self = cls.__new__(cls)
        self.name, self._key, self.maxsize, self._hub = name, name.encode(), maxsize, hub
        return self

    def __reduce__(self) -> tuple[Any, tuple[str, int, str]]:
        return (Channel._attach, (self.name, self.maxsize, self._hub))

    def __repr__(self) -> str:
        return f"Channel({self.name!r}, maxsize={self.maxsize})"

    # ---- sync API ------------------------------------------------------------------------------

    def put(self, item: Any, *, version: int = 0, weight: float = 1.0, timeout: float | None = None) -> None:
        """Appends ``item``; blocks while the channel is full.

        Raises:
            ChannelClosed: the channel was closed (the item was not delivered).
            TimeoutError: still full after ``timeout`` seconds (the item was not delivered).
        """
        frames, key = _encode(item, version, weight)
        conn = self._conn()
        if conn.undelivered:
            self._raise_undelivered(conn)
        if timeout is None and conn.can_send_ahead(self._key):
            # The hub said there is room: send without waiting for an answer (only a failure is
            # answered, and read with the next reply on this socket). Saves wake-ups per item.
            conn.send_ahead(self._key, _F64.pack(weight), frames, key)
            _record_waits()  # now that the item is on its way
            return
        start = time.time()
        try:
            reply = self._call(b"PUT", frames, timeout, args=_F64.pack(weight))
        except BaseException:
            _release(key)
            raise
        _trace_wait("put", self.name, start)
        conn.note_room(self._key, reply)
        self._check_put(reply.status, key, timeout)

    _cached: tuple[int, Any, _Conn] | None = None

    def _conn(self) -> _Conn:
        """This thread's connection to the channel's hub, remembered for the thread's next put."""
        cached, me = self._cached, threading.get_ident()
        if cached is not None and cached[0] == me and cached[1] is _state:
            return cached[2]
        conn = _process().conn(self._hub)
        self._cached = (me, _state, conn)
        return conn

    def flush(self) -> None:
        """Waits until every put this thread made on this channel was acknowledged.

        Raises:
            ChannelClosed: some of them arrived after the channel was closed and were not delivered.
        """
        conn = _process().conn(self._hub)
        conn.sync(self._key)
        self._raise_undelivered(conn)

    def _raise_undelivered(self, conn: _Conn) -> None:
        lost = conn.undelivered.pop(self._key, 0)
        if lost:
            raise ChannelClosed(f"channel {self.name!r} was closed; {lost} earlier item(s) put here were not delivered")

    def put_many(self, items: Iterable[Any], *, version: int = 0, weight: float = 1.0) -> None:
        """Puts each item in order."""
        for item in items:
            self.put(item, version=version, weight=weight)

    def get(self, timeout: float | None = None) -> Any:
        """Removes and returns the oldest item; blocks while empty.

        Raises:
            ChannelClosed: closed and drained.
            TimeoutError: nothing arrived within ``timeout`` seconds.
        """
        batch = self._take(1, 0.0, _INF, timeout)
        if not batch:
            raise ChannelClosed(f"channel {self.name!r} is closed and drained")
        return _payload(batch[0])

    def get_item(self, timeout: float | None = None) -> Item:
        """Like :meth:`get`, with the item's metadata."""
        items = self._get(1, 0.0, _INF, timeout)
        if not items:
            raise ChannelClosed(f"channel {self.name!r} is closed and drained")
        return items[0]

    def get_batch(self, weight: float, *, max_weight: float | None = None, timeout: float | None = None) -> list:
        """Takes items until their weights add up to ``weight`` (one heavy item may overshoot).

        With ``max_weight``, also takes whatever else has already arrived up to that weight
        (elastic micro-batches). Returns fewer only when the channel is closed: ``[]`` once drained.
        """
        return [it.payload for it in self.get_batch_items(weight, max_weight=max_weight, timeout=timeout)]

    def get_batch_items(
        self, weight: float, *, max_weight: float | None = None, timeout: float | None = None
    ) -> list[Item]:
        """Like :meth:`get_batch`, with each item's metadata."""
        if weight <= 0:
            raise ValueError(f"get_batch(weight={weight}): weight must be > 0.")
        hi = weight if max_weight is None else max_weight
        if hi < weight:
            raise ValueError(f"get_batch(weight={weight}, max_weight={max_weight}): max_weight must be >= weight.")
        return self._get(0, weight, hi, timeout)

    def __iter__(self) -> Iterator[Any]:
        """Yields items until the channel is closed and drained."""
        return self._iterate(with_meta=False)

    def items(self) -> Iterator[Item]:
        """Yields items with metadata until the channel is closed and drained.

        Each request takes up to ``ITER_PREFETCH`` items that have already arrived, which saves a
        round trip per item when items come faster than they are handled; items still held when
        the loop stops early go back to the front of the channel.
        """
        return self._iterate(with_meta=True)

    def _iterate(self, with_meta: bool) -> Iterator[Any]:
        hub = _process().hosted(self._hub)
        held: deque[tuple[float, Frames]] = deque()
        try:
            while True:
                if not held:
                    _record_waits()
                    start = time.time()
                    if hub is not None:
                        try:
                            batch = hub.local_get(self._key, ITER_PREFETCH, 0.0, _INF, None)
                        except KeyError:
                            raise self._missing() from None
                        _note_wait(self.name, start)
                        if batch is None:
                            return
                        held.extend(batch)
                    else:
                        reply = self._call(b"GET", [], None, args=GET_ARGS.pack(ITER_PREFETCH, 0.0, _INF))
                        _note_wait(self.name, start)
                        if reply.status == CLOSED:
                            return
                        self._check_items(reply, None)
                        held.extend(split_batch(reply.extra, reply.frames))
                _, frames = held.popleft()
                yield _decode(frames, time.time()) if with_meta else _payload(frames)
        finally:
            if held and hub is not None:
                hub.local_requeue(self._key, list(held))
            elif held:
                self._call(b"REQUEUE", [batch_layout(list(held)), *[f for _, fs in held for f in fs]])

    def close(self) -> None:
        """No more puts; consumers drain what is queued, then iteration ends."""
        self._call(b"CLOSE", [])  # ordered after this thread's earlier puts, which the hub has queued
        conn = _process().conn(self._hub)
        conn.room[self._key] = 0  # later puts from here wait for their reply, which says CLOSED
        self._raise_undelivered(conn)

    def stats(self) -> dict[str, Any]:
        """Queue size, capacity, counters and waiting consumers/producers."""
        import json

        reply = self._call(b"STAT", [])
        return json.loads(bytes(reply.frames[0]))

    def qsize(self) -> int:
        return int(self.stats()["size"])

    # ---- asyncio API ---------------------------------------------------------------------------

    async def aput(self, item: Any, *, version: int = 0, weight: float = 1.0) -> None:
        """``put`` for coroutines."""
        frames, key = _encode(item, version, weight)
        start = time.time()
        try:
            reply = await _process().aconn(self._hub).request(self._key, b"PUT", frames, _F64.pack(weight))
        except BaseException:
            _release(key)
            raise
        _trace_wait("put", self.name, start)
        self._check_put(reply.status, key, None)

    async def aget(self) -> Any:
        """``get`` for coroutines (cancelling it loses no item)."""
        return (await self.aget_item()).payload

    async def aget_item(self) -> Item:
        items = await self._aget(1, 0.0, _INF)
        if not items:
            raise ChannelClosed(f"channel {self.name!r} is closed and drained")
        return items[0]

    async def aget_batch(self, weight: float, *, max_weight: float | None = None) -> list:
        hi = weight if max_weight is None else max_weight
        return [it.payload for it in await self._aget(0, weight, hi)]

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
        while True:
            try:
                yield await self.aget()
            except ChannelClosed:
                return

    # ---- internals -----------------------------------------------------------------------------

    def _call(self, op: bytes, rest: list, timeout: float | None = None, args: bytes = b"") -> Reply:
        reply = _process().conn(self._hub).request(self._key, op, rest, timeout, args)
        if reply.status == NOCHAN:
            raise self._missing()
        if reply.status == b"ER":
            raise RlinfError(f"channel hub rejected {op.decode()} on {self.name!r}: {bytes(reply.frames[0]).decode()}")
        return reply

    def _check_put(self, status: bytes, key: int | None, timeout: float | None) -> None:
        if status == OK:
            return
        _release(key)
        if status == CLOSED:
            raise ChannelClosed(f"channel {self.name!r} is closed; the item was not delivered")
        if status == CANCELLED:
            raise TimeoutError(f"channel {self.name!r} stayed full for {timeout} s; the item was not delivered")
        raise RlinfError(f"unexpected reply {status!r} to put on channel {self.name!r}")

    def _get(self, max_items: int, lo: float, hi: float, timeout: float | None) -> list[Item]:
        batch = self._take(max_items, lo, hi, timeout)
        now = time.time()
        return [_decode(frames, now) for frames in batch]

    def _take(self, max_items: int, lo: float, hi: float, timeout: float | None) -> list[Frames]:
        """The frames of the items a get takes; ``[]`` once the channel is closed and drained."""
        _record_waits()
        start = time.time()
        hub = _process().hosted(self._hub)
        if hub is not None:  # hosted here: this thread reads the items off the hub's socket itself
            try:
                batch = hub.local_get(self._key, max_items, lo, hi, timeout)
            except KeyError:
                raise self._missing() from None
            except TimeoutError:
                raise TimeoutError(f"nothing arrived on channel {self.name!r} within {timeout} s") from None
            _note_wait(self.name, start)
            return [] if batch is None else [frames for _, frames in batch]
        reply = self._call(b"GET", [], timeout, args=GET_ARGS.pack(max_items, lo, hi))
        _note_wait(self.name, start)
        if reply.status == CLOSED:
            return []
        self._check_items(reply, timeout)
        return [frames for _, frames in split_batch(reply.extra, reply.frames)]

    def _missing(self) -> RlinfError:
        return RlinfError(f"channel {self.name!r} does not exist on the hub; create it with Channel(name).")

    async def _aget(self, max_items: int, lo: float, hi: float) -> list[Item]:
        start = time.time()
        reply = await _process().aconn(self._hub).request(self._key, b"GET", [], GET_ARGS.pack(max_items, lo, hi))
        _trace_wait("get", self.name, start)
        return self._decode_reply(reply, None)

    def _check_items(self, reply: Reply, timeout: float | None) -> None:
        if reply.status == CANCELLED:
            raise TimeoutError(f"nothing arrived on channel {self.name!r} within {timeout} s")
        if reply.status != ITEMS:
            raise RlinfError(f"unexpected reply {reply.status!r} to get on channel {self.name!r}")

    def _decode_reply(self, reply: Reply, timeout: float | None) -> list[Item]:
        if reply.status == CLOSED:
            return []
        self._check_items(reply, timeout)
        now = time.time()
        return [_decode(frames, now) for _, frames in split_batch(reply.extra, reply.frames)]


# ---- encoding --------------------------------------------------------------------------------


def _encode(item: Any, version: int, weight: float) -> tuple[list, int | None]:
    """Returns the frames of an item and, for a large one, its key in this process's data server."""
    header, buffers = serialization.dumps(item)
    producer, rank = _identity[2], _identity[1]
    if not buffers:  # the common small item: one frame
        return [_META.pack(False, rank, version, weight, time.time(), len(producer)) + producer + header], None
    remote: tuple[Any, ...] | None = None
    key = None
    sizes = [b.nbytes for b in buffers]
    total = sum(sizes)
    if total >= DIRECT_BYTES:
        proc = _process()
        server = proc.data_server()
        pool = proc.shm_pool() if total >= shm.SHM_BYTES else None
        off = pool.alloc(total) if pool is not None else None
        if pool is not None and off is not None:  # one copy into shared memory
            offsets = pool.write(off, buffers)
            key = server.store_shm(off, total, offsets)
            remote = (server.address, key, sizes, (pool.path, off, total, offsets, this_machine()))
        else:  # stays here; the consumer fetches it over a socket
            key = server.store(buffers)
            remote = (server.address, key, sizes, None)
        buffers = []
    meta = _META.pack(remote is not None, rank, version, weight, time.time(), len(producer)) + producer
    if remote is not None:
        where = pickle.dumps(remote, protocol=5)
        meta += _U32.pack(len(where)) + where
    return [meta + header, *buffers], key


def _decode(frames: Frames, now: float) -> Item:
    payload, producer, rank, version, weight, put_time = _load(frames)
    return Item(payload, ItemMeta(producer, rank, version, weight, put_time, now))


def _payload(frames: Frames) -> Any:
    """An item's payload alone (what ``get`` returns): skips the metadata of a one-frame item."""
    first = memoryview(frames[0])  # bytes, a view or a zmq.Frame
    if len(frames) == 1 and not first[0]:  # no buffers, none elsewhere
        return pickle.loads(first[_META.size + _NAME_LEN.unpack_from(first, _NAME_AT)[0] :])
    return _load(frames)[0]


def _load(frames: Frames) -> tuple[Any, str, int, int, float, float]:
    """An item's payload, producer, rank, version, weight and put time."""
    first = memoryview(frames[0])
    remote, rank, version, weight, put_time, n = _META.unpack_from(first)
    pos = _META.size + n
    producer = _producer_name(bytes(first[_META.size : pos]))
    if not remote:
        buffers: list[Any] = frames[1:]
    else:
        n = _U32.unpack_from(first, pos)[0]
        remote = pickle.loads(first[pos + 4 : pos + 4 + n])
        pos += 4 + n
        address, key, sizes, in_shm = remote
        proc = _process()
        if in_shm is not None and in_shm[4] == this_machine():
            path, off, total, offsets, _ = in_shm
            releaser = proc.releaser()
            buffers = shm.attach(path, off, total, offsets, sizes, lambda: releaser.release(address, key))
        else:
            buffers = proc.fetch(address, key, sizes)
    return serialization.loads(first[pos:], buffers), producer, rank, version, weight, put_time


_names: dict[bytes, str] = {}


def _producer_name(raw: bytes) -> str:
    name = _names.get(raw)
    if name is None:
        name = _names[raw] = raw.decode()
    return name


def _release(key: int | None) -> None:
    if key is not None:
        _process().data_server().discard(key)


def _trace_wait(what: str, channel: str, start: float) -> None:
    end = time.time()
    if end - start >= TRACE_MIN_S:
        tracer().add(f"{what} {channel}", "channel", start, end)


_waits = threading.local()  # per thread: get waits not recorded yet, (channel, start, end)


def _note_wait(channel: str, start: float) -> None:
    """Notes a get's wait for the trace; it is recorded later (see :func:`_record_waits`), so that a
    consumer hands its item back first."""
    end = time.time()
    if end - start >= TRACE_MIN_S:
        spans = _waits.__dict__.get("spans")
        if spans is None:
            spans = _waits.spans = []
        spans.append((channel, start, end))


def _record_waits() -> None:
    """Records the noted waits; called where the thread would wait or has just sent an item anyway."""
    spans = _waits.__dict__.get("spans")
    if spans:
        t = tracer()
        for channel, start, end in spans:
            t.add(f"get {channel}", "channel", start, end)
        spans.clear()


# ---- per-process transport -------------------------------------------------------------------

_identity: tuple[str, int, bytes] = ("driver", -1, b"driver")


def set_identity(producer: str, rank: int) -> None:
    """Names this process as the producer of the items it puts (set by the worker runtime)."""
    global _identity
    _identity = (producer, rank, producer.encode())


class _Conn:
    """One thread's DEALER socket to the hub; requests get exactly one reply each."""

    def __init__(self, ctx: zmq.Context, address: str, local: ChannelHub | None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.local = local  # the hub, when it is this process's own
        self._ids = itertools.count(1)
        self._pending: dict[bytes, bytes] = {}  # request id -> channel, for replies nobody waits for
        # puts sent ahead and not yet known to be queued: request id -> (channel, data-server key)
        self._ahead: dict[bytes, tuple[bytes, int | None]] = {}
        self.room: dict[bytes, int] = {}  # per channel: free slots left by the hub's last report
        self.undelivered: dict[bytes, int] = {}  # per channel: puts sent ahead that found it closed
        self._heads: dict[bytes, bytes] = {}

    def can_send_ahead(self, chan: bytes) -> bool:
        # At most SEND_AHEAD puts go unanswered; then one waits for a reply, which settles them all.
        if len(self._ahead) >= SEND_AHEAD:
            return False
        if self.room.get(chan, 0) > 0:
            return True
        if self._ahead:
            self._read_arrived()  # the hub may have sent more room already
        return self.room.get(chan, 0) > 0

    def _read_arrived(self) -> None:
        """Handles the replies that have already arrived (none is awaited: requests are synchronous)."""
        sock = self.sock
        if sock.getsockopt(_EVENTS) & _POLLIN:  # one at a time: each check costs microseconds
            head = sock.recv()
            self._take(head[:8], Reply(head[8:10], recv_frames(sock, _U32.unpack_from(head, 10)[0]), head[14:]))

    def send_ahead(self, chan: bytes, args: bytes, rest: list, key: int | None) -> None:
        req = next(self._ids).to_bytes(8, "little")
        if len(rest) == 1:
            self.sock.send(b"".join((b"PUTA    ", req, self._single(chan), args, rest[0])))
        else:
            send_message(self.sock, [request_head(b"PUTA", req, len(rest) - 1, chan, args, rest[0]), *rest[1:]])
        # Book-keeping after the send (only this thread reads the replies, so nothing is missed):
        # the item is on its way meanwhile.
        self._ahead[req] = (chan, key)
        self.room[chan] -= 1
        if self.local is not None:
            self.local.kick()

    def _single(self, chan: bytes) -> bytes:
        """The part of a one-frame put's head that names the channel (see ``request_head``)."""
        part = self._heads.get(chan)
        if part is None:
            part = self._heads[chan] = request_head(b"", b"", 0, chan)[8:]
        return part

    def note_room(self, chan: bytes, reply: Reply) -> None:
        if reply.status in (OK, ROOM) and len(reply.extra) == 4:
            self.room[chan] = _U32.unpack(reply.extra)[0]

    def sync(self, chan: bytes) -> None:
        """Waits until the hub has handled every put sent ahead from this socket."""
        if self._ahead:
            self.request(chan, b"SYNC", [])

    def _take(self, got: bytes, reply: Reply) -> None:
        """Handles a reply nobody is waiting for: to a put sent ahead (room again, or it failed), or
        to an abandoned get."""
        ahead = self._ahead.pop(got, None)
        if ahead is not None and reply.status == ROOM:
            self._settled(got, inclusive=True)
            self.note_room(ahead[0], reply)
            return
        if ahead is not None:
            chan, key = ahead
            self.room[chan] = 0
            _release(key)
            self.undelivered[chan] = self.undelivered.get(chan, 0) + 1
            return
        chan_of_get = self._pending.pop(got, None)
        if chan_of_get is not None:
            _orphan(self, chan_of_get, reply)

    def _settled(self, req: bytes, inclusive: bool = False) -> None:
        """The reply to ``req`` came: every put sent ahead before it was handled (one socket is FIFO)."""
        n = int.from_bytes(req, "little") + inclusive
        for r in [r for r in self._ahead if int.from_bytes(r, "little") < n]:
            del self._ahead[r]

    def request(self, chan: bytes, op: bytes, rest: list, timeout: float | None = None, args: bytes = b"") -> Reply:
        req = next(self._ids).to_bytes(8, "little")
        self._pending[req] = chan
        send_message(self.sock, _message(op, req, chan, args, rest))
        if self.local is not None:
            self.local.kick()
        if timeout is not None and not self._wait(req, timeout):
            # Exactly one reply still comes: the items (if they raced the cancel) or CANCELLED.
            self.sock.send(request_head(b"CANCEL", next(self._ids).to_bytes(8, "little"), 0, chan, req))
        return self._recv(req)

    def _wait(self, req: bytes, timeout: float) -> bool:
        """True when a reply is ready within ``timeout`` seconds."""
        return bool(self.sock.poll(max(1, int(timeout * 1000))))

    def _recv(self, req: bytes) -> Reply:
        while True:
            head = self.sock.recv()
            got, reply = head[:8], Reply(head[8:10], recv_frames(self.sock, _U32.unpack_from(head, 10)[0]), head[14:])
            if got == req:
                self._pending.pop(got, None)
                if self._ahead:
                    self._settled(req)
                return reply
            self._take(got, reply)


class Reply(NamedTuple):
    """The hub's answer: a status code, the frames after the head, the head's bytes after the count."""

    status: bytes
    frames: Frames
    extra: bytes = b""


def _message(op: bytes, req: bytes, chan: bytes, args: bytes, rest: list) -> list:
    """A request's frames; a put's item travels with its first frame inside the head."""
    if op == b"PUT":
        return [request_head(op, req, len(rest) - 1, chan, args, rest[0]), *rest[1:]]
    return [request_head(op, req, len(rest), chan, args), *rest]


def _parse(msg: list[zmq.Frame]) -> tuple[bytes, Reply]:
    head = msg[0].bytes
    return head[:8], Reply(head[8:10], msg[1:], head[14:])


def flush_thread() -> None:
    """Waits for the acknowledgement of every put this thread sent ahead, on every channel.

    The worker runtime calls it when a method returns, so that a consumer or the driver that
    closes a channel after the method has finished cannot overtake the method's last puts.

    Raises:
        ChannelClosed: some of those puts found their channel closed and were not delivered.
    """
    _record_waits()
    if _state is None:
        return
    lost = []
    for conn in _state._local.__dict__.get("conns", {}).values():
        if conn._ahead:
            conn.sync(next(iter(conn._ahead.values()))[0])
        for chan, n in list(conn.undelivered.items()):
            lost.append(f"{n} on {chan.decode()!r}")
        conn.undelivered.clear()
    if lost:
        raise ChannelClosed(f"items put here were not delivered because their channel was closed: {', '.join(lost)}")


def _orphan(conn: _Conn, chan: bytes, reply: Reply) -> None:
    """A reply to an abandoned get: put its items back at the front so nothing is lost."""
    if reply.status == ITEMS:
        req = next(conn._ids).to_bytes(8, "little")
        send_message(
            conn.sock, [request_head(b"REQUEUE", req, 1 + len(reply.frames), chan), reply.extra, *reply.frames]
        )
        conn._pending[req] = chan


class _AsyncConn:
    """A DEALER socket for one event loop; a reader task routes replies to their futures."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, local: ChannelHub | None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.local = local
        self._ids = itertools.count(1)
        self._futures: dict[bytes, asyncio.Future] = {}
        self._chans: dict[bytes, bytes] = {}
        self._reader: asyncio.Task | None = None

    async def request(self, chan: bytes, op: bytes, rest: list, args: bytes = b"") -> Reply:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())
        req = next(self._ids).to_bytes(8, "little")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._futures[req], self._chans[req] = fut, chan
        await self.sock.send_multipart(_message(op, req, chan, args, rest), copy=False)
        if self.local is not None:
            self.local.kick()
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if not fut.done():  # the reply (items or CANCELLED) will be handled by the reader
                fut.add_done_callback(lambda f: None)
                self._futures.pop(req, None)
                cancel = next(self._ids).to_bytes(8, "little")
                await self.sock.send_multipart([request_head(b"CANCEL", cancel, 0, chan, req)])
            raise

    async def _read(self) -> None:
        while True:
            req, reply = _parse(await self.sock.recv_multipart(copy=False))
            chan = self._chans.pop(req, None)
            fut = self._futures.pop(req, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)
            elif chan is not None and reply.status == ITEMS:
                requeue = next(self._ids).to_bytes(8, "little")
                self._chans[requeue] = chan
                head = request_head(b"REQUEUE", requeue, 1 + len(reply.frames), chan)
                frames = [head, reply.extra, *reply.frames]
                await self.sock.send_multipart(frames, copy=False)


class DataServer:
    """Serves this process's large outgoing buffers to consumers (one thread, zmq ROUTER)."""

    def __init__(self, ctx: zmq.Context, ip: str) -> None:
        # key -> the item's buffers, or (offset, bytes, buffer offsets) of an item in the shm pool
        self._store: dict[int, list[memoryview] | tuple[int, int, list[int]]] = {}
        self.pool: shm.SharedPool | None = None
        self._lock = threading.Lock()
        self._keys = itertools.count(1)
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        self.address = bind_endpoint(sock, ip, "data")
        self._sock = sock
        threading.Thread(target=self._serve, name="rlinf-data-server", daemon=True).start()

    def store(self, buffers: list[memoryview]) -> int:
        key = next(self._keys)
        with self._lock:
            self._store[key] = buffers
        return key

    def store_shm(self, off: int, nbytes: int, offsets: list[int]) -> int:
        key = next(self._keys)
        with self._lock:
            self._store[key] = (off, nbytes, offsets)
        return key

    def take(self, key: int) -> list[memoryview] | tuple[int, int, list[int]] | None:
        with self._lock:
            return self._store.pop(key, None)

    def discard(self, key: int) -> None:
        entry = self.take(key)
        if isinstance(entry, tuple) and self.pool is not None:
            self.pool.release(entry[0], entry[1])

    def __len__(self) -> int:
        return len(self._store)

    def _serve(self) -> None:
        while True:
            ident, req, body = self._sock.recv_multipart()
            op, key = body[:1], int.from_bytes(body[1:], "little")
            if op == b"R":  # a consumer on this machine is done with an item in shared memory
                self.discard(key)
                continue
            entry = self.take(key)
            if entry is None:
                self._sock.send_multipart([ident, req, b"GONE"])
            elif isinstance(entry, tuple):  # in shared memory, asked for from another machine
                off, nbytes, offsets = entry
                pool = self.pool
                if pool is None:
                    self._sock.send_multipart([ident, req, b"GONE"])
                    continue
                ends = [*offsets[1:], off + nbytes]
                parts = [bytes(pool.view[a:b]) for a, b in zip(offsets, ends, strict=True)]
                pool.release(off, nbytes)
                self._sock.send_multipart([ident, req, OK, *parts])
            else:
                self._sock.send_multipart([ident, req, OK, *entry], copy=False)


class _Process:
    """This process's zmq context, hub connections and data server."""

    def __init__(self) -> None:
        self.ctx: zmq.Context = zmq.Context.instance()
        self.actx = zmq.asyncio.Context.shadow(self.ctx.underlying)
        self._local = threading.local()
        self._aconns: dict[tuple[int, str], _AsyncConn] = {}
        self._server: DataServer | None = None
        self._hub: str | None = None
        self._local_hub: ChannelHub | None = None
        self._local_address = ""
        self._pool: shm.SharedPool | None = None
        self._pool_tried = False
        self._releaser: shm.Releaser | None = None
        self._lock = threading.Lock()

    def shm_pool(self) -> shm.SharedPool | None:
        """This process's shared-memory pool for large items, or None where there is none."""
        if self._pool is None and not self._pool_tried:
            server = self.data_server()
            with self._lock:
                if not self._pool_tried:
                    self._pool_tried = True
                    if shm.available():
                        try:
                            self._pool = shm.SharedPool()
                        except OSError:
                            self._pool = None  # e.g. /dev/shm too small: sockets it is
                    server.pool = self._pool
        return self._pool

    def releaser(self) -> shm.Releaser:
        with self._lock:
            if self._releaser is None:
                self._releaser = shm.Releaser(self.ctx, connect_address)
            return self._releaser

    def local_hub(self) -> str:
        """The address of this process's own hub (for channels created with ``host="here"``)."""
        with self._lock:
            if self._local_hub is None:
                from rlinf.cluster import bind_ip

                self._local_hub = ChannelHub(bind_ip())
                self._local_address = self._local_hub.address()
            return self._local_address

    def hosted(self, address: str) -> ChannelHub | None:
        """This process's own hub, if ``address`` is its address."""
        return self._local_hub if address == self._local_address else None

    def forget_hub(self) -> None:
        """The cluster stopped: the next channel looks its (new) hub up again. Drops this thread's
        connection to the old hub; other threads' connections to it are no longer used."""
        with self._lock:
            old, self._hub = self._hub, None
        conns = self._local.__dict__.get("conns", {})
        if old is not None and old in conns:
            conns.pop(old).sock.close()

    def hub_address(self) -> str:
        if self._hub is None:
            import ray

            from rlinf.cluster import HUB_NAME, NAMESPACE

            if not ray.is_initialized():
                raise RlinfError("channels need a running cluster: create rlinf.Cluster() first.")
            try:
                hub: Any = ray.get_actor(HUB_NAME, namespace=NAMESPACE)
            except ValueError:
                raise RlinfError("no channel hub is running: create rlinf.Cluster() first.") from None
            self._hub = str(ray.get(hub.address.remote()))
        return self._hub

    def conn(self, address: str) -> _Conn:
        conns = self._local.__dict__.setdefault("conns", {})
        if address not in conns:
            conns[address] = _Conn(self.ctx, connect_address(address), self.hosted(address))
        return conns[address]

    def aconn(self, address: str) -> _AsyncConn:
        key = (id(asyncio.get_running_loop()), address)
        if key not in self._aconns:
            self._aconns[key] = _AsyncConn(self.actx, connect_address(address), self.hosted(address))
        return self._aconns[key]

    def data_server(self) -> DataServer:
        with self._lock:
            if self._server is None:
                from rlinf.cluster import bind_ip

                self._server = DataServer(self.ctx, bind_ip())
            return self._server

    def fetch(self, address: str, key: int, sizes: list[int]) -> list[Any]:
        if self._server is not None and address == self._server.address:
            local = self._server.take(key)
            if isinstance(local, list):
                return list(local)
        socks: dict[str, tuple[zmq.Socket, Iterator[int]]] = self._local.__dict__.setdefault("fetch", {})
        if address not in socks:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVHWM, 0)
            s.connect(connect_address(address))
            socks[address] = (s, itertools.count(1))
        sock, ids = socks[address]
        req = next(ids).to_bytes(8, "little")
        sock.send_multipart([req, b"F" + key.to_bytes(8, "little")])
        while True:
            if not sock.poll(int(FETCH_TIMEOUT_S * 1000)):
                raise RlinfError(
                    f"the producer at {address} did not send the tensors of an item within "
                    f"{FETCH_TIMEOUT_S} s; it has probably exited. Keep producers alive until their "
                    f"items are consumed (or raise RLINF_CHANNEL_FETCH_TIMEOUT_S)."
                )
            msg = sock.recv_multipart(copy=False)
            if msg[0].bytes == req:
                break
        if msg[1].bytes != OK:
            raise RlinfError(f"the producer at {address} no longer holds the item (key {key}).")
        return [f.buffer for f in msg[2:]]


_state: _Process | None = None
_state_lock = threading.Lock()


def forget_cluster() -> None:
    """Called when a cluster stops: channels made afterwards talk to the next cluster's hub, not the
    stopped one's (which would leave them waiting for a reply forever)."""
    state = _state
    if state is not None:
        state.forget_hub()


def _forget_state() -> None:
    global _state, _state_lock
    _state, _state_lock = None, threading.Lock()


# A forked child makes its transport state anew: sockets and threads don't survive a fork.
os.register_at_fork(after_in_child=_forget_state)


def _process() -> _Process:
    """This process's transport state."""
    state = _state
    return state if state is not None else _make_state()


def _make_state() -> _Process:
    global _state
    with _state_lock:
        if _state is None:
            _state = _Process()
        return _state
