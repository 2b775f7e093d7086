"""ActorWorker: policy training from scored groups, with gradient accumulation over micro-batches.

Micro-batches of groups are taken from the input channel as they arrive (so training overlaps
generation): each forward/backward pass takes at least ``actor.min_micro_batch_groups`` groups and
whatever else has already arrived, up to ``actor.micro_batch_groups``. Each pass adds the *sum* of
its per-token losses to the gradients, and one optimizer step divides by the valid tokens of the
whole global batch (across ranks). So any split into micro-batches, in any order, gives the
gradient of the full-batch token-mean loss.

Options (``ActorConfig``): LoRA adapters (``lora_rank > 0``: only the adapters train; the rollout
receives merged full weights) and two backends: ``torch`` (AdamW; gradients all-reduced once per
step over gloo/NCCL) and ``deepspeed`` (ZeRO stage 1, 2 or 3; see :class:`DeepSpeedBackend`).

What ``offload``/``onload`` move when another component needs the devices:

- CUDA, torch backend: weights, gradients and AdamW state go to CPU memory and come back; the CUDA
  caching allocator is emptied, so the memory is free for the other process.
- CUDA, deepspeed backend: ``engine.offload_states()`` / ``reload_states()`` (optimizer state,
  fp32 and working weights, gradient buffers).
- CPU: weights and optimizer state stay (host memory is the device memory); gradient buffers are
  dropped (``grad = None``, one parameter-sized copy) unless a step is half accumulated, in which
  case they are kept so the step stays exact. Nothing is re-allocated before the next step needs it.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rlinf.algorithms import group_advantage, ppo_clip_loss, token_kl
from rlinf.channel import Channel
from rlinf.errors import ConfigError
from rlinf.worker import Worker
from rlinf.workers.config import ActorConfig
from rlinf.workers.inference import PackedBatch, block_mask_kind, group_token_logprobs, pack_groups, token_logprobs
from rlinf.workers.lora import add_lora, merged_state
from rlinf.workers.micro_batch import ElasticPull
from rlinf.workers.rollout import Group, RolloutWorker, autocast_region, load_model, rank_share
from rlinf.workers.weights import export_state, move_training_state, publish_state, send_state
from rlinf.workers.zero import DeepSpeedBackend, require_deepspeed

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


@dataclass(frozen=True)
class Example:
    """One supervised example (SFT): the prompt text and the gold response that follows it.

    Args:
        prompt: prompt text as the rollout would see it (chat template already applied).
        response: the response text; the end-of-sequence token is appended when tokenised.
        index: position in the example stream (for logs).
    """

    prompt: str
    response: str
    index: int = 0


_SUM_KEYS = ("tokens", "loss_sum", "clip_sum", "approx_kl_sum", "ref_kl_sum")
PassFn = Callable[[list[Any]], dict[str, float]]


# ---- the worker ----------------------------------------------------------------------------------


class ActorWorker(Worker):
    """Trains the policy with the PPO clipped loss on GRPO advantages (or any ``advantage``), or SFT.

    Args:
        cfg: the actor section.
        model_dir: the model directory (resolved by the driver).
        temperature: the rollout's sampling temperature (log-probs use the same ``logits / T``).
        dtype: parameter dtype.
    """

    def __init__(self, cfg: ActorConfig, model_dir: str | Path, temperature: float, dtype: str = "float32") -> None:
        self.cfg = cfg
        self.temperature = temperature
        if cfg.backend == "deepspeed":
            require_deepspeed()
        if cfg.autocast != "none" and dtype != "float32":
            raise ConfigError(
                f"actor.autocast={cfg.autocast!r} keeps weights in model.dtype and computes in {cfg.autocast}, "
                f"but model.dtype={dtype!r}; set model.dtype=float32 for mixed precision, or actor.autocast=none."
            )
        torch.manual_seed(cfg.seed)  # same on every rank: LoRA's initial adapters must agree
        model, self.tokenizer = load_model(model_dir, dtype, self.device, cfg.attention_kernel(self.device.type))
        if cfg.lora_rank > 0:
            model = add_lora(model, cfg)
        model.train()
        self.model: Any = model
        self.block_mask = block_mask_kind(model)  # a micro-batch's groups in one packed pass where it can
        torch.manual_seed(cfg.seed + self.rank)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # the fused kernel updates every parameter in one pass (3x faster than the per-tensor loop on CPU);
        # DeepSpeed gets the plain one, as it steps its own flat partitions
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=cfg.backend == "torch"
        )
        self.dtype = dtype
        self.ds: DeepSpeedBackend | None = None  # created on first use: see _setup
        self.version = 0  # optimizer steps taken; the policy version the rollout is tagged with
        self.in_step = False  # gradients of a half-accumulated step must survive an offload

    @property
    def lora(self) -> bool:
        return self.cfg.lora_rank > 0

    def _setup(self) -> None:
        """Creates the DeepSpeed engine on first use: it joins the worker group's process group (gloo
        on CPU, NCCL on CUDA), which exists only once every rank is launched. Collective."""
        if self.cfg.backend == "deepspeed" and self.ds is None:
            self.dist_group()
            self.ds = DeepSpeedBackend(self.model, self.optimizer, self.cfg, self.dtype, self.rank, self.world_size)

    def _forward(self, **inputs: Any) -> Any:
        model = self.ds.engine if self.ds else self.model
        with self._precision():
            return model(**inputs)

    def _precision(self) -> contextlib.AbstractContextManager[Any]:
        """The forward passes' autocast region (nothing without ``actor.autocast``).

        Backward runs in the dtypes the forward recorded, so only forward passes sit in it. Autocast
        keeps its low-precision copies of the weights until the outermost region ends, so the passes
        of one micro-batch (one packed pass, or the prompts and then each length bucket) go in one
        region and cast the weights once.
        """
        return autocast_region(self.device, self.cfg.autocast)

    # ---- training --------------------------------------------------------------------------------

    def train(
        self,
        inp: Channel,
        num_groups: int,
        micro_batch_groups: int = 0,
        advantage: AdvantageFn = group_advantages,
        kl_in_loss: bool = True,
    ) -> dict[str, float]:
        """Takes this rank's share of ``num_groups`` scored groups in elastic micro-batches; one optimizer step.

        Args:
            inp: scored ``Group`` items (rewards set).
            num_groups: groups in the global batch, across all actor ranks.
            micro_batch_groups: exactly this many groups per forward/backward pass (fewer only at the
                end of the share); 0 takes between ``actor.min_micro_batch_groups`` and
                ``actor.micro_batch_groups``, whatever has arrived (elastic).
            advantage: how advantages are computed from a micro-batch (GRPO's by default).
            kl_in_loss: add ``actor.kl_coef`` times the k3 KL to the reference as a loss term; off for
                algorithms that put the KL penalty into the reward (then ``advantage`` handles it).
        """
        self._setup()
        start = time.perf_counter()
        sums, taken, staleness, pulls = self._accumulate_share(
            inp, num_groups, micro_batch_groups, lambda groups: self.accumulate(groups, advantage, kl_in_loss)
        )
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
            **pulls.metrics("actor"),
            "actor/staleness": staleness,
            "actor/version": float(self.version),
            "time/actor": time.perf_counter() - start,
        }

    def train_sft(self, inp: Channel, num_examples: int, micro_batch_groups: int = 0) -> dict[str, float]:
        """One optimizer step of supervised fine-tuning on this rank's share of ``num_examples``.

        The loss is the token-mean negative log-likelihood of the response tokens over the global
        batch; prompt tokens carry no loss.

        Args:
            inp: ``Example`` items.
            num_examples: examples in the global batch, across all actor ranks.
            micro_batch_groups: exactly this many examples per forward/backward pass; 0 is elastic, as in
                :meth:`train`.
        """
        self._setup()
        start = time.perf_counter()
        sums, taken, _, pulls = self._accumulate_share(inp, num_examples, micro_batch_groups, self.accumulate_sft)
        with self.device_lock():
            totals, grad_norm = self.apply_gradients(sums)
        return {
            "actor/loss": totals["loss_sum"] / max(totals["tokens"], 1.0),
            "actor/grad_norm": grad_norm,
            "actor/batch_tokens": totals["tokens"],
            "actor/samples": float(taken),
            **pulls.metrics("actor"),
            "actor/version": float(self.version),
            "time/actor": time.perf_counter() - start,
        }

    def eval_sft(self, inp: Channel, num_examples: int) -> dict[str, float]:
        """Summed negative log-likelihood of the responses of this rank's share of ``num_examples``.

        Returns ``eval/nll_sum`` and ``eval/tokens``; the driver divides their sums over ranks.
        """
        self._setup()
        with torch.no_grad():
            sums, _, _, _ = self._run_share(inp, num_examples, 0, self._eval_pass, backward=False)
        return {"eval/nll_sum": sums.get("nll_sum", 0.0), "eval/tokens": sums.get("tokens", 0.0)}

    def _eval_pass(self, examples: list[Example]) -> dict[str, float]:
        batch = pack_groups([self._sft_group(e) for e in examples], self.pad_id).to(self.device)
        mask = batch.response_mask
        nll = -(token_logprobs(self._forward, batch, 1.0) * mask).sum()
        return {"tokens": float(mask.sum()), "nll_sum": float(nll)}

    def _accumulate_share(
        self, inp: Channel, num: int, micro: int, run_pass: PassFn
    ) -> tuple[dict[str, float], int, float, ElasticPull]:
        """Starts a global batch and runs ``run_pass`` (forward and backward) on this rank's share."""
        self.begin_step()
        return self._run_share(inp, num, micro, run_pass, backward=True)

    def _run_share(
        self, inp: Channel, num: int, micro: int, run_pass: PassFn, backward: bool
    ) -> tuple[dict[str, float], int, float, ElasticPull]:
        """Takes this rank's share of ``num`` items in elastic micro-batches and runs ``run_pass`` on each.

        With DeepSpeed on several ranks every pass is collective (ZeRO reduces gradients in each
        backward and ZeRO-3 gathers weights in each forward), so the ranks go in lock step: a rank
        whose share is done runs empty passes while another still has items.

        Returns:
            (summed pass results, items taken, max staleness in versions, the pulls with their sizes).
        """
        lo, hi = (micro, micro) if micro else (self.cfg.min_micro_batch_groups, self.cfg.micro_batch_groups)
        mine = rank_share(num, self.rank, self.world_size)
        lockstep = self.ds is not None and self.world_size > 1
        sums: dict[str, float] = {}
        pulls = ElasticPull(lo, hi)
        taken, staleness = 0, 0.0
        while True:
            left = mine - taken
            if lockstep and not self._anyone_has_work(left > 0):
                break
            if left == 0:
                if not lockstep:
                    break
                with self.device_lock():
                    self._empty_pass(backward)
                continue
            items = pulls.pull(inp, left)
            if not items:
                raise RuntimeError(f"channel {inp.name!r} closed after {taken} of {mine} items.")
            taken += len(items)
            staleness = max(staleness, max(float(self.version - it.meta.version) for it in items))
            with self.device_lock():
                for key, value in run_pass([it.payload for it in items]).items():
                    sums[key] = sums.get(key, 0.0) + value
        return sums, taken, staleness, pulls

    def begin_step(self) -> None:
        """Starts accumulating a new global batch."""
        if self.ds is None:
            self.optimizer.zero_grad(set_to_none=False)
        self.in_step = True

    def accumulate(
        self, groups: list[Group], advantage: AdvantageFn = group_advantages, kl_in_loss: bool = True
    ) -> dict[str, float]:
        """Forward/backward of one micro-batch; adds the gradient of its summed token losses."""
        cfg = self.cfg
        batch = pack_groups(groups, self.pad_id)
        adv = advantage(groups, batch).to(self.device)
        batch = batch.to(self.device)
        mask = batch.response_mask
        tokens = float(mask.sum())
        if tokens == 0:
            self._empty_pass_if_collective()
            return {"tokens": 0.0}
        with self._precision():
            logprobs = group_token_logprobs(self._forward, groups, batch, self.temperature, self.block_mask)
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
        self._backward(loss * tokens)
        return {
            "tokens": tokens,
            "loss_sum": float(loss.detach()) * tokens,
            "clip_sum": float(m["clip_fraction"]) * tokens,
            "approx_kl_sum": float(m["approx_kl"]) * tokens,
            "ref_kl_sum": float(ref_kl.detach()) * tokens,
        }

    def accumulate_sft(self, examples: list[Example]) -> dict[str, float]:
        """Forward/backward of one SFT micro-batch; adds the gradient of its summed response-token NLL."""
        batch = pack_groups([self._sft_group(e) for e in examples], self.pad_id).to(self.device)
        mask = batch.response_mask
        tokens = float(mask.sum())
        if tokens == 0:
            self._empty_pass_if_collective()
            return {"tokens": 0.0}
        nll = -(token_logprobs(self._forward, batch, 1.0) * mask).sum()
        self._backward(nll)
        return {"tokens": tokens, "loss_sum": float(nll.detach())}

    def _sft_group(self, example: Example) -> Group:
        """An ``Example`` as a one-sample group: prompt tokens, then response tokens plus end-of-sequence."""
        if not isinstance(example, Example):
            raise TypeError(
                f"train_sft takes Example items, got {type(example).__name__}; put Example(prompt, response)."
            )
        tok = self.tokenizer
        prompt = list(tok(example.prompt, add_special_tokens=False)["input_ids"]) or [self.pad_id]
        response = [*tok(example.response, add_special_tokens=False)["input_ids"], int(tok.eos_token_id)]
        r = len(response)
        return Group(
            prompt_ids=torch.tensor(prompt, dtype=torch.long),
            response_ids=torch.tensor([response], dtype=torch.long),
            response_mask=torch.ones((1, r), dtype=torch.bool),
            logprobs=torch.zeros((1, r)),
            texts=(example.response,),
            truncated=(False,),
            failures=("",),
            problem=None,
            version=self.version,
            index=example.index,
        )

    def _backward(self, loss: Tensor) -> None:
        if self.ds is not None:
            self.ds.backward(loss)
        else:
            loss.backward()

    def _empty_pass_if_collective(self) -> None:
        if self.ds is not None and self.world_size > 1:
            self._empty_pass(backward=True)

    def _empty_pass(self, backward: bool) -> None:
        """A forward (and backward) of one token with zero loss: joins the other ranks' collectives, adds nothing."""
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        logits = self._forward(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        if backward:
            self._backward(logits.float().sum() * 0.0)

    def _anyone_has_work(self, mine: bool) -> bool:
        flag = torch.tensor([1.0 if mine else 0.0], dtype=torch.float64)
        self._all_reduce(flag, max_=True)
        return bool(flag.item() > 0)

    def _all_reduce(self, t: Tensor, max_: bool = False) -> None:
        """In-place all-reduce over the actor's ranks (on the device for NCCL)."""
        import torch.distributed as dist

        group = self.dist_group()
        op = dist.ReduceOp.MAX if max_ else dist.ReduceOp.SUM
        if self.device.type == "cuda":
            on_device = t.to(self.device)
            dist.all_reduce(on_device, op=op, group=group)
            t.copy_(on_device.cpu())
        else:
            dist.all_reduce(t, op=op, group=group)

    def apply_gradients(self, sums: dict[str, float]) -> tuple[dict[str, float], float]:
        """Sums gradients, token counts and loss sums over ranks, divides by the tokens, steps the optimizer.

        Returns:
            (global-batch sums: ``tokens``, ``loss_sum``, ..., gradient norm before clipping).
        """
        count = torch.tensor([sums.get(k, 0.0) for k in _SUM_KEYS], dtype=torch.float64)
        if self.world_size > 1:
            self._all_reduce(count)
        totals = dict(zip(_SUM_KEYS, count.tolist(), strict=True))
        tokens = totals["tokens"]
        self.in_step = False
        if self.ds is not None:
            if tokens == 0:
                self.ds.discard()
                return totals, 0.0
            norm = self.ds.step(tokens)
            self.version += 1
            return totals, norm
        params = self.params
        if self.world_size > 1:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            self._all_reduce(flat)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p).clone()
                offset += n
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

    # ---- weights ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _gathered(self) -> Iterator[None]:
        if self.ds is None:
            yield
            return
        with self.ds.gathered(list(self.model.parameters())):
            yield

    def _export(self) -> dict[str, Tensor]:
        """Full policy weights as CPU copies under the base model's names (LoRA merged in)."""
        return merged_state(self.model) if self.lora else export_state(self.model)

    def push_weights(self, to: WorkerGroup[RolloutWorker]) -> dict[str, float]:
        """Sends the full (LoRA-merged, ZeRO-3-gathered) weights to every rank of ``to`` from rank 0,
        tagged with the version. Call it on every rank: gathering ZeRO-3 shards is collective."""
        return self._hand_over(lambda state: send_state(to, RolloutWorker.load_weights, state, self.version))

    def publish_weights(self, to: WorkerGroup[RolloutWorker]) -> dict[str, float]:
        """Puts the full weights, tagged with the version, into each rank of ``to``'s weights channel
        and returns at once; the rollout loads them when its next batch of prompts asks for that
        version (``RolloutWorker.generate(pull_weights=True)``). Call it on every rank, as
        :meth:`push_weights`."""
        return self._hand_over(lambda state: publish_state(to, state, self.version))

    def _hand_over(self, deliver: Callable[[dict[str, Tensor]], None]) -> dict[str, float]:
        """Exports the full weights (collectively, for ZeRO-3) and has rank 0 ``deliver`` them."""
        self._setup()
        start = time.perf_counter()
        with self.device_lock(), self._gathered():
            state = self._export() if self.rank == 0 else {}
        if self.rank != 0:
            return {}
        deliver(state)
        return {"time/weight_sync": time.perf_counter() - start}

    def state_dict(self) -> dict[str, Tensor]:
        """Detached CPU copies of the full policy weights (with ZeRO-3, call it on every rank)."""
        self._setup()
        with self.device_lock(), self._gathered():
            return self._export()

    def trainable_state(self) -> dict[str, Tensor]:
        """CPU copies of the parameters the optimizer updates (the adapters only, with LoRA)."""
        self._setup()
        with self.device_lock(), self._gathered():
            return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}

    def model_state(self) -> dict[str, Tensor]:
        """CPU copies of the model's own state dict (with LoRA: PEFT names, base weights and adapters apart)."""
        self._setup()
        with self.device_lock(), self._gathered():
            return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def parameter_counts(self) -> dict[str, int]:
        """``trainable``, ``total`` and ``in_optimizer`` parameter counts (tied weights counted once)."""
        unique = {id(p): p for p in self.model.parameters()}.values()
        in_opt = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        return {
            "trainable": sum(p.numel() for p in unique if p.requires_grad),
            "total": sum(p.numel() for p in unique),
            "in_optimizer": sum(p.numel() for p in unique if id(p) in in_opt),
        }

    def get_version(self) -> int:
        return self.version

    def memory_state(self) -> dict[str, int]:
        """What the actor holds now: tensors with gradients, optimizer-state tensors and their devices."""
        grads = [p.grad for p in self.params if p.grad is not None]
        states = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
        return {
            "grad_tensors": len(grads),
            "grad_bytes": sum(g.numel() * g.element_size() for g in grads),
            "optimizer_tensors": len(states),
            "on_cuda": sum(1 for p in self.params if p.device.type == "cuda"),
        }

    # ---- context switching -----------------------------------------------------------------------

    def offload(self) -> None:
        """Frees device memory for another component (what moves: see the module docstring)."""
        if self.cfg.backend == "deepspeed":
            if self.ds is not None and self.device.type == "cuda":
                self.ds.engine.offload_states()
                torch.cuda.empty_cache()
        elif self.device.type == "cuda":
            self._move(torch.device("cpu"))
            torch.cuda.empty_cache()
        elif not self.in_step:
            for p in self.params:
                p.grad = None

    def onload(self) -> None:
        """Brings back what :meth:`offload` moved (dropped CPU gradients are re-created by the next backward)."""
        if self.device.type != "cuda":
            return
        if self.cfg.backend == "deepspeed":
            if self.ds is not None:
                self.ds.engine.reload_states()
        else:
            self._move(self.device)

    def _move(self, device: torch.device) -> None:
        move_training_state(self.model, self.optimizer, device)

    # ---- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, directory: str) -> str:
        """Writes training state to ``directory`` (call on every rank).

        Rank 0 writes ``actor.pt`` (weights, or only the adapters with LoRA; AdamW state; version;
        RNG) and ``model/``, a Hugging Face model directory of the full weights (LoRA merged) with
        the tokenizer, which ``model.path`` accepts; with LoRA also ``adapter/`` (PEFT format).
        Every rank writes its RNG state to ``rng-<rank>.pt``; with DeepSpeed the engine writes its
        sharded state to ``deepspeed/``.
        """
        self._setup()
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, path / f"rng-{self.rank}.pt")
        if self.ds is not None:
            self.ds.save(path / "deepspeed")
        with self.device_lock(), self._gathered():
            full = self._export() if self.rank == 0 else {}
        if self.rank != 0:
            return str(path)
        state: dict[str, Any] = {
            "version": self.version,
            "backend": self.cfg.backend,
            "lora_rank": self.cfg.lora_rank,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
        if self.ds is None:
            own = self.model.state_dict()
            state["model"] = {k: v for k, v in own.items() if ".lora_" in k} if self.lora else own
            state["optimizer"] = self.optimizer.state_dict()
        torch.save(state, path / "actor.pt")
        base = self.model.get_base_model() if self.lora else self.model
        base.save_pretrained(str(path / "model"), state_dict=full)
        self.tokenizer.save_pretrained(str(path / "model"))
        if self.lora:
            self.model.save_pretrained(str(path / "adapter"))
        return str(path)

    def load_checkpoint(self, directory: str) -> int:
        """Restores what :meth:`save_checkpoint` wrote (call on every rank); returns the restored version."""
        self._setup()
        path = Path(directory)
        file = path / "actor.pt"
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist; pass a directory written by save_checkpoint.")
        state = torch.load(file, map_location="cpu", weights_only=False)
        saved = (state.get("backend", "torch"), state.get("lora_rank", 0))
        if saved != (self.cfg.backend, self.cfg.lora_rank):
            raise ConfigError(
                f"{path} was written with actor.backend={saved[0]}, actor.lora_rank={saved[1]} but this actor "
                f"has backend={self.cfg.backend}, lora_rank={self.cfg.lora_rank}; resume with the same settings, "
                f"or start a new run from its weights with model.path={path / 'model'}."
            )
        if self.ds is not None:
            self.ds.load(path / "deepspeed")
        else:
            missing, unexpected = self.model.load_state_dict(state["model"], strict=not self.lora)
            if unexpected or any(".lora_" in k for k in missing):
                raise ValueError(
                    f"{file} does not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}."
                )
            self.optimizer.load_state_dict(state["optimizer"])  # moves the state to the parameters' device
        self.version = int(state["version"])
        rng_file = path / f"rng-{self.rank}.pt"
        rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else state
        torch.set_rng_state(rng["torch_rng"])
        random.setstate(rng["python_rng"])
        self.in_step = False
        return self.version
