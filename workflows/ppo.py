"""PPO on a verifiable math task: a critic values every response token, the actor trains on whitened GAE advantages.

How this differs from PPO for language models as in InstructGPT (Ouyang et al., 2022, after
Ziegler et al., 2019 and Stiennon et al., 2020):

- One actor optimizer step per global batch (``run.train_batch`` prompts), fully on-policy, with
  the clipped loss as the token-mean over the batch; the paper takes several epochs of
  mini-batches per batch, which is where the clip does its work.
- Advantages are GAE over response tokens (``critic.gamma``, ``critic.lam``), whitened over every
  valid token of each actor rank's share of the batch, taken as one micro-batch (the actor's
  micro-batch sizes are ignored): with one actor rank, the global batch. So the actor trains once
  the whole batch has been valued, as REINFORCE++ here does.
- The critic starts from the policy's own backbone with a fresh, small linear head (InstructGPT
  starts it from the reward model). One forward pass per micro-batch, as groups stream in, gives
  both the values the actor's advantages use and the critic's clipped value loss; its optimizer
  step runs beside the actor's pass where the placement lets it (``critic.epochs`` steps per
  batch; the paper trains the value function on the same mini-batch epochs as the policy).
- Rewards come from a rule-based verifier (exact integer answer, small format reward), not a
  learned reward model. The KL penalty to the reference (k1 of the sampling policy, weight
  ``actor.kl_coef``) is in the per-token reward as in the paper, but off by default; with it on,
  an ``InferenceWorker`` supplies reference log-probs. There is no pretraining-mix (PPO-ptx) term.
- Several samples per prompt (``rollout.group_size``) are kept for comparability with GRPO, but no
  group baseline is used; ``group_size=1`` is allowed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from rlinf.channel import Channel
from rlinf.cluster import Cluster
from rlinf.config import dump_yaml
from rlinf.envs.math_task import MathTaskConfig, format_prompt, make_splits
from rlinf.errors import ConfigError
from rlinf.metrics import MetricsWriter, merge_rank_metrics
from rlinf.placement import Placement, PlacementConfig
from rlinf.timeline import write_run_report
from rlinf.workers.actor import ActorWorker
from rlinf.workers.config import (
    ActorConfig,
    InferenceConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
)
from rlinf.workers.critic import CriticConfig, CriticWorker, gae_advantages
from rlinf.workers.inference import InferenceWorker
from rlinf.workers.reward import RewardWorker, Verifier, math_verifier
from rlinf.workers.rollout import Prompt, RolloutWorker
from rlinf.workflows._shared import evaluate, launch_workers, prompt_batches


@dataclass(frozen=True)
class PPOConfig:
    """Every section of a PPO run (YAML and ``key=value`` override these defaults)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: MathTaskConfig = field(default_factory=lambda: MathTaskConfig(prompt_style="plain", few_shot=0))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="ppo"))
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    def __post_init__(self) -> None:
        if self.run.rollout_ahead:
            raise ConfigError(
                f"run.rollout_ahead={self.run.rollout_ahead}: PPO's critic values each batch with the weights "
                f"it trains, so generation does not run ahead here; set run.rollout_ahead=0 (grpo, rloo and "
                f"reinforce_pp support 1)."
            )
        if self.rollout.group_size < 1:
            raise ConfigError(
                f"rollout.group_size={self.rollout.group_size}: every prompt needs at least one sample; "
                f"try rollout.group_size=4."
            )

    @property
    def components(self) -> tuple[str, ...]:
        extra = ("inference",) if self.actor.kl_coef > 0 else ()
        return ("rollout", "reward", "critic", "actor", *extra)


def main(
    cfg: PPOConfig,
    run_dir: str | Path,
    cluster: Cluster | None = None,
    show_progress: bool = True,
    verifier: Verifier | None = None,
) -> dict[str, float]:
    """Runs PPO; writes config.yaml, metrics.jsonl, checkpoints (actor and critic), the trace and its report.

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
        pending_critic = CriticWorker.start(cluster, place, name="critic")  # its process starts beside the others
        w = launch_workers(
            cluster, place, cfg.model, cfg.rollout, cfg.actor, model_dir, verify, cfg.reward, cfg.inference
        )
        critic = pending_critic.launch(cfg.critic, model_dir, cfg.model.dtype)
        tag = run_dir.name
        prompts, samples, valued = Channel(f"{tag}/prompts", 0), Channel(f"{tag}/samples"), Channel(f"{tag}/valued")
        to_critic = Channel(f"{tag}/to-critic")
        reward_out = Channel(f"{tag}/to-inference") if w.inference else to_critic
        kl_coef, gamma, lam = cfg.actor.kl_coef, cfg.critic.gamma, cfg.critic.lam
        advantage = partial(gae_advantages, kl_coef=kl_coef, gamma=gamma, lam=lam)
        eval_problems = splits.eval[: cfg.run.eval_prompts]
        held_out = [Prompt(format_prompt(p, cfg.task, tokenizer), p, i) for i, p in enumerate(eval_problems)]
        checkpoints = run_dir / "checkpoints"

        def save(directory: Path) -> None:
            w.actor.on(0).call(ActorWorker.save_checkpoint, str(directory)).wait()
            critic.on(0).call(CriticWorker.save_checkpoint, str(directory)).wait()

        with MetricsWriter(run_dir, cfg.run.steps, show_progress) as log:
            log.write(f"{log.note}\n{place}" if log.note else str(place))
            before = evaluate(w, tag, held_out)
            log.write(f"held-out accuracy before training: {before:.3f} ({len(held_out)} problems)")
            log.log(0, {"eval/accuracy": before}, advance=False)  # the curve starts here
            last: dict[str, float] = {}
            for step, batch in enumerate(prompt_batches(splits.train, cfg.task, cfg.run, tokenizer), start=1):
                start, n = time.perf_counter(), len(batch)
                sync = w.actor.call(ActorWorker.push_weights, w.rollout).wait()
                prompts.put_many(batch)
                handles = [  # launched together; the critic values and trains as groups stream in
                    w.rollout.call(RolloutWorker.generate, prompts, samples, n),
                    w.reward.call(RewardWorker.score, samples, reward_out, n),
                    critic.call(CriticWorker.train, to_critic, valued, n, kl_coef),
                    w.actor.call(  # one micro-batch per rank: advantages are whitened over its share
                        ActorWorker.train, valued, n, micro_batch_groups=n, advantage=advantage, kl_in_loss=False
                    ),
                ]
                if w.inference:
                    handles.append(w.inference.call(InferenceWorker.infer, reward_out, to_critic, n))
                last = merge_rank_metrics([m for h in handles for m in h.wait()] + sync)
                last["time/step"] = time.perf_counter() - start
                if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.run.steps:
                    last["eval/accuracy"] = evaluate(w, tag, held_out)
                if cfg.run.save_every and step % cfg.run.save_every == 0:
                    save(checkpoints / f"step-{step}")
                log.log(step, last)
            w.actor.call(ActorWorker.push_weights, w.rollout).wait()
            after = evaluate(w, tag, held_out)
            log.log(cfg.run.steps, {"eval/accuracy": after}, advance=False)
            log.write(f"held-out accuracy after training:  {after:.3f}")
            save(checkpoints / "final")
            tracks = cluster.collect_tracks()
            cluster.write_trace(run_dir / "trace.json", tracks)
            log.write(write_run_report(tracks, run_dir))
        return {**last, "eval/accuracy_before": before, "eval/accuracy_after": after}
    finally:
        if own:
            cluster.shutdown()
