"""CriticWorker: the value model of LLM PPO (the policy's backbone plus a scalar head) and its training.

The critic is a stage between the reward (or reference) stage and the actor. ``CriticWorker.train``
takes scored groups from a channel in elastic micro-batches as they arrive; one forward pass per
micro-batch gives both the values it attaches to the groups (the value of the prefix before every
response token) and the clipped value loss on their GAE returns, whose gradient it accumulates.
As in the actor, each micro-batch adds the *sum* of its token losses and the step divides by the
valid tokens of the global batch across ranks, so any split into micro-batches gives the gradient
of the full-batch token-mean loss.

The valued groups go on to the actor once every critic rank is through its share (after the
gradient all-reduce, before the optimizer step), so every value comes from the weights the batch
started with. Holding them back costs little, since PPO's actor whitens advantages over its whole
share and so waits for all of it anyway, and it keeps shared devices free of deadlocks: once the
actor holds a device in its own gradient all-reduce, no critic work on that device stands between
it and its peers. For the same reason the critic's all-reduce runs outside the device lock.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rlinf.algorithms import shaped_token_rewards, token_gae, token_kl, value_loss
from rlinf.channel import Channel
from rlinf.errors import ConfigError
from rlinf.worker import Worker
from rlinf.workers.actor import scored_rewards
from rlinf.workers.inference import PackedBatch, block_mask_kind, pack_groups, packed_passes
from rlinf.workers.rollout import Group, rank_share
from rlinf.workers.weights import move_training_state


@dataclass(frozen=True)
class CriticConfig:
    """Value model training (section ``critic:``); the model is the run's ``model`` section.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        max_grad_norm: gradients are clipped to this global norm (0 = no clipping).
        micro_batch_groups: most groups taken from the input channel per forward/backward pass.
        min_micro_batch_groups: fewest groups a pass waits for; between the two it takes whatever
            has already arrived (elastic micro-batches). Any split gives the same step.
        value_clip: how far (in reward units) a value may move from the one recorded with the batch
            before its gradient stops; ``None`` turns the clip off. With ``epochs=1`` it never acts,
            since the recorded values are the ones being trained.
        epochs: optimizer steps per batch; the first streams with the batch, later ones reuse it.
        gamma: GAE discount per token (of the critic's returns and the actor's advantages).
        lam: GAE lambda (of the actor's advantages; the returns are ``advantages + values``).
        head_init_std: std of the value head's initial weights (bias 0), small so that the first
            values are near 0 and the head does not disturb the backbone's early gradients.
        seed: the value head's initial weights (the same on every rank).
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    micro_batch_groups: int = 2
    min_micro_batch_groups: int = 1
    value_clip: float | None = 0.2
    epochs: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    head_init_std: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"critic.lr={self.lr} must be > 0; try 1e-4 for a tiny model, 1e-5 for a pretrained one.")
        if self.micro_batch_groups < 1:
            raise ConfigError(f"critic.micro_batch_groups={self.micro_batch_groups} must be >= 1; try 2.")
        if not 1 <= self.min_micro_batch_groups <= self.micro_batch_groups:
            raise ConfigError(
                f"critic.min_micro_batch_groups={self.min_micro_batch_groups} must be between 1 and "
                f"critic.micro_batch_groups={self.micro_batch_groups}; try min_micro_batch_groups=1."
            )
        if self.value_clip is not None and self.value_clip < 0:
            raise ConfigError(f"critic.value_clip={self.value_clip} must be >= 0, or null to turn the clip off.")
        if self.epochs < 1:
            raise ConfigError(f"critic.epochs={self.epochs} must be >= 1 optimizer step per batch; try 1.")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"critic.gamma={self.gamma} must be in [0, 1]; LLM PPO usually uses 1.0.")
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"critic.lam={self.lam} must be in [0, 1]; try 0.95.")
        if self.head_init_std < 0:
            raise ConfigError(f"critic.head_init_std={self.head_init_std} must be >= 0; try 1e-3.")
        if self.max_grad_norm < 0:
            raise ConfigError(f"critic.max_grad_norm={self.max_grad_norm} must be >= 0 (0 = no clipping).")


