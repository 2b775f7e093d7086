"""REINFORCE++ on a verifiable math task: no critic, token-level KL in the reward, batch-whitened advantages.

How this differs from REINFORCE++ (Hu, 2025, "REINFORCE++: A Simple and Efficient Approach for
Aligning Large Language Models"):

- Advantages are the paper's: per-token returns-to-go (``gamma=1``) of the sequence reward on the
  last token minus ``actor.kl_coef`` times the k1 KL to the reference on every token, whitened over
  every valid token of the batch (``shaped_token_rewards``, ``reinforce_pp_advantage``).
- The batch that is whitened is each actor rank's share of the global batch, taken as one
  micro-batch (``actor.micro_batch_groups`` is ignored): with one actor rank, as in the examples,
  that is the paper's global batch. The price is that training waits for the whole batch instead
  of overlapping generation, and that the whole share goes through one forward pass.
- The KL is the rollout policy's against the reference, computed once when the batch arrives; it
  shapes the reward only and adds nothing to the loss. It is off by default (``actor.kl_coef=0``);
  with it on, an ``InferenceWorker`` supplies the reference log-probs.
- One optimizer step per global batch, fully on-policy, with the PPO clipped loss as the
  token-mean over the batch; the paper takes several clipped steps per batch.
- Several samples per prompt (``rollout.group_size``) are kept for comparability with GRPO and
  RLOO, but no group baseline is used; ``group_size=1`` is allowed.
- Rewards come from a rule-based verifier (exact integer answer, small format reward), not a
  learned reward model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from rlinf.algorithms import reinforce_pp_advantage, shaped_token_rewards, token_kl
from rlinf.channel import Channel
from rlinf.cluster import Cluster
from rlinf.config import dump_yaml
from rlinf.envs.math_task import MathTaskConfig, format_prompt, make_splits
from rlinf.errors import ConfigError
from rlinf.metrics import MetricsWriter, merge_rank_metrics
from rlinf.placement import Placement, PlacementConfig
from rlinf.timeline import write_run_report
from rlinf.workers.actor import ActorWorker, scored_rewards
from rlinf.workers.config import (
    ActorConfig,
    InferenceConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
)
from rlinf.workers.inference import PackedBatch
from rlinf.workers.reward import Verifier, math_verifier
from rlinf.workers.rollout import Group, Prompt
from rlinf.workflows._shared import Generations, evaluate, launch_workers, prompt_batches, resume, save_checkpoint


@dataclass(frozen=True)
class ReinforcePPConfig:
    """Every section of a REINFORCE++ run (YAML and ``key=value`` override these defaults)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: MathTaskConfig = field(default_factory=lambda: MathTaskConfig(prompt_style="plain", few_shot=0))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="reinforce_pp"))
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    def __post_init__(self) -> None:
        if self.rollout.group_size < 1:
            raise ConfigError(
                f"rollout.group_size={self.rollout.group_size}: every prompt needs at least one sample; "
                f"try rollout.group_size=4."
            )

    @property
    def components(self) -> tuple[str, ...]:
        extra = ("inference",) if self.actor.kl_coef > 0 else ()
        return ("rollout", "reward", "actor", *extra)


def reinforce_pp_advantages(groups: list[Group], batch: PackedBatch, kl_coef: float) -> tuple[Tensor, Tensor]:
    """``[B, R]`` REINFORCE++ advantages of packed ``groups`` and the ``[B, R]`` k1 KL that shaped them.

    Args:
        groups: the scored groups ``batch`` was packed from (rewards set).
        batch: ``pack_groups(groups)``; with ``kl_coef > 0`` it must carry reference log-probs.
        kl_coef: weight of the per-token KL penalty in the reward, at least 0.
    """
    seq_rewards = torch.cat([scored_rewards(g) for g in groups])
    mask = batch.response_mask
    kl = torch.zeros(mask.shape)
    if kl_coef > 0:
        if batch.ref_logprobs is None:
            raise ValueError(
                f"actor.kl_coef={kl_coef} needs reference log-probs, but the groups carry none; "
                f"route them through InferenceWorker.infer, or set actor.kl_coef=0."
            )
        kl = token_kl(batch.old_logprobs, batch.ref_logprobs, estimator="k1", mask=mask)
    token_rewards = shaped_token_rewards(seq_rewards, mask, kl=kl, kl_coef=kl_coef)
    return reinforce_pp_advantage(token_rewards, mask), kl


