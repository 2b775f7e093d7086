"""The Ray actor that hosts one rank of a worker group."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import inspect
import os
import socket
import sys
import threading
import time
import traceback
from typing import Any

from rlinf import channel
from rlinf.trace import Span, tracer
from rlinf.worker import RankContext, _Runtime, _set_runtime, host_label

# (ok, value or (error, traceback), start, end): kept a plain tuple, it crosses Ray for every call.
Outcome = tuple[bool, Any, float, float]


class WorkerHost:
    """Pins the process to its devices, builds the worker and runs its methods."""

    def __init__(self, cls_payload: bytes, ctx: RankContext, env: dict[str, str], lock_service: Any) -> None:
        # The environment is set here rather than through a Ray runtime_env: that would cost a fresh
        # worker process per rank (seconds) instead of reusing one of Ray's idle ones.
        os.environ.update(env)
        for p in reversed(env.get("PYTHONPATH", "").split(os.pathsep)):
            if p and p not in sys.path:
                sys.path.insert(0, p)
        from ray import cloudpickle

        # Unpickling the class imports its module (torch, simulators, ...): the slow part of a start,
        # done before the constructor's arguments are known so that groups can start side by side.
        cls = cloudpickle.loads(cls_payload)
        _keep_freed_memory()
        _pin(ctx)
        # Every user call runs on this one thread, pinned like the process: Ray hands calls to any thread
        # of its pool, and a call on a fresh thread starts with a cold memory arena (its first steps
        # page-fault all their activations in) and opens its own channel connections.
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlinf-worker")
        self._thread.submit(_pin, ctx).result()
        channel.set_identity(ctx.group, ctx.rank)
        self._ctx = ctx
        self._cls = cls
        self._calls = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        import ray

        self._rt = _Runtime(ctx, ray.get_runtime_context().current_actor, lock_service, ("", 0))
        _set_runtime(self._rt)

    def build(self, args_payload: bytes) -> Outcome:
        """Constructs the worker; on success, the address rank 0 offers for torch.distributed."""
        return self._thread.submit(self._build, args_payload).result()

    def _build(self, args_payload: bytes) -> Outcome:
        from ray import cloudpickle

        cls, ctx = self._cls, self._ctx
        start = time.time()
        try:
            args = cloudpickle.loads(args_payload)
            worker = cls.__new__(cls)
            worker.rank, worker.world_size, worker.devices = ctx.rank, ctx.world_size, ctx.devices
            worker.group_name = ctx.group
            worker.__init__(*args)
            self._rt.worker = worker
        except BaseException as e:
            return (False, (f"{type(e).__name__}: {e}", traceback.format_exc()), start, time.time())
        end = time.time()
        tracer().add(f"{cls.__name__}.__init__", "call", start, end)
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return (True, {"host": host_label(), "ip": ip, "port": port, "pid": os.getpid()}, start, end)

    def configure(self, dist_master: tuple[str, int]) -> None:
        self._rt.dist_master = dist_master

    def run(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
        """Runs ``worker.method(*args, **kwargs)``; user calls on one rank never overlap."""
        with self._calls:
            return self._thread.submit(self._run, method, args, kwargs).result()

    def _run(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
        start = time.time()
        try:
            fn = getattr(self._rt.worker, method)
            if inspect.iscoroutinefunction(fn):
                value = asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), self._event_loop()).result()
            else:
                value = fn(*args, **kwargs)
            channel.flush_thread()
            out: Outcome = (True, value, start, time.time())
        except BaseException as e:
            out = (False, (f"{type(e).__name__}: {e}", traceback.format_exc()), start, time.time())
        tracer().add(f"{self._cls.__name__}.{method}", "call", out[2], out[3])
        return out

    # ---- control calls: served beside a running method -------------------------------------------

    def offload_for_handover(self) -> float:
        return self._rt.offload_for_handover()

    def mark_shared(self) -> None:
        self._rt.mark_shared()

    def trace(self) -> tuple[list[Span], int]:
        t = tracer()
        return t.drain(), t.dropped

    def switch_times(self) -> list[float]:
        return list(self._rt.switch_s)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="rlinf-worker-loop", daemon=True).start()
            self._loop = loop
        return self._loop


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _keep_freed_memory() -> None:
    """Keeps freed memory in the process for the next step instead of handing it back to the OS.

    By default glibc serves blocks over 128 KiB (growing its threshold only slowly) with fresh
    ``mmap`` pages and unmaps them on free, so every training step's activations fault their pages
    in again: on a 2-core VM that was 10-20 thousand faults and 0.3-0.4 s of system time per forward
    pass in the first steps of a run. Blocks up to 32 MiB (glibc's limit) now come from the heap, and
    the heap keeps up to 1 GiB of free memory at its top. No effect where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return


def _pin(ctx: RankContext) -> None:
    """CPU slots: pin to the slot's cores and match torch's threads; GPUs: set by the launcher."""
    import torch

    cores = [c for d in ctx.devices for c in d.cores]
    if cores:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
        with contextlib.suppress(RuntimeError):  # already set in this process
            torch.set_num_interop_threads(1)
