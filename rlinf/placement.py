"""Placement: which devices each component's ranks run on.

Three modes:
    collocated     every component on the same devices; they take turns (device lock + offload)
    disaggregated  components on disjoint devices; they run at the same time and stream
    hybrid         any mix, e.g. reward and inference sharing the actor's devices, rollout alone
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from rlinf.errors import PlacementError

Mode = Literal["collocated", "disaggregated", "hybrid"]
DeviceSpec = str | int | Sequence[int]


@dataclass(frozen=True)
class ComponentPlacement:
    """One component's devices and world size; rank r gets the r-th equal share of ``devices``."""

    name: str
    devices: tuple[int, ...]
    world_size: int

    def rank_devices(self, num_devices: int | None = None) -> list[tuple[int, ...]]:
        per = len(self.devices) // self.world_size
        return [self.devices[r * per : (r + 1) * per] for r in range(self.world_size)]


@dataclass(frozen=True)
class ComponentConfig:
    """Config of one component's placement.

    Args:
        devices: ``"all"``, ``"0-3"``, ``"0,2"``, an index or a list of indices.
        world_size: number of ranks; default one per device.
    """

    devices: str | int | list[int] = "all"
    world_size: int | None = None


@dataclass(frozen=True)
class PlacementConfig:
    """Config of a placement (section ``placement:`` of a run config)."""

    mode: Mode = "collocated"
    components: dict[str, ComponentConfig] = field(default_factory=dict)


