"""The cluster: an embedded local Ray, or a connection to an existing Ray cluster."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rlinf.devices import Device, cpu_slots
from rlinf.trace import Track, tracer, write_chrome_trace

if TYPE_CHECKING:
    from rlinf.group import WorkerGroup

NAMESPACE = "rlinf"
HUB_NAME = "rlinf_channel_hub"
LOCK_NAME = "rlinf_device_lock"

# Ray must not rewrite CUDA_VISIBLE_DEVICES for actors that reserve no GPU: workers set it themselves.
# Set before Ray starts, so its raylet and every worker process inherit them.
_RAY_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_DEDUP_LOGS": "0"}


class Cluster:
    """Starts (or joins) Ray and lists the devices workers can be placed on.

    Args:
        address: ``None`` starts an embedded Ray on this machine (loopback only, no dashboard);
            ``"auto"`` or ``"ray://host:port"``/``"host:port"`` joins an existing Ray cluster.
        cpu_cores_per_slot: cores per CPU slot on machines without GPUs.
        num_cpu_slots: use at most this many CPU slots per node (default: all).
        device_kind: ``"auto"`` uses GPUs when the cluster has any, else CPU slots.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        cpu_cores_per_slot: int = 1,
        num_cpu_slots: int | None = None,
        device_kind: Literal["auto", "cuda", "cpu"] = "auto",
    ) -> None:
        if cpu_cores_per_slot < 1:
            raise ValueError(f"cpu_cores_per_slot={cpu_cores_per_slot} must be >= 1; use 1 for one slot per core.")
        for key, value in _RAY_ENV.items():
            os.environ.setdefault(key, value)
        self.embedded = address is None
        if self.embedded:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            os.environ.setdefault("RLINF_BIND_IP", "127.0.0.1")
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            kwargs: dict[str, Any] = dict(
                namespace=NAMESPACE,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=True,
            )
            if self.embedded:
                # "local" always starts a fresh instance, even if `ray start` left a cluster address behind
                kwargs.update(address="local", num_cpus=os.cpu_count() or 1)
            else:
                kwargs["address"] = address
            _init_ray(kwargs, retries=2 if self.embedded else 0)
        self.cpu_cores_per_slot = cpu_cores_per_slot
        self.num_cpu_slots = num_cpu_slots
        self.device_kind = device_kind
        self.devices: list[Device] = self._discover_devices()
        self.groups: list[WorkerGroup[Any]] = []
        self._start = time.time()
        self._driver_node = ray.get_runtime_context().get_node_id()
        self._services = self._start_services()

    # ---- devices -------------------------------------------------------------------------------

    def _discover_devices(self) -> list[Device]:
        nodes = sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeManagerAddress"])
        have_gpus = any(n["Resources"].get("GPU", 0) >= 1 for n in nodes)
        use_gpus = self.device_kind == "cuda" or (self.device_kind == "auto" and have_gpus)
        if self.device_kind == "cuda" and not have_gpus:
            raise ValueError("device_kind='cuda' but the Ray cluster reports no GPUs; use device_kind='cpu'.")
        devices: list[Device] = []
        for node in nodes:
            node_id, ip = node["NodeID"], node["NodeManagerAddress"]
            if use_gpus:
                for g in range(int(node["Resources"].get("GPU", 0))):
                    devices.append(Device(len(devices), "cuda", node_id, ip, g))
            else:
                cores = _node_cores(node_id, local=self.embedded)
                devices += cpu_slots(node_id, ip, cores, self.cpu_cores_per_slot, len(devices), self.num_cpu_slots)
        return devices

    # ---- services ------------------------------------------------------------------------------

    def _start_services(self) -> tuple[Any, Any]:
        from rlinf.channel_hub import ChannelHub
        from rlinf.device_lock import DeviceLockService

        here = NodeAffinitySchedulingStrategy(self._driver_node, soft=False)
        hub: Any = (
            ray.remote(ChannelHub)
            .options(
                name=HUB_NAME,
                namespace=NAMESPACE,
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=4,
                scheduling_strategy=here,
            )
            .remote(bind_ip())
        )
        lock: Any = (
            ray.remote(DeviceLockService)
            .options(
                name=LOCK_NAME,
                namespace=NAMESPACE,
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=1000,
                scheduling_strategy=here,
            )
            .remote()
        )
        ray.get([hub.address.remote(), lock.ping.remote()])
        return hub, lock

    # ---- trace ---------------------------------------------------------------------------------

    def collect_tracks(self) -> list[Track]:
        """Takes the spans recorded so far by the driver and every live rank (one track each)."""
        tracks = [Track("driver", tracer().drain())]
        for group in self.groups:
            tracks += group.collect_trace()
        return tracks

    def write_trace(self, path: str | os.PathLike[str], tracks: list[Track] | None = None) -> Path:
        """Writes one Chrome trace (opens in Perfetto) of ``tracks``, by default freshly collected."""
        return write_chrome_trace(path, self.collect_tracks() if tracks is None else tracks)

    # ---- lifecycle -----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stops every worker group; stops Ray if this cluster started it."""
        for group in self.groups:
            group.kill()
        self.groups.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        from rlinf import channel, shm

        channel.forget_cluster()

        shm.sweep_stale()  # shared-memory pools of worker processes that were killed

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        where = "embedded" if self.embedded else "joined"
        return f"Cluster({where}, devices=[{', '.join(map(str, self.devices))}])"


def _node_cores(node_id: str, local: bool) -> list[int]:
    if local:
        return sorted(os.sched_getaffinity(0))
    probe = ray.remote(num_cpus=0)(_usable_cores).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    )
    return ray.get(probe.remote())


def _usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def bind_ip() -> str:
    """The address rlinf's own sockets bind to: loopback for an embedded cluster, else the node's IP."""
    ip = os.environ.get("RLINF_BIND_IP")
    return ip if ip else ray.util.get_node_ip_address()


def _init_ray(kwargs: dict[str, Any], retries: int) -> None:
    """``ray.init``, retried when an embedded node misses Ray's fixed 30 s start-up window.

    On a machine whose cores are busy with other work the raylet can take longer than that to
    register; a second try usually succeeds once its processes are warm in the page cache.
    """
    for attempt in range(retries + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == retries:
                raise
            ray.shutdown()
            time.sleep(1.0)
