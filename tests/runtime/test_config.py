"""Typed configs: defaults, YAML, dotted overrides, and the errors for bad input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from rlinf import ConfigError
from rlinf.config import load_config, parse_overrides, to_dict


@dataclass(frozen=True)
class ActorCfg:
    lr: float = 1e-5
    micro_batch: int = 4
    backend: Literal["torch", "deepspeed"] = "torch"

    def __post_init__(self) -> None:
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch={self.micro_batch} must be >= 1")


@dataclass(frozen=True)
class RunCfg:
    steps: int = 10
    name: str = "run"
    seeds: tuple[int, ...] = (0,)
    actor: ActorCfg = field(default_factory=ActorCfg)
    note: str | None = None


def test_defaults_yaml_then_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("steps: 20\nactor:\n  lr: 3.0e-4\n")
    cfg = load_config(RunCfg, y, ["actor.micro_batch=8", "seeds=[1, 2]", "actor.lr=1e-3", "note=hi"])
    assert cfg == RunCfg(steps=20, seeds=(1, 2), actor=ActorCfg(lr=1e-3, micro_batch=8), note="hi")
    assert to_dict(cfg)["actor"] == {"lr": 1e-3, "micro_batch": 8, "backend": "torch"}
    with pytest.raises(AttributeError):
        cfg.steps = 3  # type: ignore[misc]


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'actor.lrr'. Did you mean 'actor.lr'\?"):
        load_config(RunCfg, overrides=["actor.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'stepz'. Did you mean 'steps'\?"):
        load_config(RunCfg, overrides=["stepz=1"])


def test_bad_values():
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 'ten'"):
        load_config(RunCfg, overrides=["steps=ten"])
    with pytest.raises(ConfigError, match=r"actor.backend: 'deepspeedd' is not one of .* Did you mean 'deepspeed'"):
        load_config(RunCfg, overrides=["actor.backend=deepspeedd"])
    with pytest.raises(ConfigError, match=r"micro_batch=0 must be >= 1"):
        load_config(RunCfg, overrides=["actor.micro_batch=0"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["actor.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunCfg, "/nonexistent.yaml")


@dataclass(frozen=True)
class PlacedCfg:
    components: dict[str, ActorCfg] = field(default_factory=dict)


def test_a_null_section_removes_its_entry_from_a_mapping(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("components:\n  env: {lr: 1.0}\n  rollout: {lr: 2.0}\n")
    assert set(load_config(PlacedCfg, y).components) == {"env", "rollout"}
    cfg = load_config(PlacedCfg, y, ["components.rollout=null"])
    assert cfg.components == {"env": ActorCfg(lr=1.0)}
