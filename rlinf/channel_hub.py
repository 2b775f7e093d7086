"""The channel hub: one process that keeps every channel's FIFO of item headers.

It runs a single zmq ROUTER loop. Items arrive as frames and leave as the same frames
(zero-copy in both directions); the hub never unpickles them. Large tensor/array buffers are
not sent here at all: the item holds a reference to the producer's data server, and the
consumer fetches them from there directly (see ``rlinf.channel``).

Protocol, client (DEALER) -> hub (ROUTER). A request is one head frame ``op(8) req(8) args channel``
(args of a fixed size per op) plus item frames; the reply is a head ``req(8) status(2) [extra]`` plus
frames. Messages carry as few frames as possible: on this kind of machine each costs microseconds.
    CREATE  args maxsize                -> OK, extra maxsize
    PUT     args weight; item frames    -> OK, extra room, when queued (delayed while full) | CLOSED
    PUTA    args weight; item frames    -> nothing when queued | CLOSED  (a put sent ahead: see channel.py)
    SYNC                                -> OK once everything sent before on this socket was handled
    GET     args max_items min_w max_w  -> ITEMS, extra = batch layout; item frames (when satisfied) | CLOSED
    CANCEL  args target                 -> the target's own reply if it already went out, else CANCELLED
    REQUEUE frame batch layout; frames  -> OK (items go back to the front, e.g. after an abandoned get)
    CLOSE                               -> OK
    ALIAS   frame address               -> OK: the channel lives in the hub at address (CREATE answers
                                           REDIRECT, extra address) | ER if it exists elsewhere
    STAT                                -> STAT, frame json
Every request but PUTA gets exactly one reply. A batch layout is ``n`` then each item's frame count and weight.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import uuid
from array import array
from collections import deque
from dataclasses import dataclass, field

import zmq

OK, CLOSED, ITEMS, CANCELLED, STAT, NOCHAN, REDIRECT = b"OK", b"CL", b"IT", b"CA", b"ST", b"NC", b"RD"
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")
GET_ARGS = struct.Struct("<Idd")
ARG_BYTES = {b"PUT": 8, b"PUTA": 8, b"GET": GET_ARGS.size, b"CREATE": 4, b"CANCEL": 8}


@dataclass
class _Waiter:
    ident: bytes
    req: bytes
    max_items: int
    min_weight: float
    max_weight: float
    taken: list[tuple[float, list[zmq.Frame]]] = field(default_factory=list)
    weight: float = 0.0


@dataclass
class _Chan:
    maxsize: int
    queue: deque[tuple[float, list[zmq.Frame]]] = field(default_factory=deque)
    waiters: deque[_Waiter] = field(default_factory=deque)
    # producers' puts waiting for room: (ident, req, weight, frames, whether the put wants a reply)
    blocked: deque[tuple[bytes, bytes, float, list[zmq.Frame], bool]] = field(default_factory=deque)
    closed: bool = False
    puts: int = 0
    gets: int = 0


class ChannelHub:
    """Hosts every channel of a cluster; runs as a Ray actor on the driver's node."""

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
        self._thread = threading.Thread(target=self._loop, name="rlinf-channel-hub", daemon=True)
        self._thread.start()

    def address(self) -> str:
        return self._address

    # ---- loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        sock = self._sock
        while True:
            msg = sock.recv_multipart(copy=False)
            ident, head = msg[0].bytes, msg[1].bytes
            op, req = head[:8].rstrip(), head[8:16]
            n = ARG_BYTES.get(op, 0)
            args, name = head[16 : 16 + n], head[16 + n :]
            try:
                self._handle(ident, op, name, req, args, msg[2:])
            except Exception as e:  # a malformed request must not kill the hub
                sock.send_multipart([ident, req + b"ER", repr(e).encode()])

    def _send(self, ident: bytes, req: bytes, status: bytes, *rest: object, extra: bytes = b"") -> None:
        self._sock.send_multipart([ident, req + status + extra, *rest], copy=bool(not rest))

    def _handle(self, ident: bytes, op: bytes, name: bytes, req: bytes, args: bytes, rest: list[zmq.Frame]) -> None:
        if op == b"ALIAS":
            where = rest[0].bytes
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
        if op in (b"PUT", b"PUTA"):
            # PUTA ("put ahead") is sent while the producer knows there is room: it is answered
            # only if it fails, which saves a message and a wake-up per item.
            reply = op == b"PUT"
            weight = _F64.unpack(args)[0]
            if chan.closed:
                return self._send(ident, req, CLOSED)
            if chan.maxsize and len(chan.queue) >= chan.maxsize:
                chan.blocked.append((ident, req, weight, rest, reply))
                return None
            chan.queue.append((weight, rest))
            chan.puts += 1
            self._serve(chan)  # a waiting consumer gets the item before the producer gets its ack
            if reply:
                self._send(ident, req, OK, extra=_room(chan))
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
            items = split_batch(rest[0].bytes, rest[1:])
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
                    self._send(b_ident, b_req, OK, extra=_room(chan))
                admitted = True
            if not (admitted and chan.waiters):
                break
        if chan.closed and not chan.queue:
            while chan.waiters:
                w = chan.waiters.popleft()
                if w.taken:
                    self._deliver(chan, w)  # a partial batch: the last one before the end
                else:
                    self._send(w.ident, w.req, CLOSED)

    def _deliver(self, chan: _Chan, w: _Waiter) -> None:
        frames = [f for _, item in w.taken for f in item]
        chan.gets += len(w.taken)
        self._send(w.ident, w.req, ITEMS, *frames, extra=batch_layout(w.taken))


def _room(chan: _Chan) -> bytes:
    """Free slots, sent with every put's acknowledgement so producers can send the next ones ahead."""
    free = chan.maxsize - len(chan.queue) if chan.maxsize else 1 << 20
    return _U32.pack(max(0, free))


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


def batch_layout(items: list[tuple[float, list]]) -> bytes:
    """``n``, then each item's frame count and weight: how to cut a flat frame list into items."""
    counts = array("I", [len(frames) for _, frames in items]).tobytes()
    weights = array("d", [weight for weight, _ in items]).tobytes()
    return _U32.pack(len(items)) + counts + weights


def split_batch(layout: bytes, frames: list) -> list[tuple[float, list]]:
    """Inverse of :func:`batch_layout`: ``(weight, frames)`` per item."""
    n = _U32.unpack(layout[:4])[0]
    sizes, ws = array("I"), array("d")
    sizes.frombytes(layout[4 : 4 + 4 * n])
    ws.frombytes(layout[4 + 4 * n : 4 + 12 * n])
    out, i = [], 0
    for size, w in zip(sizes, ws, strict=True):
        out.append((w, list(frames[i : i + size])))
        i += size
    return out


_MACHINE = machine_key()


def this_machine() -> str:
    """:func:`machine_key` of this process, read once."""
    return _MACHINE
