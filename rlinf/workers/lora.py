"""LoRA for the actor: adapters on named linear layers (PEFT) and the merged full weights the rollout loads."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlinf.errors import ConfigError
from rlinf.workers.config import ActorConfig


def linear_layer_names(model: torch.nn.Module) -> set[str]:
    """Last path component of every ``nn.Linear`` in ``model`` (what LoRA target modules match)."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def add_lora(model: Any, cfg: ActorConfig) -> Any:
    """Wraps ``model`` with LoRA adapters on ``cfg.lora_target_modules``; only the adapters train.

    Raises:
        ConfigError: a target module is not a linear layer of the model.
    """
    from peft import LoraConfig, get_peft_model

    names = linear_layer_names(model)
    missing = [t for t in cfg.lora_target_modules if t not in names]
    if missing:
        raise ConfigError(
            f"actor.lora_target_modules={list(cfg.lora_target_modules)}: {missing} are not linear layers of "
            f"this {type(model).__name__}; its linear layers are {sorted(names)}. Set e.g. "
            f"actor.lora_target_modules=[{', '.join(sorted(names - {'lm_head'})[:2])}]."
        )
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def merged_state(peft_model: Any) -> dict[str, Tensor]:
    """CPU copies of the full weights with every active LoRA update folded in, under the base names.

    The model itself is not modified (merging in place and back would round the base weights).
    """
    from peft.tuners.lora.layer import LoraLayer

    base = peft_model.get_base_model()
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, t in base.state_dict().items():
            if ".lora_" in name:
                continue
            out[name.replace(".base_layer.", ".")] = t.detach().to("cpu", copy=True)
        for name, layer in base.named_modules():
            if not isinstance(layer, LoraLayer) or layer.merged or layer.disable_adapters:
                continue
            module: Any = layer  # the concrete layer types (Linear, ...) define get_delta_weight
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    key = f"{name}.weight"
                    out[key] = out[key] + module.get_delta_weight(adapter).detach().to("cpu", out[key].dtype)
    return out
