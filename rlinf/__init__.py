"""rlinf: reinforcement-learning infrastructure on Ray.

Workers run as Ray actors placed on devices, talk through channels, and take turns on shared
devices through a cluster-wide lock. See docs/architecture.md.
"""

from rlinf.channel import Channel, Item, ItemMeta
from rlinf.cluster import Cluster
from rlinf.config import load_config
from rlinf.devices import Device
from rlinf.errors import ChannelClosed, ConfigError, PlacementError, WorkerDiedError, WorkerError
from rlinf.group import Handle, WorkerGroup
from rlinf.placement import ComponentPlacement, Placement, PlacementConfig
from rlinf.worker import Worker

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
