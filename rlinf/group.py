"""WorkerGroup (the ranks of one component) and Handle (a call in flight on them)."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar

import ray
from ray import cloudpickle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rlinf.cluster import LOCK_NAME, NAMESPACE, bind_ip
from rlinf.devices import Device
from rlinf.errors import PlacementError, WorkerDiedError, WorkerError
from rlinf.trace import Track

if TYPE_CHECKING:
    from rlinf.cluster import Cluster
    from rlinf.placement import ComponentPlacement, Placement

W = TypeVar("W")
R = TypeVar("R")
P = ParamSpec("P")


class Handle(Generic[R]):
    """A method call running on some ranks; returned at once by :meth:`WorkerGroup.call`."""

    def __init__(self, group: WorkerGroup[Any], ranks: list[int], refs: list[Any], method: str) -> None:
        self.group, self.ranks, self.method = group, ranks, method
        self._refs = refs
        self._results: list[R] | None = None
        self.timings: list[float] = []  # per-rank wall seconds of the call, after wait()
        self.spans: list[tuple[float, float]] = []  # per-rank (start, end), seconds since the epoch

    def done(self) -> bool:
        """True when every rank has finished (successfully or not)."""
        if self._results is not None:
            return True
        ready, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
        return len(ready) == len(self._refs)

    def wait(self, timeout: float | None = None) -> list[R]:
        """Returns each rank's result, in rank order; raises the first failure as soon as it happens.

        Raises:
            WorkerError: a rank raised (message has its rank, host and traceback).
            WorkerDiedError: a rank's process died.
            TimeoutError: not finished within ``timeout`` seconds.
        """
        if self._results is not None:
            return self._results
        deadline = None if timeout is None else time.monotonic() + timeout
        index = {ref: i for i, ref in enumerate(self._refs)}
        outcomes: list[Any] = [None] * len(self._refs)
        pending = list(self._refs)
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                raise TimeoutError(
                    f"{self.group.name}.{self.method} did not finish within {timeout} s on ranks "
                    f"{[self.ranks[index[r]] for r in pending]}"
                )
            for ref in ready:
                i = index[ref]
                outcomes[i] = self.group._unwrap(self.ranks[i], self.method, ref)
        self._results = [o[1] for o in outcomes]
        self.spans = [(o[2], o[3]) for o in outcomes]
        self.timings = [o[3] - o[2] for o in outcomes]
        return self._results


def wait_all(handles: Sequence[Handle[Any]]) -> list[list[Any]]:
    """Each handle's results; raises the first failure among all of them as soon as it happens (so
    a call that waits on a partner's output does not hide the partner's error)."""
    pending = {ref: h for h in handles for ref in h._refs}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            h = pending.pop(ref)
            h.group._unwrap(h.ranks[h._refs.index(ref)], h.method, ref)
    return [h.wait() for h in handles]


class WorkerGroup(Generic[W]):
    """The ranks of one component. ``group.call(MyWorker.method, ...)`` runs on every rank."""

    def __init__(self, cls: type[W], name: str, hosts: list[Any], devices: list[tuple[Device, ...]]) -> None:
        self.cls, self.name, self.hosts, self.devices = cls, name, hosts, devices
        self._ranks = list(range(len(hosts)))
        self.info: list[dict[str, Any]] = [{} for _ in hosts]

    @property
    def world_size(self) -> int:
        return len(self.hosts)

    @property
    def ranks(self) -> list[int]:
        return list(self._ranks)

    def on(self, ranks: int | Sequence[int]) -> WorkerGroup[W]:
        """A view of this group that calls only ``ranks``."""
        wanted = [ranks] if isinstance(ranks, int) else list(ranks)
        bad = [r for r in wanted if r not in range(len(self.hosts))]
        if bad:
            raise ValueError(f"{self.name} has ranks 0..{len(self.hosts) - 1}; there is no rank {bad[0]}.")
        view = WorkerGroup(self.cls, self.name, self.hosts, self.devices)
        view._ranks, view.info = wanted, self.info
        return view

    def call(self, method: Callable[Concatenate[W, P], R], *args: P.args, **kwargs: P.kwargs) -> Handle[R]:
        """Starts ``method`` on every rank of this group (or view) and returns at once."""
        name = getattr(method, "__name__", None)
        mro: tuple[type, ...] = getattr(self.cls, "__mro__", ())
        if name is None or not any(vars(k).get(name) is method for k in mro):
            raise TypeError(
                f"{method!r} is not a method of {self.cls.__name__}; pass it as {self.cls.__name__}.method_name."
            )
        refs = [self.hosts[r].run.remote(name, args, kwargs) for r in self._ranks]
        return Handle(self, list(self._ranks), refs, name)

    def _unwrap(self, rank: int, method: str, ref: Any) -> tuple[bool, Any, float, float]:
        try:
            out = ray.get(ref)
        except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WorkerDiedError(self.name, rank, self._host(rank), method, detail) from None
        except ray.exceptions.RayActorError as e:
            raise WorkerDiedError(self.name, rank, self._host(rank), method, type(e).__name__) from None
        if not out[0]:
            error, tb = out[1]
            raise WorkerError(self.name, rank, self._host(rank), method, error, tb)
        return out

    def _host(self, rank: int) -> str:
        return self.info[rank].get("host", "host unknown") if rank < len(self.info) else "host unknown"

    def collect_trace(self) -> list[Track]:
        """Each live rank's spans, as one track per rank."""
        tracks = []
        for r, host in enumerate(self.hosts):
            try:
                spans, _ = ray.get(host.trace.remote(), timeout=30)
            except Exception:
                continue  # a dead rank has no spans to give
            tracks.append(Track(f"{self.name} rank {r}", spans))
        return tracks

    def switch_times(self) -> list[list[float]]:
        """Per rank, the seconds each device-lock hand-over took (wait + offload + onload)."""
        return ray.get([h.switch_times.remote() for h in self.hosts])

    def kill(self) -> None:
        """Stops every rank's process."""
        lock = _lock_service()
        for r, host in enumerate(self.hosts):
            with contextlib.suppress(Exception):  # already dead
                ray.kill(host, no_restart=True)
            if lock is not None:
                lock.forget.remote(f"{self.name}:{r}")

    def __repr__(self) -> str:
        devs = "; ".join(",".join(str(d.index) for d in ds) for ds in self.devices)
        return f"WorkerGroup({self.name}, world_size={self.world_size}, devices per rank=[{devs}])"


