"""GRPO on a verifiable math task: sample a group per prompt, score it, train on group-normalised rewards.

How this differs from the GRPO paper (Shao et al., 2024, DeepSeekMath):

- One optimizer step per global batch (``run.train_batch`` prompts), fully on-policy: the ratio is
  1 at the start of each step, so clipping only matters across micro-batches of one step; the
  paper takes several steps per batch.
- The loss is the token-mean over the whole global batch (every valid token weighs the same),
  not the paper's per-sequence mean then batch mean (``1/G sum 1/|o_i|``).
- The KL penalty to a reference model is off by default (``actor.kl_coef=0``); with it on, the k3
  estimator is added to the loss as in the paper, from an ``InferenceWorker``.
- Rewards come from a rule-based verifier (exact integer answer, small format reward), not a
  learned reward model, and advantages use the population std of each group.
- Rollout, reward and training overlap: groups stream through channels in micro-batches. With
  ``run.rollout_ahead=1`` the next batch is also generated while this one trains, by weights one
  step older (one-step off-policy; the clipped ratio against the rollout's log-probs corrects it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
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
from rlinf.workers.reward import Verifier, math_verifier
from rlinf.workers.rollout import Prompt
from rlinf.workflows._shared import Generations, evaluate, launch_workers, prompt_batches, resume, save_checkpoint


@dataclass(frozen=True)
class GRPOConfig:
    """Every section of a GRPO run (YAML and ``key=value`` override these defaults)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: MathTaskConfig = field(default_factory=lambda: MathTaskConfig(prompt_style="plain", few_shot=0))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    run: RunConfig = field(default_factory=RunConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    def __post_init__(self) -> None:
        if self.rollout.group_size < 2:
            raise ConfigError(
                f"rollout.group_size={self.rollout.group_size}: GRPO normalises rewards within a group, "
                f"so it needs at least 2 samples per prompt; try rollout.group_size=4."
            )

    @property
    def components(self) -> tuple[str, ...]:
        extra = ("inference",) if self.actor.kl_coef > 0 else ()
        return ("rollout", "reward", "actor", *extra)


def main(
    cfg: GRPOConfig,
    run_dir: str | Path,
    cluster: Cluster | None = None,
    show_progress: bool = True,
    verifier: Verifier | None = None,
) -> dict[str, float]:
    """Runs GRPO; writes config.yaml, metrics.jsonl, checkpoints, the trace and its report into ``run_dir``.

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
                train = w.actor.call(ActorWorker.train, scored, n)  # streams from the generation in flight
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
