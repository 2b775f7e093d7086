"""Placement validation messages and the printed table."""

from __future__ import annotations

import pytest

from rlinf import ComponentPlacement, Placement, PlacementConfig, PlacementError
from rlinf.config import from_dict


def test_modes_and_table():
    p = Placement.hybrid({"rollout": "0", "actor": "1", "reward": 1}, num_devices=2)
    assert p["rollout"].devices == (0,) and p.sharing("actor") == ["reward"]
    table = str(p)
    assert table.splitlines()[0] == "placement: hybrid on 2 devices"
    assert "reward" in table and "shares with" in table
    c = Placement.collocated(["actor", "rollout"], num_devices=4)
    assert c["actor"].rank_devices() == [(0,), (1,), (2,), (3,)]
    two = Placement({"actor": ComponentPlacement("actor", (0, 1, 2, 3), 2)}, "collocated", 4)
    assert two["actor"].rank_devices() == [(0, 1), (2, 3)]


def test_unknown_device():
    with pytest.raises(PlacementError, match=r"'actor' is placed on device 5, but the cluster has devices 0..1"):
        Placement.disaggregated({"actor": "5", "rollout": "0"}, num_devices=2)


def test_world_size_must_divide_devices():
    with pytest.raises(PlacementError, match=r"world_size=3 on 2 devices 0,1.*Use world_size in \[1, 2\]"):
        Placement({"actor": ComponentPlacement("actor", (0, 1), 3)}, "collocated", 2)


def test_disjointness_violated():
    with pytest.raises(PlacementError, match=r"'rollout' \(0,1\) and 'actor' \(1\) share device 1.*hybrid"):
        Placement.disaggregated({"rollout": "0-1", "actor": "1"}, num_devices=2)


def test_collocated_needs_same_devices():
    with pytest.raises(PlacementError, match="collocated placement puts every component on the same devices"):
        Placement({"a": "0", "b": "0-1"}, "collocated", 2)


def test_bad_device_spec_and_mode():
    with pytest.raises(PlacementError, match="write 'all', '0-3', '0,2' or 1"):
        Placement.hybrid({"a": "zero"}, 2)
    with pytest.raises(PlacementError, match="mode 'pipelined' is not one of"):
        Placement({"a": "0"}, "pipelined", 2)  # type: ignore[arg-type]


def test_from_config():
    cfg = from_dict(
        PlacementConfig,
        {
            "mode": "hybrid",
            "components": {"rollout": {"devices": "0"}, "actor": {"devices": [1], "world_size": 1}},
        },
    )
    p = Placement.from_config(cfg, 2, names=["rollout", "actor"])
    assert p["actor"].devices == (1,)
    with pytest.raises(PlacementError, match="no devices for component"):
        Placement.from_config(PlacementConfig(mode="disaggregated"), 2, names=["actor"])
    with pytest.raises(PlacementError, match="which this workflow does not have"):
        Placement.from_config(cfg, 2, names=["actor"])
    collocated = Placement.from_config(PlacementConfig(), 2, names=["actor", "rollout"])
    assert collocated["rollout"].devices == (0, 1)
