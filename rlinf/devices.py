"""Devices: CUDA GPUs, or on machines without one, CPU slots (sets of cores)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Device:
    """One device of the cluster.

    Args:
        index: position in ``cluster.devices`` (what placements refer to).
        kind: ``"cuda"`` for a GPU, ``"cpu"`` for a CPU slot.
        node_id: the Ray node that holds it.
        node_ip: that node's address.
        local_index: the GPU's ordinal on its node, or the slot's number on its node.
        cores: the CPU cores a worker on this device is pinned to (empty for GPUs: not pinned).
    """

    index: int
    kind: Literal["cpu", "cuda"]
    node_id: str
    node_ip: str
    local_index: int
    cores: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        """Cluster-wide identity, used by the device lock."""
        return f"{self.node_id}/{self.kind}:{self.local_index}"

    def __str__(self) -> str:
        if self.kind == "cuda":
            return f"cuda:{self.local_index}@{self.node_ip}"
        cores = ",".join(map(str, self.cores))
        return f"cpu:{self.local_index}(cores {cores})@{self.node_ip}"


def cpu_slots(
    node_id: str, node_ip: str, cores: list[int], cores_per_slot: int, first_index: int, max_slots: int | None
) -> list[Device]:
    """Cuts a node's cores into slots of ``cores_per_slot``; leftover cores are not used."""
    if cores_per_slot < 1:
        raise ValueError(f"cpu_cores_per_slot={cores_per_slot} must be >= 1.")
    n = len(cores) // cores_per_slot
    if n == 0:
        raise ValueError(
            f"node {node_ip} has {len(cores)} usable cores, fewer than cpu_cores_per_slot={cores_per_slot}; "
            f"use cpu_cores_per_slot={max(1, len(cores))}."
        )
    if max_slots is not None:
        n = min(n, max_slots)
    return [
        Device(
            index=first_index + i,
            kind="cpu",
            node_id=node_id,
            node_ip=node_ip,
            local_index=i,
            cores=tuple(cores[i * cores_per_slot : (i + 1) * cores_per_slot]),
        )
        for i in range(n)
    ]
