"""rlinf: reinforcement-learning infrastructure on Ray.

Workers run as Ray actors placed on devices, talk through channels, and take turns on shared
devices through a cluster-wide lock. See docs/architecture.md.

The names below are imported on first use, so ``import rlinf.algorithms`` (pure tensor math)
does not pay for importing Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlinf.channel import Channel, Item, ItemMeta
    from rlinf.cluster import Cluster
    from rlinf.config import load_config
    from rlinf.devices import Device
    from rlinf.errors import ChannelClosed, ConfigError, PlacementError, WorkerDiedError, WorkerError
    from rlinf.group import Handle, PendingGroup, WorkerGroup
    from rlinf.placement import ComponentPlacement, Placement, PlacementConfig
    from rlinf.worker import Worker

_EXPORTS = {
    "Channel": "rlinf.channel",
    "Item": "rlinf.channel",
    "ItemMeta": "rlinf.channel",
    "Cluster": "rlinf.cluster",
    "load_config": "rlinf.config",
    "Device": "rlinf.devices",
    "ChannelClosed": "rlinf.errors",
    "ConfigError": "rlinf.errors",
    "PlacementError": "rlinf.errors",
    "WorkerDiedError": "rlinf.errors",
    "WorkerError": "rlinf.errors",
    "Handle": "rlinf.group",
    "WorkerGroup": "rlinf.group",
    "PendingGroup": "rlinf.group",
    "ComponentPlacement": "rlinf.placement",
    "Placement": "rlinf.placement",
    "PlacementConfig": "rlinf.placement",
    "Worker": "rlinf.worker",
}

__all__ = [
    "Channel",
    "ChannelClosed",
    "Cluster",
    "ComponentPlacement",
    "ConfigError",
    "Device",
    "Handle",
    "Item",
    "ItemMeta",
    "PendingGroup",
    "Placement",
    "PlacementConfig",
    "PlacementError",
    "Worker",
    "WorkerDiedError",
    "WorkerError",
    "WorkerGroup",
    "load_config",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlinf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
