"""Worker: the base class of every component; each rank runs as a Ray actor."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import torch

from rlinf.devices import Device
from rlinf.trace import tracer

if TYPE_CHECKING:
    import torch.distributed as dist

    from rlinf.cluster import Cluster
    from rlinf.group import PendingGroup, WorkerGroup
    from rlinf.placement import ComponentPlacement, Placement


@dataclass(frozen=True)
class RankContext:
    """Who a rank is: set before the worker's ``__init__`` runs."""

    group: str
    rank: int
    world_size: int
    devices: tuple[Device, ...]


class Worker:
    """Subclass this; ``MyWorker.launch(cluster, placement_or_devices, *args)`` starts the ranks.

    Inside a rank, ``self.rank``, ``self.world_size`` and ``self.devices`` are set before
    ``__init__`` runs. Override :meth:`offload`/:meth:`onload` to free and restore device state
    when components share devices, and wrap device work in ``with self.device_lock():``.
    """

    rank: int
    world_size: int
    devices: tuple[Device, ...]
    group_name: str

    @classmethod
    def launch(
        cls,
        cluster: Cluster,
        where: Placement | ComponentPlacement | Sequence[int] | Sequence[Device],
        *args: Any,
        name: str | None = None,
    ) -> WorkerGroup[Self]:
        """Starts one rank per entry of the placement and waits until all are constructed.

        Args:
            cluster: the cluster to run on.
            where: a ``Placement`` (the component is ``name``), a ``ComponentPlacement``, or
                device indices/devices (one rank per device).
            args: passed to every rank's ``__init__``.
            name: the group's name (default: the class name); with a ``Placement``, the component.
        """
        return cls.start(cluster, where, name=name).launch(*args)

    @classmethod
    def start(
        cls,
        cluster: Cluster,
        where: Placement | ComponentPlacement | Sequence[int] | Sequence[Device],
        name: str | None = None,
    ) -> PendingGroup[Self]:
        """Starts the ranks' processes (they import this class's module) and returns at once.

        Build the workers later with ``pending.launch(*args)`` (or ``construct(*args)`` now and
        ``wait()`` later): starting several groups before building any lets their processes start
        side by side, which is most of a launch on a small machine.
        """
        from rlinf.group import start_group

        return start_group(cls, cluster, where, name)

    # ---- hooks -----------------------------------------------------------------------------------

    def offload(self) -> None:
        """Moves device state (weights, grads, optimizer state, caches) off the device."""

    def onload(self) -> None:
        """Brings device state back after :meth:`offload`."""

    # ---- helpers available inside a rank ---------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The torch device this rank computes on."""
        if self.devices and self.devices[0].kind == "cuda":
            return torch.device("cuda", 0)  # CUDA_VISIBLE_DEVICES holds only this rank's GPUs
        return torch.device("cpu")

    def dist_group(self) -> dist.ProcessGroup:
        """The torch.distributed group of this worker group's ranks (gloo on CPU, NCCL on GPU),
        created on first use; every rank must call it (it is collective the first time)."""
        return _runtime().dist_group()

    @contextmanager
    def device_lock(self) -> Iterator[None]:
        """Holds this rank's devices; components sharing them wait, offloading as needed."""
        with _runtime().device_lock():
            yield


class _Runtime:
    """Per-process state of a rank: its worker, lock bookkeeping and process group."""

    def __init__(self, ctx: RankContext, host: Any, lock_service: Any, dist_master: tuple[str, int]) -> None:
        self.ctx = ctx
        self.host = host
        self.lock_service = lock_service
        self.dist_master = dist_master
        self.worker: Worker | None = None
        self.resident = True
        self.switch_s: list[float] = []
        self._pg: Any = None
        self._holder = f"{ctx.group}:{ctx.rank}"
        self.residency = threading.RLock()
        self.shared = False  # set once another component is placed on one of this rank's devices
        self.local_lock = threading.Lock()

    def dist_group(self) -> Any:
        import torch.distributed as dist

        if self._pg is None:
            if not dist.is_initialized():
                backend = "nccl" if self.ctx.devices and self.ctx.devices[0].kind == "cuda" else "gloo"
                host, port = self.dist_master
                dist.init_process_group(
                    backend,
                    init_method=f"tcp://{host}:{port}",
                    rank=self.ctx.rank,
                    world_size=self.ctx.world_size,
                )
            self._pg = dist.group.WORLD
        return self._pg

    @contextmanager
    def device_lock(self) -> Iterator[None]:
        import ray

        if not self.shared:
            with self.local_lock:  # alone on these devices: no round trip to the lock service
                if not self.shared:
                    self.ensure_resident()
                    yield
                    return
        keys = [d.key for d in self.ctx.devices]
        start = time.time()
        ray.get(self.lock_service.acquire.remote(keys, self._holder, self.host))
        try:
            self.ensure_resident()
            end = time.time()
            self.switch_s.append(end - start)
            tracer().add("switch", "switch", start, end)
            yield
        finally:
            ray.get(self.lock_service.release.remote(keys, self._holder))

    def ensure_resident(self) -> None:
        with self.residency:
            if not self.resident and self.worker is not None:
                with tracer().span("onload", "onload"):
                    self.worker.onload()
                self.resident = True

    def mark_shared(self) -> None:
        with self.local_lock:  # returns once a section that skipped the lock service has ended
            self.shared = True

    def offload_for_handover(self) -> float:
        start = time.perf_counter()
        with self.residency:
            if self.resident and self.worker is not None:
                with tracer().span("offload", "offload"):
                    self.worker.offload()
                self.resident = False
        return time.perf_counter() - start


_rt: _Runtime | None = None


def _runtime() -> _Runtime:
    if _rt is None:
        raise RuntimeError("this only works inside a worker rank started with Worker.launch().")
    return _rt


def _set_runtime(rt: _Runtime) -> None:
    global _rt
    _rt = rt


def host_label() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"