_names = itertools.count(2)


class PendingGroup(Generic[W]):
    """A group whose rank processes are starting (importing the worker's module) but whose workers are
    not built yet; ``Worker.start`` returns one. ``construct(*args)`` sends the constructor arguments,
    ``wait()`` returns the ready ``WorkerGroup``; ``launch(*args)`` does both.

    Starting every group of a workflow first and building them after lets their processes start side
    by side, also when one group's arguments come from another (an env's spaces for its policy)."""

    def __init__(self, cluster: Cluster, group: WorkerGroup[W], lock: Any) -> None:
        self.cluster, self.group, self._lock = cluster, group, lock
        self._building: Handle[dict[str, Any]] | None = None
        self._ready = False

    @property
    def name(self) -> str:
        return self.group.name

    def construct(self, *args: Any) -> PendingGroup[W]:
        """Builds every rank's worker with ``args`` (returns at once; ``wait()`` for the result)."""
        if self._building is not None:
            raise RuntimeError(f"{self.name}: construct() was already called; a group is built once.")
        payload = cloudpickle.dumps(args)
        refs = [h.build.remote(payload) for h in self.group.hosts]
        self._building = Handle(self.group, self.group.ranks, refs, "__init__")
        return self

    def wait(self) -> WorkerGroup[W]:
        """Waits until every rank is built and registered; kills the group if one failed."""
        if self._building is None:
            raise RuntimeError(f"{self.name}: call construct(*args) before wait().")
        group, hosts = self.group, self.group.hosts
        if self._ready:
            return group
        try:
            group.info = self._building.wait()
            master = (group.info[0]["ip"], group.info[0]["port"])
            ray.get([h.configure.remote(master) for h in hosts])
            ray.get(
                [
                    self._lock.register.remote([d.key for d in devs], f"{group.name}:{r}", h)
                    for r, (h, devs) in enumerate(zip(hosts, group.devices, strict=True))
                ]
            )
        except BaseException:
            group.kill()
            if group in self.cluster.groups:
                self.cluster.groups.remove(group)
            raise
        self._ready = True
        return group

    def launch(self, *args: Any) -> WorkerGroup[W]:
        """``construct(*args).wait()``."""
        return self.construct(*args).wait()

    def __repr__(self) -> str:
        state = "starting" if self._building is None else "building"
        return f"PendingGroup({self.name}, world_size={self.group.world_size}, {state})"