class ValueModel(nn.Module):
    """A transformer backbone (no LM head) with a linear value head over its last hidden state.

    Args:
        backbone: a transformers base model (``AutoModel``) returning ``last_hidden_state``.
        head_init_std: std of the head's initial weights; its bias starts at 0.
    """

    def __init__(self, backbone: Any, head_init_std: float = 1e-3) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.config.hidden_size), 1, dtype=backbone.dtype)
        nn.init.normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, batch: PackedBatch, groups: Sequence[Group] | None = None, block_mask: str | None = None
    ) -> Tensor:
        """``[B, R]`` float32 values: response token ``t`` gets the value of the prefix before it; 0 off the mask.

        With the ``groups`` of ``batch = pack_groups(groups)`` and the backbone's ``block_mask``
        (:func:`block_mask_kind`), each group goes in as one packed row, its prompt computed once for
        all its samples (as the actor's log-probs do); otherwise every sample is a row of its own.
        """
        device = self.head.weight.device
        if groups is not None and block_mask is not None and max(g.response_ids.shape[0] for g in groups) > 1:
            passes = packed_passes(groups, batch.to(device), block_mask)
            if passes is not None:
                values = torch.zeros(batch.response_ids.shape, device=device)
                for p in passes:
                    out = self.backbone(
                        input_ids=p.input_ids,
                        attention_mask=p.attention_mask,
                        position_ids=p.position_ids,
                        use_cache=False,
                    )
                    picked = out.last_hidden_state[:, p.first :][p.rows[:, None], p.cols]
                    values[p.samples, : p.cols.shape[1]] = self.head(picked).squeeze(-1).float()
                return torch.where(batch.response_mask.to(device), values, torch.zeros_like(values))
        input_ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
        r = batch.response_ids.shape[1]
        # The prefix before response token t ends at prompt_len - 1 + t.
        pos = batch.prompt_lens.to(device)[:, None] - 1 + torch.arange(r, device=device)[None, :]
        pos = pos.clamp(max=hidden.shape[1] - 1)
        picked = hidden.gather(1, pos[:, :, None].expand(-1, -1, hidden.shape[-1]))
        values = self.head(picked).squeeze(-1).float()
        return torch.where(batch.response_mask.to(device), values, torch.zeros_like(values))


