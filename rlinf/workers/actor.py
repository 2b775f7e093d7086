"""ActorWorker: policy training from scored groups, with gradient accumulation over micro-batches.

Micro-batches of groups are taken from the input channel as they arrive (so training overlaps
generation); each adds the *sum* of its per-token losses to the gradients, and one optimizer step
divides by the valid tokens of the whole global batch (across ranks). So any split into
micro-batches, in any order, gives the gradient of the full-batch token-mean loss.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rlinf.algorithms import group_advantage, ppo_clip_loss, token_kl
from rlinf.channel import Channel
from rlinf.worker import Worker
from rlinf.workers.config import ActorConfig
from rlinf.workers.inference import PackedBatch, pack_groups, token_logprobs
from rlinf.workers.rollout import Group, RolloutWorker, load_model, rank_share
from rlinf.workers.weights import export_state

if TYPE_CHECKING:
    from rlinf.group import WorkerGroup


AdvantageFn = Callable[[list[Group], PackedBatch], Tensor]
"""``(scored groups, their packed batch) -> advantages``, ``[B]`` per sample or ``[B, R]`` per token."""


def scored_rewards(group: Group) -> Tensor:
    """The group's ``[n]`` rewards as float32; a clear error if it skipped the reward stage."""
    if group.rewards is None:
        raise ValueError(
            f"group {group.index} reached the actor without rewards; route rollout output through "
            f"RewardWorker.score before ActorWorker.train."
        )
    return group.rewards.float()


def group_advantages(groups: list[Group], batch: PackedBatch | None = None) -> Tensor:
    """``[sum of n]`` GRPO advantages, group by group, in the order ``pack_groups`` lays out samples."""
    parts = []
    for g in groups:
        rewards = scored_rewards(g)
        if g.size < 2:
            raise ValueError(
                f"group {g.index} has {g.size} sample; GRPO normalises rewards within a group, so set "
                f"rollout.group_size >= 2 (e.g. 4)."
            )
        parts.append(group_advantage(rewards, g.size))
    return torch.cat(parts)


_SUM_KEYS = ("tokens", "loss_sum", "clip_sum", "approx_kl_sum", "ref_kl_sum")