def token_advantages(groups: list[Group], batch: PackedBatch, kl_coef: float) -> Tensor:
    """The actor's advantage hook: REINFORCE++ advantages (the KL penalty is inside the reward)."""
    return reinforce_pp_advantages(groups, batch, kl_coef)[0]


def main(
    cfg: ReinforcePPConfig,
    run_dir: str | Path,
    cluster: Cluster | None = None,
    show_progress: bool = True,
    verifier: Verifier | None = None,
) -> dict[str, float]:
    """Runs REINFORCE++; writes config.yaml, metrics.jsonl, checkpoints, the trace and its report into ``run_dir``.

    Args:
        cfg: the run's config.
        run_dir: where the run writes.
        cluster: an existing cluster (default: start an embedded one for this run).
        show_progress: draw a progress bar.
        verifier: reward rule (default: the math task's answer checker).

    Returns:
        ``eval/accuracy_before``, ``eval/accuracy_after`` and the last step's metrics.
    """
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / "config.yaml")
    own = cluster is None
    cluster = cluster or Cluster(cpu_cores_per_slot=cfg.run.cpu_cores_per_slot)
    try:
        model_dir = cfg.model.resolve()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))  # prompt text only; tensors stay in workers
        splits = make_splits(cfg.task)
        place = Placement.from_config(cfg.placement, len(cluster.devices), cfg.components)
        verify = verifier or math_verifier(cfg.task)
        w = launch_workers(
            cluster, place, cfg.model, cfg.rollout, cfg.actor, model_dir, verify, cfg.reward, cfg.inference
        )
        tag = run_dir.name
        prompts, samples, scored = Channel(f"{tag}/prompts", 0), Channel(f"{tag}/samples"), Channel(f"{tag}/scored")
        eval_problems = splits.eval[: cfg.run.eval_prompts]
        held_out = [Prompt(format_prompt(p, cfg.task, tokenizer), p, i) for i, p in enumerate(eval_problems)]
        checkpoints = run_dir / "checkpoints"
        resumed = resume(w, cfg.run.resume_from, run_dir)  # step 0 unless run.resume_from is set
        version = w.actor.call(ActorWorker.get_version).wait()[0]

        with MetricsWriter(run_dir, cfg.run.steps, show_progress) as log:
            log.write(f"{log.note}\n{place}" if log.note else str(place))
            before = evaluate(w, tag, held_out)
            log.write(f"held-out accuracy before training: {before:.3f} ({len(held_out)} problems)")
            log.log(resumed.step, {"eval/accuracy": before}, advance=False)  # the curve starts here
            last: dict[str, float] = {}
            batches = prompt_batches(splits.train, cfg.task, cfg.run, tokenizer, resumed)
            # rollout and reward run up to run.rollout_ahead batches ahead of the actor
            generations = Generations(w, prompts, samples, scored, batches, cfg.run.rollout_ahead, version)
            for step, (n, handles) in enumerate(generations, start=resumed.step + 1):
                start = time.perf_counter()
                train = w.actor.call(
                    ActorWorker.train,
                    scored,
                    n,
                    micro_batch_groups=n,  # whiten over the rank's whole share
                    advantage=partial(token_advantages, kl_coef=cfg.actor.kl_coef),
                    kl_in_loss=False,
                )
                last = merge_rank_metrics([m for h in [*handles, train] for m in h.wait()])
                last |= merge_rank_metrics(w.actor.call(ActorWorker.publish_weights, w.rollout).wait())
                last["time/step"] = time.perf_counter() - start
                if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.run.steps:
                    last["eval/accuracy"] = evaluate(w, tag, held_out, version=version + step - resumed.step)
                if cfg.run.save_every and step % cfg.run.save_every == 0:
                    save_checkpoint(w, checkpoints / f"step-{step}", resumed.advanced(step, cfg.run.train_batch))
                log.log(step, last)
            after = evaluate(w, tag, held_out, version=version + cfg.run.steps - resumed.step)
            log.log(cfg.run.steps, {"eval/accuracy": after}, advance=False)
            log.write(f"held-out accuracy after training:  {after:.3f}")
            save_checkpoint(w, checkpoints / "final", resumed.advanced(cfg.run.steps, cfg.run.train_batch))
            tracks = cluster.collect_tracks()
            cluster.write_trace(run_dir / "trace.json", tracks)
            log.write(write_run_report(tracks, run_dir))
        return {**last, "eval/accuracy_before": before, "eval/accuracy_after": after}
    finally:
        if own:
            cluster.shutdown()
