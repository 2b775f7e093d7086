"""DeepSpeed ZeRO as the actor's optional training backend (``actor.backend=deepspeed``)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlinf.errors import ConfigError
from rlinf.workers.config import ActorConfig


def require_deepspeed() -> None:
    """Raises a clear error when ``actor.backend=deepspeed`` but the package is missing."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "actor.backend='deepspeed' needs the deepspeed package, which is not installed. Fix: "
            "`pip install -c constraints.txt -e '.[deepspeed]'` (or RLINF_EXTRAS=deepspeed make setup), "
            "or set actor.backend=torch."
        )


def deepspeed_config(cfg: ActorConfig, dtype: str) -> dict[str, Any]:
    """The DeepSpeed config built from the actor section.

    ``managed_gradient_accumulation: false`` leaves the accumulation boundary to the caller: every
    ``engine.step()`` closes one global batch, however many elastic micro-batches fed it.
    """
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


class DeepSpeedBackend:
    """A DeepSpeed ZeRO engine around the actor's model and AdamW.

    Gradients stay sums of token losses until the step: the ZeRO optimizer's loss scale is 1 during
    backward and ``tokens / world_size`` at ``step()``, whose unscaling then divides the
    rank-averaged gradient sums by the global token count (and clips on the true norm), which is
    exactly the torch backend's token-mean step.

    Args:
        model: the (possibly LoRA-wrapped) model.
        optimizer: AdamW over the trainable parameters.
        cfg: the actor section.
        dtype: parameter dtype.
        rank: this rank.
        world_size: ranks of the actor group (the process group must already exist).
    """

    def __init__(
        self, model: Any, optimizer: torch.optim.Optimizer, cfg: ActorConfig, dtype: str, rank: int, world_size: int
    ) -> None:
        require_deepspeed()
        from rlinf.models import cache_root

        # The CPU accelerator compiles a small C++ op on first use (minutes on 2 cores): keep it.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_root() / "torch_extensions"))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        import deepspeed

        self.stage = cfg.zero_stage
        self.world_size = world_size
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, dtype), dist_init_required=False
        )
        self.optimizer.override_loss_scale(1.0)

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, tokens: float) -> float:
        """Divides the accumulated gradient sums by ``tokens``, clips, steps; returns the grad norm."""
        self.optimizer.override_loss_scale(tokens / self.world_size)
        try:
            self.engine.step()
        finally:
            self.optimizer.override_loss_scale(1.0)
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def discard(self) -> None:
        """Drops accumulated gradients without stepping (a global batch with no valid tokens)."""
        self.optimizer.zero_grad()

    @contextlib.contextmanager
    def gathered(self, params: list[torch.nn.Parameter]) -> Iterator[None]:
        """Full parameters inside the block (ZeRO-3 shards them; collective: every rank enters)."""
        if self.stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag="state")

    def load(self, directory: Path) -> None:
        if not (directory / "state").is_dir():
            raise FileNotFoundError(
                f"{directory / 'state'} does not exist: this checkpoint was not written with actor.backend=deepspeed; "
                f"resume with the backend that wrote it."
            )
        self.engine.load_checkpoint(str(directory), tag="state")