class ActorWorker(Worker):
    """Trains the policy with the PPO clipped loss on GRPO advantages.

    Args:
        cfg: the actor section.
        model_dir: the model directory (resolved by the driver).
        temperature: the rollout's sampling temperature (log-probs use the same ``logits / T``).
        dtype: parameter dtype.
    """

    def __init__(self, cfg: ActorConfig, model_dir: str | Path, temperature: float, dtype: str = "float32") -> None:
        self.cfg = cfg
        self.temperature = temperature
        torch.manual_seed(cfg.seed + self.rank)
        self.model, self.tokenizer = load_model(model_dir, dtype, self.device)
        self.model.train()
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.version = 0  # optimizer steps taken; the policy version the rollout is tagged with
        self._parked: dict[str, Any] | None = None

    # ---- training --------------------------------------------------------------------------------

    def train(
        self,
        inp: Channel,
        num_groups: int,
        micro_batch_groups: int = 0,
        advantage: AdvantageFn = group_advantages,
        kl_in_loss: bool = True,
    ) -> dict[str, float]:
        """Takes this rank's share of ``num_groups`` scored groups in micro-batches; one optimizer step.

        Args:
            inp: scored ``Group`` items (rewards set).
            num_groups: groups in the global batch, across all actor ranks.
            micro_batch_groups: groups per forward/backward pass; 0 uses ``actor.micro_batch_groups``.
            advantage: how advantages are computed from a micro-batch (GRPO's by default).
            kl_in_loss: add ``actor.kl_coef`` times the k3 KL to the reference as a loss term; off for
                algorithms that put the KL penalty into the reward (then ``advantage`` handles it).
        """
        micro = micro_batch_groups or self.cfg.micro_batch_groups
        mine = rank_share(num_groups, self.rank, self.world_size)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=False)
        sums: dict[str, float] = {}
        taken = 0
        staleness = 0.0
        while taken < mine:
            items = inp.get_batch_items(min(micro, mine - taken))
            if not items:
                raise RuntimeError(f"channel {inp.name!r} closed after {taken} of {mine} groups.")
            taken += len(items)
            staleness = max(staleness, max(float(self.version - it.meta.version) for it in items))
            with self.device_lock():
                for key, value in self.accumulate([it.payload for it in items], advantage, kl_in_loss).items():
                    sums[key] = sums.get(key, 0.0) + value
        with self.device_lock():
            totals, grad_norm = self.apply_gradients(sums)
        t = max(totals["tokens"], 1.0)
        return {
            "actor/loss": totals["loss_sum"] / t,
            "actor/clip_fraction": totals["clip_sum"] / t,
            "actor/approx_kl": totals["approx_kl_sum"] / t,
            "actor/ref_kl": totals["ref_kl_sum"] / t,
            "actor/grad_norm": grad_norm,
            "actor/batch_tokens": totals["tokens"],
            "actor/groups": float(taken),
            "actor/staleness": staleness,
            "actor/version": float(self.version),
            "time/actor": time.perf_counter() - start,
        }

    def accumulate(
        self, groups: list[Group], advantage: AdvantageFn = group_advantages, kl_in_loss: bool = True
    ) -> dict[str, float]:
        """Forward/backward of one micro-batch; adds the gradient of its summed token losses."""
        cfg = self.cfg
        batch = pack_groups(groups, self.pad_id)
        adv = advantage(groups, batch)
        mask = batch.response_mask
        tokens = float(mask.sum())
        if tokens == 0:
            return {"tokens": 0.0}
        logprobs = token_logprobs(self.model, batch, self.temperature)
        loss, m = ppo_clip_loss(
            logprobs,
            batch.old_logprobs,
            adv,
            mask,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            aggregation="token-mean",
        )
        ref_kl = torch.zeros(())
        if cfg.kl_coef > 0 and kl_in_loss:
            if batch.ref_logprobs is None:
                raise ValueError(
                    f"actor.kl_coef={cfg.kl_coef} needs reference log-probs, but the groups carry none; "
                    f"route them through InferenceWorker.infer, or set actor.kl_coef=0."
                )
            ref_kl = token_kl(logprobs, batch.ref_logprobs, estimator="k3", mask=mask).sum() / tokens
            loss = loss + cfg.kl_coef * ref_kl
        elif batch.ref_logprobs is not None:  # KL is in the reward: report it, don't optimise it
            ref_kl = token_kl(logprobs.detach(), batch.ref_logprobs, estimator="k3", mask=mask).sum() / tokens
        (loss * tokens).backward()
        return {
            "tokens": tokens,
            "loss_sum": float(loss.detach()) * tokens,
            "clip_sum": float(m["clip_fraction"]) * tokens,
            "approx_kl_sum": float(m["approx_kl"]) * tokens,
            "ref_kl_sum": float(ref_kl.detach()) * tokens,
        }

    def apply_gradients(self, sums: dict[str, float]) -> tuple[dict[str, float], float]:
        """Sums gradients, token counts and loss sums over ranks, divides by the tokens, steps the optimizer.

        Returns:
            (global-batch sums: ``tokens``, ``loss_sum``, ..., gradient norm before clipping).
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        count = torch.tensor([sums.get(k, 0.0) for k in _SUM_KEYS], dtype=torch.float64)
        if self.world_size > 1:
            import torch.distributed as dist

            group = self.dist_group()
            dist.all_reduce(count, group=group)
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            dist.all_reduce(flat, group=group)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p).clone()
                offset += n
        totals = dict(zip(_SUM_KEYS, count.tolist(), strict=True))
        tokens = totals["tokens"]
        if tokens == 0:  # nothing to learn from (every sample failed): keep the weights
            return totals, 0.0
        for p in params:
            if p.grad is not None:
                p.grad.div_(tokens)
        if self.cfg.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        self.optimizer.step()
        self.version += 1
        return totals, norm

    # ---- weight sync -----------------------------------------------------------------------------

    def push_weights(self, to: WorkerGroup[RolloutWorker]) -> dict[str, float]:
        """Sends the current weights to every rank of ``to`` (from rank 0) and tags them with the version."""
        if self.rank != 0:
            return {}
        start = time.perf_counter()
        with self.device_lock():
            state = export_state(self.model)
        to.call(RolloutWorker.load_weights, state, self.version).wait()
        return {"time/weight_sync": time.perf_counter() - start}

    def state_dict(self) -> dict[str, Tensor]:
        """Detached CPU copies of the policy weights."""
        with self.device_lock():
            return export_state(self.model)

    def get_version(self) -> int:
        return self.version

    # ---- context switching -----------------------------------------------------------------------

    def offload(self) -> None:
        """On CUDA moves weights, grads and optimizer state to CPU; on CPU there is nowhere to move them."""
        if self.device.type != "cuda":
            return
        self._move(torch.device("cpu"))

    def onload(self) -> None:
        if self.device.type != "cuda":
            return
        self._move(self.device)

    def _move(self, device: torch.device) -> None:
        self.model.to(device)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad = p.grad.to(device)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if isinstance(v, Tensor):
                    state[k] = v.to(device)

    # ---- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, directory: str) -> str:
        """Writes model, optimizer, version and RNG state to ``directory/actor.pt`` (rank 0) plus an HF model dir."""
        path = Path(directory)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "version": self.version,
                    "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate(),
                },
                path / "actor.pt",
            )
            self.model.save_pretrained(str(path / "model"))
            self.tokenizer.save_pretrained(str(path / "model"))
        return str(path)

    def load_checkpoint(self, directory: str) -> int:
        """Restores what :meth:`save_checkpoint` wrote; returns the restored version."""
        file = Path(directory) / "actor.pt"
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist; pass a directory written by save_checkpoint.")
        state = torch.load(file, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        return self.version