def load_value_model(
    model_dir: str | Path, dtype: str, device: torch.device, head_init_std: float = 1e-3
) -> tuple[ValueModel, Any]:
    """The backbone of the causal LM in ``model_dir`` with a fresh value head, and its tokenizer (offline)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    backbone = AutoModel.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    return ValueModel(backbone, head_init_std).to(device), tokenizer


def pack_values(groups: list[Group], batch: PackedBatch) -> Tensor:
    """``[B, R]`` critic values of ``groups`` laid out as ``batch = pack_groups(groups)`` lays out samples."""
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
    row = 0
    for g in groups:
        if g.values is None:
            raise ValueError(
                f"group {g.index} has no critic values; route groups through CriticWorker.train (or "
                f"CriticWorker.values) before computing GAE advantages."
            )
        lengths = g.response_mask.sum(dim=1)
        for i in range(g.size):
            n = int(lengths[i])
            out[row, :n] = g.values[i, :n].float()
            row += 1
    return out


def attach_values(groups: list[Group], values: Tensor) -> list[Group]:
    """Splits ``[B, R]`` packed values back into the groups (each ``[n, R_g]``, 0 past a sample's end)."""
    out, row = [], 0
    for g in groups:
        width = g.response_ids.shape[1]
        full = torch.zeros((g.size, width), dtype=torch.float32)
        k = min(width, values.shape[1])
        full[:, :k] = values[row : row + g.size, :k]
        out.append(replace(g, values=full))
        row += g.size
    return out


def gae_targets(
    groups: list[Group],
    batch: PackedBatch,
    *,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
) -> tuple[Tensor, Tensor]:
    """``[B, R]`` GAE advantages and ``[B, R]`` value targets (returns) of scored groups with critic values.

    Token rewards are the verifier's sequence reward on the last response token minus ``kl_coef``
    times the k1 KL of the sampling policy to the reference on every token; the state after the
    last token is terminal (value 0).

    Args:
        groups: scored groups (rewards set) carrying ``values``.
        batch: ``pack_groups(groups)``; with ``kl_coef > 0`` it must carry reference log-probs.
        kl_coef: weight of the per-token KL penalty in the reward, at least 0.
        gamma: discount per token.
        lam: GAE lambda.
        whiten: normalise the advantages over every valid token of ``batch`` (not the returns).
    """
    seq_rewards = torch.cat([scored_rewards(g) for g in groups])
    mask = batch.response_mask
    kl = None
    if kl_coef > 0:
        if batch.ref_logprobs is None:
            raise ValueError(
                f"actor.kl_coef={kl_coef} needs reference log-probs, but the groups carry none; "
                f"route them through InferenceWorker.infer, or set actor.kl_coef=0."
            )
        kl = token_kl(batch.old_logprobs, batch.ref_logprobs, estimator="k1", mask=mask)
    rewards = shaped_token_rewards(seq_rewards, mask, kl=kl, kl_coef=kl_coef)
    return token_gae(rewards, pack_values(groups, batch), mask, gamma=gamma, lam=lam, whiten=whiten)


def gae_advantages(
    groups: list[Group], batch: PackedBatch, *, kl_coef: float = 0.0, gamma: float = 1.0, lam: float = 0.95
) -> Tensor:
    """The actor's advantage hook: ``[B, R]`` GAE advantages whitened over the packed groups."""
    return gae_targets(groups, batch, kl_coef=kl_coef, gamma=gamma, lam=lam, whiten=True)[0]


# Global-batch sums reduced across ranks: returns and errors (return - value) give the exact
# explained variance of the whole batch whatever its split.
_SUM_KEYS = ("tokens", "loss_sum", "clip_sum", "value_sum", "ret_sum", "ret_sq_sum", "err_sum", "err_sq_sum")


class CriticWorker(Worker):
    """Attaches values to scored groups and trains the value model on their GAE returns.

    Args:
        cfg: the critic section.
        model_dir: the model directory (resolved by the driver); the critic starts from its backbone.
        dtype: parameter dtype.
    """

    def __init__(self, cfg: CriticConfig, model_dir: str | Path, dtype: str = "float32") -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)  # the same head on every rank: the ranks train one model
        self.model, self.tokenizer = load_value_model(model_dir, dtype, self.device, cfg.head_init_std)
        self.model.train()
        self.block_mask = block_mask_kind(self.model.backbone)  # each group as one packed row where it can
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.version = 0  # optimizer steps taken
        self._reduce_group: Any = None

    # ---- values only -----------------------------------------------------------------------------

    def values(self, inp: Channel, out: Channel, num_groups: int) -> dict[str, float]:
        """Attaches ``values`` to this rank's share of ``num_groups`` groups and forwards each; no training."""
        mine = rank_share(num_groups, self.rank, self.world_size)
        start = time.perf_counter()
        for _ in range(mine):
            item = inp.get_item()
            group: Group = item.payload
            with self.device_lock(), torch.no_grad():
                values = self.model(pack_groups([group], self.pad_id), [group], self.block_mask).cpu()
            out.put(attach_values([group], values)[0], version=item.meta.version)
        return {"critic/groups": float(mine), "time/critic": time.perf_counter() - start}

    # ---- training --------------------------------------------------------------------------------

    def train(
        self, inp: Channel, out: Channel, num_groups: int, kl_coef: float = 0.0, micro_batch_groups: int = 0
    ) -> dict[str, float]:
        """Attaches values to this rank's share of ``num_groups`` scored groups, forwards them, trains on them.

        Args:
            inp: scored ``Group`` items (rewards set; reference log-probs too when ``kl_coef > 0``).
            out: receives each group with ``values`` set, once every critic rank is through its
                share (see the module docstring).
            num_groups: groups in the global batch, across all critic ranks.
            kl_coef: weight of the per-token KL penalty in the reward the returns are built from.
            micro_batch_groups: most groups per forward/backward pass; 0 uses ``critic.micro_batch_groups``.

        Returns:
            ``critic/value_loss``, ``critic/explained_variance``, ``critic/values`` and
            ``critic/returns`` of the batch as it arrived (before this call's updates);
            ``critic/clip_fraction`` over all epochs (0 with one: the first trains the recorded values).
        """
        hi = micro_batch_groups or self.cfg.micro_batch_groups
        lo = min(self.cfg.min_micro_batch_groups, hi)
        mine = rank_share(num_groups, self.rank, self.world_size)
        start = time.perf_counter()
        kept: list[list[Group]] = []  # the micro-batches with their recorded values
        versions: list[int] = []
        self.optimizer.zero_grad(set_to_none=False)
        sums: dict[str, float] = {}
        while len(versions) < mine:  # the first epoch streams with the batch
            left = mine - len(versions)
            items = inp.get_batch_items(min(lo, left), max_weight=min(hi, left))
            if not items:
                raise RuntimeError(f"channel {inp.name!r} closed after {len(versions)} of {mine} groups.")
            with self.device_lock():
                groups, part = self.accumulate([it.payload for it in items], kl_coef, fresh=True)
            kept.append(groups)
            versions += [it.meta.version for it in items]
            _add(sums, part)
        first = self.reduce_gradients(sums)  # returns once every rank is through its share
        for group, version in zip((g for mb in kept for g in mb), versions, strict=True):
            out.put(group, version=version)
        grad_norm = self.step(first)
        clipped, seen = first["clip_sum"], first["tokens"]
        for _ in range(1, self.cfg.epochs):  # later epochs: the kept batch, anchored at its recorded values
            self.optimizer.zero_grad(set_to_none=False)
            sums = {}
            for groups in kept:
                with self.device_lock():
                    _add(sums, self.accumulate(groups, kl_coef, fresh=False)[1])
            totals = self.reduce_gradients(sums)
            self.step(totals)
            clipped, seen = clipped + totals["clip_sum"], seen + totals["tokens"]
        return {
            **_metrics(first),
            "critic/clip_fraction": clipped / max(seen, 1.0),
            "critic/grad_norm": grad_norm,
            "critic/groups": float(mine),
            "critic/micro_batches": float(len(kept)),
            "critic/version": float(self.version),
            "time/critic": time.perf_counter() - start,
        }

    def accumulate(self, groups: list[Group], kl_coef: float, fresh: bool) -> tuple[list[Group], dict[str, float]]:
        """Forward/backward of one micro-batch; adds the gradient of its summed token value losses.

        Args:
            groups: scored groups; with ``fresh=False`` they carry the values recorded with the batch.
            kl_coef: KL penalty weight in the token rewards.
            fresh: the groups are new: record this forward's values in them (the clip's anchor).

        Returns:
            (the groups with ``values``, this micro-batch's sums).
        """
        cfg = self.cfg
        batch = pack_groups(groups, self.pad_id)
        mask = batch.response_mask
        tokens = float(mask.sum())
        if tokens == 0:  # every sample failed: nothing to value or learn
            return (attach_values(groups, torch.zeros(mask.shape)) if fresh else groups), {"tokens": 0.0}
        values = self.model(batch, groups, self.block_mask)
        if fresh:
            groups = attach_values(groups, values.detach().cpu())
        old = pack_values(groups, batch)
        _, returns = gae_targets(groups, batch, kl_coef=kl_coef, gamma=cfg.gamma, lam=cfg.lam, whiten=False)
        dev = values.device
        loss, m = value_loss(
            values, old.to(dev), returns.to(dev), mask.to(dev), clip=cfg.value_clip, aggregation="token-mean"
        )
        (loss * tokens).backward()
        err = (returns - values.detach().cpu())[mask]
        ret = returns[mask]
        return groups, {
            "tokens": tokens,
            "loss_sum": float(loss.detach()) * tokens,
            "clip_sum": float(m["clip_fraction"]) * tokens,
            "value_sum": float(old[mask].sum()),
            "ret_sum": float(ret.sum()),
            "ret_sq_sum": float((ret**2).sum()),
            "err_sum": float(err.sum()),
            "err_sq_sum": float((err**2).sum()),
        }

    def reduce_gradients(self, sums: dict[str, float]) -> dict[str, float]:
        """Sums the gradients and ``sums`` over ranks; returns the global-batch sums.

        The all-reduce runs on CPU copies over gloo, outside the device lock: a rank waiting for its
        peers must not hold a device that the work its peers wait for needs.
        """
        count = torch.tensor([sums.get(k, 0.0) for k in _SUM_KEYS], dtype=torch.float64)
        if self.world_size > 1:
            import torch.distributed as dist

            with self.device_lock():
                flat = torch.cat([_grad(p).reshape(-1).cpu() for p in self._params()])
            group = self._cpu_group()
            dist.all_reduce(count, group=group)
            dist.all_reduce(flat, group=group)
            with self.device_lock():
                offset = 0
                for p in self._params():
                    n = p.numel()
                    p.grad = flat[offset : offset + n].view_as(p).to(p.device, copy=True)
                    offset += n
        return dict(zip(_SUM_KEYS, count.tolist(), strict=True))

    def step(self, totals: dict[str, float]) -> float:
        """Divides the summed gradients by the batch's tokens, clips them, steps; returns the norm before clipping."""
        tokens = totals["tokens"]
        if tokens == 0:  # nothing to learn from (every sample failed): keep the weights
            return 0.0
        with self.device_lock():
            params = self._params()
            grads = [p.grad for p in params if p.grad is not None]
            for g in grads:
                g.div_(tokens)
            if self.cfg.max_grad_norm > 0:
                norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
            else:
                norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            self.optimizer.step()
        self.version += 1
        return norm

    def _params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _cpu_group(self) -> Any:
        """The ranks' gloo group: the worker's own on CPU, a second one beside NCCL on CUDA."""
        if self._reduce_group is None:
            import torch.distributed as dist

            world = self.dist_group()
            self._reduce_group = world if self.device.type != "cuda" else dist.new_group(backend="gloo")
        return self._reduce_group

    # ---- inspection ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """Detached CPU copies of the value model's weights (backbone and head)."""
        with self.device_lock(), torch.no_grad():
            return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

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
        move_training_state(self.model, self.optimizer, device)

    # ---- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, directory: str) -> str:
        """Writes value model, optimizer, version and RNG state to ``directory/critic.pt`` (rank 0)."""
        path = Path(directory)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            with self.device_lock():
                torch.save(
                    {
                        "model": self.model.state_dict(),
                        "optimizer": self.optimizer.state_dict(),
                        "version": self.version,
                        "torch_rng": torch.get_rng_state(),
                        "python_rng": random.getstate(),
                    },
                    path / "critic.pt",
                )
        return str(path)

    def load_checkpoint(self, directory: str) -> int:
        """Restores what :meth:`save_checkpoint` wrote; returns the restored version."""
        file = Path(directory) / "critic.pt"
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist; pass a directory written by CriticWorker.save_checkpoint.")
        state = torch.load(file, map_location=self.device, weights_only=False)
        with self.device_lock():
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        return self.version


def _grad(p: Tensor) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _add(sums: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        sums[key] = sums.get(key, 0.0) + value


def _metrics(totals: dict[str, float]) -> dict[str, float]:
    """Means over the global batch's valid tokens; explained variance ``1 - Var(R - v) / Var(R)``."""
    t = max(totals.get("tokens", 0.0), 1.0)
    var_ret = totals.get("ret_sq_sum", 0.0) / t - (totals.get("ret_sum", 0.0) / t) ** 2
    var_err = totals.get("err_sq_sum", 0.0) / t - (totals.get("err_sum", 0.0) / t) ** 2
    return {
        "critic/value_loss": totals.get("loss_sum", 0.0) / t,
        "critic/explained_variance": 1 - var_err / max(var_ret, 1e-8),
        "critic/values": totals.get("value_sum", 0.0) / t,
        "critic/returns": totals.get("ret_sum", 0.0) / t,
    }
