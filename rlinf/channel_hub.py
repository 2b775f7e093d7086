"""The channel hub: keeps channels' FIFOs of items; the cluster's hub is one process for all of them.

It reads one zmq ROUTER socket. Items arrive as frames and leave as the same frames (zero-copy in
both directions); the hub never unpickles them. Large tensor/array buffers are not sent here at
all: the item holds a reference to the producer's shared memory or data server, and the consumer
takes them from there directly (see ``rlinf.channel``).

Protocol, client (DEALER) -> hub (ROUTER). A request is a head frame ``op(8) req(8) nframes(4)
namelen(2) channel args [body]`` (args of a fixed size per op) followed by ``nframes`` frames; a put
carries its item's first frame as the body, so a small item is a single frame. A reply is a head
``req(8) status(2) nframes(4) [extra]`` followed by its frames. Both sides read exactly the frames a
head announces, with one plain ``recv`` each (pyzmq's multipart helpers cost several times more).
    CREATE  args maxsize                -> OK, extra maxsize
    PUT     args weight; item frames    -> OK, extra room, when queued (delayed while full) | CLOSED
    PUTA    args weight; item frames    -> nothing when queued | CLOSED  (a put sent ahead: see channel.py)
                                           | ROOM, extra room: queued, and this was the last put the
                                           producer could send ahead, but there is room again
    SYNC                                -> OK once everything sent before on this socket was handled
    GET     args max_items min_w max_w  -> ITEMS, extra = batch layout; item frames (when satisfied) | CLOSED
    CANCEL  args target                 -> the target's own reply if it already went out, else CANCELLED
    REQUEUE frame batch layout; frames  -> OK (items go back to the front, e.g. after an abandoned get)
    CLOSE                               -> OK
    ALIAS   frame address               -> OK: the channel lives in the hub at address (CREATE answers
                                           REDIRECT, extra address) | ER if it exists elsewhere
    STAT                                -> STAT, frame json
    WAKE                                -> nothing (makes the reader look at its state again)
Every request but PUTA and WAKE gets exactly one reply. A batch layout is ``n`` then each item's frame
count and weight.

Who reads the socket: in the cluster's hub process, the hub thread. In a process hosting channels
(``Channel(name, host="here")``), a thread of that process that waits in ``get`` reads the socket
itself and handles every request that comes meanwhile, so an item reaches it with no hand-off
between threads; the hub thread takes over only when no local consumer has waited for
``HOLD_S``, and a local consumer takes the socket back by sending it ``WAKE``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

OK, CLOSED, ITEMS, CANCELLED, STAT, NOCHAN, REDIRECT = b"OK", b"CL", b"IT", b"CA", b"ST", b"NC", b"RD"
ROOM = b"RM"
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")
GET_ARGS = struct.Struct("<Idd")
_COUNTS = struct.Struct("<IH")  # in a request head: frames that follow, length of the channel name
ARG_BYTES = {b"PUT": 8, b"PUTA": 8, b"GET": GET_ARGS.size, b"CREATE": 4, b"CANCEL": 8}
# A consumer thread of a hosting process keeps the socket this long after its last get, so that a
# consumer taking items one after another never waits for the hub thread to give the socket back.
HOLD_S = float(os.environ.get("RLINF_CHANNEL_HOLD_S", 0.005))
_MORE = int(zmq.SNDMORE)

Frames = list[Any]  # bytes or zmq.Frame; the first frame of an item arrives as bytes


def request_head(op: bytes, req: bytes, nframes: int, chan: bytes, args: bytes = b"", body: bytes = b"") -> bytes:
    return op.ljust(8) + req + _COUNTS.pack(nframes, len(chan)) + chan + args + body


def reply_head(req: bytes, status: bytes, nframes: int, extra: bytes = b"") -> bytes:
    return req + status + _U32.pack(nframes) + extra


def send_message(sock: zmq.Socket, parts: Sequence[Any]) -> None:
    """Sends ``parts`` as one message; pyzmq copies small frames and passes large ones zero-copy."""
    last = len(parts) - 1
    for i, part in enumerate(parts):
        sock.send(part, _MORE if i < last else 0, copy=False)


def recv_frames(sock: zmq.Socket, n: int) -> Frames:
    """The ``n`` frames after a head: the first as bytes (small metadata), the others zero-copy."""
    if not n:
        return []
    return [sock.recv(), *[sock.recv(copy=False) for _ in range(n - 1)]]


@dataclass(slots=True)
class _Waiter:
    ident: bytes
    req: bytes
    max_items: int
    min_weight: float
    max_weight: float
    taken: list[tuple[float, Frames]] = field(default_factory=list)
    weight: float = 0.0
    local: bool = False  # a thread of the hub's own process: answered in memory, not on the socket
    done: bool = False
    closed: bool = False  # answered: closed and drained


@dataclass(slots=True)
class _Chan:
    maxsize: int
    queue: deque[tuple[float, Frames]] = field(default_factory=deque)
    waiters: deque[_Waiter] = field(default_factory=deque)
    # producers' puts waiting for room: (ident, req, weight, frames, whether the put wants a reply)
    blocked: deque[tuple[bytes, bytes, float, Frames, bool]] = field(default_factory=deque)
    # per producer socket: how many more puts it may send ahead, as far as it knows (credit)
    credit: dict[bytes, int] = field(default_factory=dict)
    closed: bool = False
    puts: int = 0
    gets: int = 0


class ChannelHub:
    """Hosts channels: the cluster's hub runs as a Ray actor on the driver's node; a process that
    hosts channels itself (``host="here"``) runs one too."""

    def __init__(self, host: str | None = None) -> None:
        import ray

        ip = host or ray.util.get_node_ip_address()
        self._ctx: zmq.Context = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._address = bind_endpoint(self._sock, ip, "hub")
        self._chans: dict[bytes, _Chan] = {}
        self._aliases: dict[bytes, bytes] = {}  # channels hosted by another process's hub
        # Everything below is guarded by _lock. Only the reader (a thread id) touches the socket;
        # others queue their replies in _outbox and wake the reader.
        self._lock = threading.Lock()
        self._turn = threading.Condition(self._lock)  # local consumers wait here for an item or the socket
        self._idle = threading.Condition(self._lock)  # the hub thread waits here for the socket
        self._reader: int | None = None
        self._wanted = 0  # local consumers waiting to read the socket
        self._hold_until = 0.0
        self._outbox: list[list[Any]] = []
        self._waker = self._ctx.socket(zmq.DEALER)
        self._waker.setsockopt(zmq.LINGER, 0)
        self._waker.setsockopt(zmq.SNDHWM, 0)
        self._waker.connect(self._address.split("|")[3])
        self._waker_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="rlinf-channel-hub", daemon=True)
        self._thread.start()

    def address(self) -> str:
        return self._address

    # ---- who reads the socket ------------------------------------------------------------------

    def _loop(self) -> None:
        me = threading.get_ident()
        while True:
            with self._lock:
                while True:
                    if self._reader is None and not self._wanted:
                        left = self._hold_until - time.monotonic()
                        if left <= 0:
                            self._reader = me
                            break
                    self._idle.wait(HOLD_S)
            self._pump(None, None)
            with self._lock:
                self._reader = None
                self._turn.notify_all()

    def _pump(self, waiter: _Waiter | None, deadline: float | None) -> bool:
        """As the reader: handles requests until the local ``waiter`` is answered, or for the hub
        thread (``None``) until a local consumer wants the socket (True), or the deadline (False)."""
        sock, lock = self._sock, self._lock
        while True:
            # Read without the lock: whoever adds to the outbox, answers the waiter from another
            # thread or wants the socket, sends WAKE afterwards, so the recv below returns.
            if waiter.done if waiter is not None else self._wanted > 0:
                return True  # before sending the outbox: a local consumer takes its item first
            if self._outbox:
                with lock:
                    for msg in self._outbox:
                        send_message(sock, msg)
                    self._outbox.clear()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if not sock.poll(max(1, int(left * 1000))):
                    continue
            ident = sock.recv()
            head = sock.recv()
            nframes, namelen = _COUNTS.unpack_from(head, 16)
            rest = [sock.recv(copy=False) for _ in range(nframes)] if nframes else []
            with lock:
                self._dispatch(ident, head, namelen, rest)
                if waiter is not None and waiter.done:  # give the socket up under this same lock
                    self._give_up_socket()
                    return True

    def _give_up_socket(self) -> None:
        """A local consumer stops reading the socket (lock held); it keeps first claim for HOLD_S."""
        self._reader = None
        self._hold_until = time.monotonic() + HOLD_S
        if self._wanted:
            self._turn.notify_all()
        # what is left in the outbox goes with the next reader: this thread's next get, or the hub
        # thread once the hold ends

    def _wake(self) -> None:
        """Makes the reader return from its ``recv`` (to send the outbox or give the socket up)."""
        with self._waker_lock:
            self._waker.send(request_head(b"WAKE", bytes(8), 0, b""))

    def kick(self) -> None:
        """Ends a local consumer's hold on the socket now (a thread of this process sent a request)."""
        if self._hold_until > time.monotonic():
            with self._lock:
                self._hold_until = 0.0
                self._idle.notify()

    # ---- local consumers -----------------------------------------------------------------------

    def local_get(
        self, name: bytes, max_items: int, min_weight: float, max_weight: float, timeout: float | None
    ) -> list[tuple[float, Frames]] | None:
        """A ``GET`` from a thread of this process, read off the socket by that thread itself.

        Returns:
            the items, ``None`` once the channel is closed and drained.

        Raises:
            TimeoutError: nothing (or not enough) arrived within ``timeout`` seconds.
            KeyError: no such channel here.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        w = _Waiter(b"", b"", max_items, min_weight, max_weight, [], local=True)
        with self._lock:
            chan = self._chans[name]
            chan.waiters.append(w)
            if chan.queue or chan.closed:
                self._serve(chan)
            while not w.done and self._reader is not None:
                self._wanted += 1
                if self._reader == self._thread.ident:
                    self._wake()
                left = None if deadline is None else deadline - time.monotonic()
                in_time = (left is None or left > 0) and self._turn.wait(left)
                self._wanted -= 1
                if not in_time and not w.done:
                    self._withdraw(chan, w)
                    raise TimeoutError
            if not w.done:
                self._reader = threading.get_ident()
        if not w.done:
            me = threading.get_ident()
            try:
                self._pump(w, deadline)
            finally:
                if self._reader == me:  # not given up by _pump: timed out, interrupted, or answered meanwhile
                    with self._lock:
                        if not w.done:
                            self._withdraw(chan, w)
                        self._give_up_socket()
            if not w.done:
                raise TimeoutError
        return None if w.closed else w.taken

    def local_requeue(self, name: bytes, items: list[tuple[float, Frames]]) -> None:
        """Puts items a local consumer took but did not use back at the front of the channel."""
        with self._lock:
            chan = self._chans[name]
            chan.queue.extendleft(reversed(items))
            self._serve(chan)

    def _withdraw(self, chan: _Chan, w: _Waiter) -> None:
        if w in chan.waiters:
            chan.waiters.remove(w)
        chan.queue.extendleft(reversed(w.taken))
        self._serve(chan)

    # ---- requests ------------------------------------------------------------------------------

    def _dispatch(self, ident: bytes, head: bytes, namelen: int, rest: Frames) -> None:
        end = 22 + namelen
        name, req = head[22:end], head[8:16]
        try:
            if head[:8] == b"PUTA    ":  # the most frequent request first
                chan = self._chans.get(name)
                if chan is not None:
                    item = [memoryview(head)[end + 8 :], *rest]
                    return self._put(chan, ident, req, head[end : end + 8], item, False)
            op = head[:8].rstrip()
            n = ARG_BYTES.get(op, 0)
            if len(head) > end + n:  # a put's body: its item's first frame
                rest = [memoryview(head)[end + n :], *rest]
            self._handle(ident, op, name, req, head[end : end + n], rest)
        except Exception as e:  # a malformed request must not kill the hub
            self._send(ident, req, b"ER", repr(e).encode())

    def _send(
        self, ident: bytes, req: bytes, status: bytes, *rest: Any, extra: bytes = b"", later: bool = False
    ) -> None:
        """Sends a reply now, or through the outbox when this thread is not the reader or the reply can
        wait (``later``) until the reader next blocks (the thread of a local consumer: after it has
        handled its item; each send wakes the process's I/O thread, which takes the CPU from it)."""
        msg = [ident, reply_head(req, status, len(rest), extra), *rest]
        reading = self._reader == threading.get_ident()
        if reading and not later:
            send_message(self._sock, msg)
            return
        self._outbox.append(msg)
        if not reading and len(self._outbox) == 1:
            self._wake()

    def _handle(self, ident: bytes, op: bytes, name: bytes, req: bytes, args: bytes, rest: Frames) -> None:
        if op == b"WAKE":
            return None
        if op == b"ALIAS":
            where = bytes(rest[0])
            if name in self._chans or self._aliases.get(name, where) != where:
                other = self._aliases.get(name, b"this hub")
                return self._send(ident, req, b"ER", other)
            self._aliases[name] = where
            return self._send(ident, req, OK)
        if op == b"CREATE":
            if name in self._aliases:
                return self._send(ident, req, REDIRECT, extra=self._aliases[name])
            if name not in self._chans:
                self._chans[name] = _Chan(maxsize=_U32.unpack(args)[0])
            return self._send(ident, req, OK, extra=_U32.pack(self._chans[name].maxsize))
        chan = self._chans.get(name)
        if chan is None:
            return self._send(ident, req, NOCHAN)
        if op == b"PUT":
            self._put(chan, ident, req, args, rest, True)
        elif op == b"SYNC":
            self._send(ident, req, OK)  # everything this socket sent before has been handled
        elif op == b"GET":
            max_items, min_w, max_w = GET_ARGS.unpack(args)
            chan.waiters.append(_Waiter(ident, req, max_items, min_w, max_w))
            self._serve(chan)
        elif op == b"CANCEL":
            target = args
            for w in chan.waiters:
                if w.ident == ident and w.req == target:
                    chan.waiters.remove(w)
                    chan.queue.extendleft(reversed(w.taken))
                    self._send(ident, target, CANCELLED)
                    return self._serve(chan)
            for b in chan.blocked:
                if b[0] == ident and b[1] == target:
                    chan.blocked.remove(b)
                    return self._send(ident, target, CANCELLED)
            # Already answered: the client reads that reply instead.
        elif op == b"REQUEUE":
            items = split_batch(bytes(rest[0]), rest[1:])
            chan.queue.extendleft(reversed(items))
            self._send(ident, req, OK)
            self._serve(chan)
        elif op == b"CLOSE":
            chan.closed = True
            for b_ident, b_req, _, _, _ in chan.blocked:
                self._send(b_ident, b_req, CLOSED)
            chan.blocked.clear()
            self._send(ident, req, OK)
            self._serve(chan)
        elif op == b"STAT":
            stat = {
                "size": len(chan.queue),
                "maxsize": chan.maxsize,
                "closed": chan.closed,
                "puts": chan.puts,
                "gets": chan.gets,
                "waiting_consumers": len(chan.waiters),
                "blocked_producers": len(chan.blocked),
            }
            self._send(ident, req, STAT, json.dumps(stat).encode())
        else:
            self._send(ident, req, b"ER", b"unknown op " + op)

    def _put(self, chan: _Chan, ident: bytes, req: bytes, args: bytes, item: Frames, reply: bool) -> None:
        # PUTA ("put ahead", reply=False) is sent while the producer knows there is room: it is
        # answered only if it fails, which saves a message and a wake-up per item.
        weight = _F64.unpack(args)[0]
        if chan.closed:
            return self._send(ident, req, CLOSED)
        if chan.maxsize and len(chan.queue) >= chan.maxsize:
            chan.blocked.append((ident, req, weight, item, reply))
            if not reply:
                chan.credit[ident] = chan.credit.get(ident, 1) - 1
            return None
        chan.puts += 1
        waiter = chan.waiters[0] if chan.waiters and not chan.queue else None
        if waiter is not None and (weight >= waiter.min_weight or waiter.max_items == 1) and not waiter.taken:
            # The first waiting consumer takes just this item: what _serve would do, done directly.
            chan.waiters.popleft()
            waiter.taken.append((weight, item))
            waiter.weight = weight
            self._deliver(chan, waiter)
        else:
            chan.queue.append((weight, item))
            self._serve(chan)  # a waiting consumer gets the item before the producer gets its ack
        if reply:
            self._ack(chan, ident, req)
            return None
        credit = chan.credit.get(ident, 1) - 1
        if credit <= 0 and (not chan.maxsize or len(chan.queue) < chan.maxsize):
            # It has used up its credit, but consumers made room: say so now, so that its next
            # put need not wait for an answer.
            self._ack(chan, ident, req, ROOM)  # sent once this thread next waits
        else:
            chan.credit[ident] = credit
        return None

    def _serve(self, chan: _Chan) -> None:
        """Hands queued items to waiting consumers in FIFO order, then admits blocked producers."""
        while True:
            while chan.waiters and chan.queue:
                w = chan.waiters[0]
                while chan.queue:
                    weight = chan.queue[0][0]
                    # Take the next item while the batch is below its minimum weight (overshooting
                    # if one item is heavy), or while it still fits under the maximum.
                    if w.taken and w.weight >= w.min_weight and w.weight + weight > w.max_weight:
                        break
                    w.taken.append(chan.queue.popleft())
                    w.weight += weight
                    if w.max_items and len(w.taken) >= w.max_items:
                        break
                full = (w.max_items and len(w.taken) >= w.max_items) or w.weight >= w.min_weight
                if not full:
                    break  # queue is empty now; this consumer keeps waiting for more
                chan.waiters.popleft()
                self._deliver(chan, w)
            admitted = False
            while chan.blocked and (not chan.maxsize or len(chan.queue) < chan.maxsize):
                b_ident, b_req, weight, frames, reply = chan.blocked.popleft()
                chan.queue.append((weight, frames))
                chan.puts += 1
                if reply:
                    self._ack(chan, b_ident, b_req)
                admitted = True
            if not (admitted and chan.waiters):
                break
        if chan.closed and not chan.queue:
            while chan.waiters:
                w = chan.waiters.popleft()
                if w.taken:
                    self._deliver(chan, w)  # a partial batch: the last one before the end
                elif w.local:
                    self._answer(w, closed=True)
                else:
                    self._send(w.ident, w.req, CLOSED)

    def _ack(self, chan: _Chan, ident: bytes, req: bytes, status: bytes = OK) -> None:
        """Acknowledges a queued put with the room left, which the producer may fill without waiting.

        A ``ROOM`` note answers a put nobody waits for: it goes out when the reader next waits.
        """
        free = chan.maxsize - len(chan.queue) if chan.maxsize else 1 << 20
        chan.credit[ident] = max(0, free)
        self._send(ident, req, status, extra=_U32.pack(max(0, free)), later=status == ROOM)

    def _deliver(self, chan: _Chan, w: _Waiter) -> None:
        chan.gets += len(w.taken)
        if w.local:
            self._answer(w)
            return
        frames = [f for _, item in w.taken for f in item]
        self._send(w.ident, w.req, ITEMS, *frames, extra=batch_layout(w.taken))

    def _answer(self, w: _Waiter, closed: bool = False) -> None:
        w.done, w.closed = True, closed
        if self._wanted:  # its thread may be waiting for another reader to serve it
            self._turn.notify_all()


def machine_key() -> str:
    """Identifies this machine and network namespace: peers with the same key can use ipc."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return f"{socket.gethostname()}:{os.getpid()}"  # no /proc: never share ipc


def bind_endpoint(sock: zmq.Socket, ip: str, role: str) -> str:
    """Binds ``sock`` to TCP on ``ip`` and, on Linux, to an abstract unix socket (no file to clean up).

    Returns ``"tcp://ip:port|ipc://@name|machine-key|inproc://name|pid"``; :func:`connect_address`
    picks inproc inside the same process (no kernel, no I/O threads), ipc on the same machine,
    and TCP for the others.
    """
    port = sock.bind_to_random_port(f"tcp://{ip}")
    tcp = f"tcp://{ip}:{port}"
    name = f"rlinf-{role}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    inproc = f"inproc://{name}"
    sock.bind(inproc)  # sockets of this process share zmq.Context.instance()
    ipc = ""
    if sys.platform.startswith("linux"):
        ipc = f"ipc://@{name}"
        sock.bind(ipc)
    return f"{tcp}|{ipc}|{machine_key()}|{inproc}|{os.getpid()}"


def connect_address(endpoint: str) -> str:
    tcp, ipc, key, inproc, pid = endpoint.split("|")
    if pid == str(os.getpid()):
        return inproc
    return ipc if ipc and key == _MACHINE else tcp


def batch_layout(items: list[tuple[float, Frames]]) -> bytes:
    """``n``, then each item's frame count and weight: how to cut a flat frame list into items."""
    n = len(items)
    return struct.pack(f"<I{n}I{n}d", n, *[len(frames) for _, frames in items], *[w for w, _ in items])


def split_batch(layout: bytes, frames: Sequence[Any]) -> list[tuple[float, Frames]]:
    """Inverse of :func:`batch_layout`: ``(weight, frames)`` per item."""
    n = _U32.unpack_from(layout)[0]
    if n == 1:
        return [(_F64.unpack_from(layout, 8)[0], list(frames))]
    fields = struct.unpack_from(f"<{n}I{n}d", layout, 4)
    out, i = [], 0
    for size, w in zip(fields[:n], fields[n:], strict=True):
        out.append((w, list(frames[i : i + size])))
        i += size
    return out


_MACHINE = machine_key()


def this_machine() -> str:
    """:func:`machine_key` of this process, read once."""
    return _MACHINE
