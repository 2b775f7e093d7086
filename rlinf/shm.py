"""Shared memory for large channel payloads between processes on one machine.

Sockets copy a payload twice (into the kernel and out again); a shared-memory segment needs one
copy, by the producer. Each producing process keeps one pool file in ``/dev/shm`` and places
large items' buffers in it; a consumer on the same machine maps just that item's pages and
builds its tensors on them without copying. When the consumer's last tensor of the item is
freed, it tells the producer, which reuses the space. A consumer that dies holding items leaks
their space until the producer exits; a full pool makes producers fall back to sockets.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import mmap
import os
import queue
import threading
import uuid
import weakref
from typing import Any

import numpy as np
import zmq

POOL_BYTES = int(os.environ.get("RLINF_SHM_POOL_MB", "512")) << 20
SHM_BYTES = int(os.environ.get("RLINF_SHM_MIN_BYTES", 256 << 10))  # smaller items go over sockets
PAGE = mmap.ALLOCATIONGRANULARITY
_DIR = "/dev/shm"


def available() -> bool:
    return os.path.isdir(_DIR) and os.access(_DIR, os.W_OK) and POOL_BYTES > 0


def _round(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


class SharedPool:
    """One producer's segment: a first-fit allocator over page-aligned extents."""

    def __init__(self, nbytes: int = POOL_BYTES) -> None:
        sweep_stale()
        self.path = f"{_DIR}/rlinf-pool-{os.getpid()}-{uuid.uuid4().hex[:10]}"
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            self._mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.view = np.frombuffer(self._mm, dtype=np.uint8)
        self.nbytes = nbytes
        self._free: list[tuple[int, int]] = [(0, nbytes)]  # (offset, size), sorted by offset
        self._lock = threading.Lock()
        self.used = 0
        atexit.register(self.unlink)

    def alloc(self, n: int) -> int | None:
        """Offset of ``n`` bytes (page-aligned), or None when no extent is large enough."""
        need = _round(max(n, 1))
        with self._lock:
            for i, (off, size) in enumerate(self._free):
                if size >= need:
                    if size == need:
                        del self._free[i]
                    else:
                        self._free[i] = (off + need, size - need)
                    self.used += need
                    return off
        return None

    def release(self, off: int, n: int) -> None:
        need = _round(max(n, 1))
        with self._lock:
            i = bisect.bisect(self._free, (off, 0))
            self._free.insert(i, (off, need))
            if i + 1 < len(self._free) and off + need == self._free[i + 1][0]:  # merge with the next
                self._free[i] = (off, need + self._free[i + 1][1])
                del self._free[i + 1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:  # and with the previous
                prev = self._free[i - 1]
                self._free[i - 1] = (prev[0], prev[1] + self._free[i][1])
                del self._free[i]
            self.used -= need

    def write(self, off: int, buffers: list[memoryview]) -> list[int]:
        """Copies ``buffers`` one after another from ``off``; returns their offsets."""
        offsets, pos = [], off
        for b in buffers:
            src = np.frombuffer(b, dtype=np.uint8)
            self.view[pos : pos + src.size] = src
            offsets.append(pos)
            pos += src.size
        return offsets

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _ItemMap(mmap.mmap):
    """An item's pages mapped in the consumer; weak-referenceable, so its end can be noticed."""


def attach(path: str, off: int, nbytes: int, offsets: list[int], sizes: list[int], on_free: Any) -> list[np.ndarray]:
    """Maps one item's extent of a producer's pool; returns its buffers (views, no copy).

    ``on_free()`` runs once every array built on them has been freed.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        m = _ItemMap(fd, _round(nbytes), offset=off)
    finally:
        os.close(fd)
    weakref.finalize(m, on_free)
    whole = np.frombuffer(m, dtype=np.uint8)
    return [whole[o - off : o - off + s] for o, s in zip(offsets, sizes, strict=True)]


class Releaser:
    """Sends "free this item" notes to producers from one background thread (finalizers may run
    in any thread, and zmq sockets belong to one)."""

    def __init__(self, ctx: zmq.Context, connect: Any) -> None:
        self._queue: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._ctx, self._connect = ctx, connect
        threading.Thread(target=self._run, name="rlinf-shm-release", daemon=True).start()

    def release(self, address: str, key: int) -> None:
        self._queue.put((address, key))

    def _run(self) -> None:
        socks: dict[str, zmq.Socket] = {}
        while True:
            address, key = self._queue.get()
            sock = socks.get(address)
            if sock is None:
                sock = socks[address] = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 1000)
                sock.connect(self._connect(address))
            sock.send_multipart([b"\0" * 8, b"R" + key.to_bytes(8, "little")])


def sweep_stale() -> None:
    """Removes pool files of processes that no longer exist (left by a crash)."""
    try:
        names = os.listdir(_DIR)
    except OSError:
        return
    for name in names:
        if not name.startswith("rlinf-pool-"):
            continue
        try:
            pid = int(name.split("-")[2])
            os.kill(pid, 0)
        except (ValueError, IndexError):
            continue
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(_DIR, name))
        except PermissionError:
            continue