class Placement:
    """Maps component names to devices; validated against the cluster's device count.

    Args:
        components: name -> ``ComponentPlacement`` (or a device spec: one rank per device).
        mode: ``"collocated"``, ``"disaggregated"`` or ``"hybrid"``.
        num_devices: how many devices the cluster has (``len(cluster.devices)``).
    """

    def __init__(self, components: Mapping[str, ComponentPlacement | DeviceSpec], mode: Mode, num_devices: int):
        if mode not in ("collocated", "disaggregated", "hybrid"):
            raise PlacementError(f"placement mode {mode!r} is not one of collocated, disaggregated, hybrid.")
        if not components:
            raise PlacementError("a placement needs at least one component, e.g. {'actor': 'all'}.")
        self.mode: Mode = mode
        self.num_devices = num_devices
        self.components: dict[str, ComponentPlacement] = {}
        for name, spec in components.items():
            if isinstance(spec, ComponentPlacement):
                self.components[name] = spec
            else:
                devs = parse_devices(spec, num_devices, name)
                self.components[name] = ComponentPlacement(name, devs, len(devs))
        self._validate()

    # ---- constructors --------------------------------------------------------------------------

    @classmethod
    def collocated(cls, names: Sequence[str], num_devices: int, devices: DeviceSpec = "all") -> Placement:
        """Every component on the same devices, one rank per device."""
        return cls({n: devices for n in names}, "collocated", num_devices)

    @classmethod
    def disaggregated(cls, components: Mapping[str, DeviceSpec], num_devices: int) -> Placement:
        """Each component on its own devices, one rank per device."""
        return cls(components, "disaggregated", num_devices)

    @classmethod
    def hybrid(cls, components: Mapping[str, DeviceSpec], num_devices: int) -> Placement:
        """Any mix of shared and disjoint devices, one rank per device."""
        return cls(components, "hybrid", num_devices)

    @classmethod
    def from_config(cls, cfg: PlacementConfig, num_devices: int, names: Sequence[str] = ()) -> Placement:
        """Builds a placement from config; components in ``names`` but not in the config get all devices
        (collocated) or raise (other modes)."""
        comps: dict[str, ComponentPlacement] = {}
        missing = [n for n in names if n not in cfg.components]
        if missing and cfg.mode != "collocated":
            raise PlacementError(
                f"placement mode {cfg.mode!r} has no devices for component(s) {', '.join(missing)}; add e.g. "
                f"placement.components.{missing[0]}.devices=0."
            )
        unknown = [n for n in cfg.components if names and n not in names]
        if unknown:
            raise PlacementError(
                f"placement names component {unknown[0]!r}, which this workflow does not have; "
                f"its components are {', '.join(names)}."
            )
        specs: dict[str, ComponentConfig] = {n: ComponentConfig() for n in missing}
        specs.update(cfg.components)
        for name, c in specs.items():
            devs = parse_devices(c.devices, num_devices, name)
            comps[name] = ComponentPlacement(name, devs, c.world_size or len(devs))
        return cls(comps, cfg.mode, num_devices)

    # ---- queries -------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> ComponentPlacement:
        try:
            return self.components[name]
        except KeyError:
            raise PlacementError(
                f"the placement has no component {name!r}; it has {', '.join(self.components)}. "
                f"Launch with name=<one of those>."
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.components)

    def sharing(self, name: str) -> list[str]:
        """Other components that share at least one device with ``name``."""
        mine = set(self[name].devices)
        return [n for n, c in self.components.items() if n != name and mine & set(c.devices)]

    # ---- checks --------------------------------------------------------------------------------

    def _validate(self) -> None:
        n = self.num_devices
        for name, c in self.components.items():
            bad = [d for d in c.devices if not 0 <= d < n]
            if bad:
                raise PlacementError(
                    f"component {name!r} is placed on device {bad[0]}, but the cluster has devices "
                    f"0..{n - 1}. Use devices in 0-{n - 1}, or join a cluster with more devices."
                )
            if len(set(c.devices)) != len(c.devices):
                raise PlacementError(f"component {name!r} lists a device twice: {list(c.devices)}.")
            if c.world_size < 1 or len(c.devices) % c.world_size:
                fits = [w for w in range(1, len(c.devices) + 1) if len(c.devices) % w == 0]
                raise PlacementError(
                    f"component {name!r} has world_size={c.world_size} on {len(c.devices)} devices "
                    f"{_fmt(c.devices)}: every rank needs an equal share. Use world_size in {fits}."
                )
        items = list(self.components.items())
        if self.mode == "collocated":
            first_name, first = items[0]
            for name, c in items[1:]:
                if set(c.devices) != set(first.devices):
                    raise PlacementError(
                        f"collocated placement puts every component on the same devices, but {first_name!r} "
                        f"uses {_fmt(first.devices)} and {name!r} uses {_fmt(c.devices)}. Give both the "
                        f"same devices, or use mode 'hybrid'."
                    )
        elif self.mode == "disaggregated":
            for i, (a, ca) in enumerate(items):
                for b, cb in items[i + 1 :]:
                    shared = sorted(set(ca.devices) & set(cb.devices))
                    if shared:
                        raise PlacementError(
                            f"disaggregated placement needs disjoint devices, but {a!r} ({_fmt(ca.devices)}) "
                            f"and {b!r} ({_fmt(cb.devices)}) share device {shared[0]}. Move one of them, "
                            f"or use mode 'hybrid' to let them share."
                        )

    # ---- printing ------------------------------------------------------------------------------

    def __str__(self) -> str:
        rows = [("component", "devices", "world size", "devices per rank", "shares with")]
        for name, c in self.components.items():
            share = ", ".join(self.sharing(name)) or "-"
            rows.append((name, _fmt(c.devices), str(c.world_size), str(len(c.devices) // c.world_size), share))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"placement: {self.mode} on {self.num_devices} devices"]
        for j, r in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={_fmt(c.devices)}x{c.world_size}" for n, c in self.components.items())
        return f"Placement({self.mode}: {parts})"


def parse_devices(spec: DeviceSpec, num_devices: int, component: str = "?") -> tuple[int, ...]:
    """``"all"`` | ``"0-3"`` | ``"0,2"`` | ``1`` | ``[0, 1]`` -> a tuple of device indices."""
    if isinstance(spec, bool):
        raise PlacementError(f"component {component!r}: devices={spec!r} is not a device list; e.g. '0-1'.")
    if isinstance(spec, int):
        return (spec,)
    if isinstance(spec, str):
        text = spec.strip()
        if text == "all":
            return tuple(range(num_devices))
        out: list[int] = []
        try:
            for part in text.split(","):
                lo, dash, hi = part.strip().partition("-")
                out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
        except ValueError:
            raise PlacementError(
                f"component {component!r}: devices={spec!r} is not understood; write 'all', '0-3', '0,2' or 1."
            ) from None
        if not out:
            raise PlacementError(f"component {component!r}: devices={spec!r} names no device.")
        return tuple(out)
    return tuple(int(d) for d in spec)


def _fmt(devices: Sequence[int]) -> str:
    d = sorted(devices)
    if d and d == list(range(d[0], d[-1] + 1)) and len(d) > 2:
        return f"{d[0]}-{d[-1]}"
    return ",".join(map(str, d))