def start_group(
    cls: type[W],
    cluster: Cluster,
    where: Placement | ComponentPlacement | Sequence[int] | Sequence[Device],
    name: str | None,
) -> PendingGroup[W]:
    from rlinf.host import WorkerHost
    from rlinf.placement import ComponentPlacement, Placement
    from rlinf.worker import RankContext

    if isinstance(where, Placement):
        component = name or cls.__name__
        where = where[component]
    if isinstance(where, ComponentPlacement):
        name = name or where.name
        rank_devices = [tuple(cluster.devices[i] for i in ds) for ds in where.rank_devices(len(cluster.devices))]
    else:
        rank_devices = [(_device(cluster, d),) for d in where]
    if not rank_devices:
        raise PlacementError(f"{cls.__name__}: no devices given; pass e.g. [0] or a Placement.")
    group_name = name or cls.__name__
    taken = {g.name for g in cluster.groups}
    if group_name in taken:
        group_name = f"{group_name}-{next(_names)}"
    lock = _lock_service()
    remote_host = ray.remote(WorkerHost)
    payload = cloudpickle.dumps(cls)
    hosts: list[Any] = []
    for rank, devs in enumerate(rank_devices):
        ctx = RankContext(group_name, rank, len(rank_devices), devs)
        hosts.append(
            remote_host.options(
                name=f"{group_name}:{rank}",
                namespace=NAMESPACE,
                num_cpus=0,
                num_gpus=0,
                max_concurrency=8,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(devs[0].node_id, soft=False),
            ).remote(payload, ctx, _env_for(devs), lock)
        )
    group: WorkerGroup[W] = WorkerGroup(cls, group_name, hosts, list(rank_devices))
    cluster.groups.append(group)
    return PendingGroup(cluster, group, lock)


def _device(cluster: Cluster, d: int | Device) -> Device:
    index = d.index if isinstance(d, Device) else d
    if not isinstance(index, int) or not 0 <= index < len(cluster.devices):
        raise PlacementError(
            f"device {d!r} does not exist; the cluster has devices 0..{len(cluster.devices) - 1} "
            f"({', '.join(map(str, cluster.devices))})."
        )
    return cluster.devices[index]


def _env_for(devices: tuple[Device, ...]) -> dict[str, str]:
    env = {"PYTHONPATH": _driver_pythonpath(), "RLINF_BIND_IP": bind_ip()}
    cores = [c for d in devices for c in d.cores]
    if cores:
        n = str(len(cores))
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, CUDA_VISIBLE_DEVICES="")
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d.local_index) for d in devices)
    return env


def _driver_pythonpath() -> str:
    """Workers import what the driver can import (test modules, scripts' folders)."""
    paths = [os.path.abspath(p or os.getcwd()) for p in sys.path]
    return os.pathsep.join(dict.fromkeys(p for p in paths if os.path.isdir(p)))


def _lock_service() -> Any:
    try:
        return ray.get_actor(LOCK_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
