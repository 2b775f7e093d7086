"""Supervised fine-tuning on the math task's train split: prompt, then the gold answer in the task's format.

The loss is the token-mean negative log-likelihood of the response tokens (the gold answer line
and the end-of-sequence token) over each global batch; prompt tokens carry no loss. The run writes
checkpoints whose ``model/`` folder ``model.path=<checkpoint>`` loads, e.g. to start GRPO from it:

    rlinf run sft examples/sft_math_tiny.yaml --run-dir runs/sft
    rlinf run grpo examples/grpo_math_tiny.yaml model.path=runs/sft/checkpoints/final

How it differs from a typical SFT recipe: the targets are only the final answer line (the task has
no worked solutions), examples are drawn by cycling through the shuffled train split, one optimizer
step per ``run.train_batch`` examples, and evaluation reports held-out loss and greedy accuracy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rlinf.channel import Channel
from rlinf.cluster import Cluster
from rlinf.config import dump_yaml
from rlinf.envs.math_task import MathTaskConfig, format_prompt, make_splits, stated_answer
from rlinf.errors import ConfigError
from rlinf.metrics import MetricsWriter, merge_rank_metrics
from rlinf.placement import Placement, PlacementConfig
from rlinf.workers.actor import ActorWorker, Example
from rlinf.workers.config import ActorConfig, ModelConfig, RolloutConfig, RunConfig
from rlinf.workers.reward import math_verifier
from rlinf.workers.rollout import Prompt
from rlinf.workflows._shared import Workers, evaluate, launch_workers, prompt_batches, resume, save_checkpoint


@dataclass(frozen=True)
class SFTConfig:
    """Every section of an SFT run; the rollout only serves the greedy held-out evaluation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: MathTaskConfig = field(default_factory=lambda: MathTaskConfig(prompt_style="plain", few_shot=0))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="sft"))
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    def __post_init__(self) -> None:
        if self.run.rollout_ahead:
            raise ConfigError(
                f"run.rollout_ahead={self.run.rollout_ahead}: SFT trains on gold answers and generates nothing "
                f"to run ahead; set run.rollout_ahead=0."
            )

    @property
    def components(self) -> tuple[str, ...]:
        return ("rollout", "reward", "actor")


def gold(prompt: Prompt, task: MathTaskConfig) -> Example:
    """The supervised example of a prompt: its gold answer stated in the task's answer format."""
    return Example(prompt.text, stated_answer(prompt.problem.answer, task.answer_format), prompt.index)


def held_out_loss(w: Workers, channel: Channel, examples: list[Example]) -> float:
    """Token-mean negative log-likelihood of the gold responses of ``examples`` under the actor."""
    if not examples:
        return float("nan")
    channel.put_many(examples)
    ranks = w.actor.call(ActorWorker.eval_sft, channel, len(examples)).wait()
    return sum(r["eval/nll_sum"] for r in ranks) / max(sum(r["eval/tokens"] for r in ranks), 1.0)


def main(
    cfg: SFTConfig, run_dir: str | Path, cluster: Cluster | None = None, show_progress: bool = True
) -> dict[str, float]:
    """Runs SFT; writes config.yaml, metrics.jsonl, checkpoints and trace.json into ``run_dir``.

    Returns:
        ``eval/loss_before``, ``eval/loss_after``, ``eval/accuracy_before``, ``eval/accuracy_after``
        and the last step's metrics.
    """
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / "config.yaml")
    own = cluster is None
    cluster = cluster or Cluster(cpu_cores_per_slot=cfg.run.cpu_cores_per_slot)
    try:
        model_dir = cfg.model.resolve()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        splits = make_splits(cfg.task)
        place = Placement.from_config(cfg.placement, len(cluster.devices), cfg.components)
        w = launch_workers(cluster, place, cfg.model, cfg.rollout, cfg.actor, model_dir, math_verifier(cfg.task))
        tag = run_dir.name
        data = Channel(f"{tag}/examples", 0)
        held_out = [Prompt(format_prompt(p, cfg.task, tokenizer), p, i) for i, p in enumerate(splits.eval)]
        held_out = held_out[: cfg.run.eval_prompts]
        checkpoints = run_dir / "checkpoints"
        resumed = resume(w, cfg.run.resume_from, run_dir)

        with MetricsWriter(run_dir, cfg.run.steps, show_progress) as log:
            loss_before = held_out_loss(w, data, [gold(p, cfg.task) for p in held_out])
            acc_before = evaluate(w, tag, held_out)
            log.log(resumed.step, {"eval/loss": loss_before, "eval/accuracy": acc_before}, advance=False)
            log.write(f"held-out loss {loss_before:.3f}, accuracy {acc_before:.3f} before training")
            last: dict[str, float] = {}
            batches = prompt_batches(splits.train, cfg.task, cfg.run, tokenizer, resumed)
            for step, batch in enumerate(batches, start=resumed.step + 1):
                start = time.perf_counter()
                data.put_many([gold(p, cfg.task) for p in batch])
                last = merge_rank_metrics(w.actor.call(ActorWorker.train_sft, data, len(batch)).wait())
                last["time/step"] = time.perf_counter() - start
                if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.run.steps:
                    last["eval/loss"] = held_out_loss(w, data, [gold(p, cfg.task) for p in held_out])
                if cfg.run.save_every and step % cfg.run.save_every == 0:
                    save_checkpoint(w, checkpoints / f"step-{step}", resumed.advanced(step, cfg.run.train_batch))
                log.log(step, last)
            w.actor.call(ActorWorker.push_weights, w.rollout).wait()
            loss_after = held_out_loss(w, data, [gold(p, cfg.task) for p in held_out])
            acc_after = evaluate(w, tag, held_out)
            log.log(cfg.run.steps, {"eval/loss": loss_after, "eval/accuracy": acc_after}, advance=False)
            log.write(f"held-out loss {loss_after:.3f}, accuracy {acc_after:.3f} after training")
            save_checkpoint(w, checkpoints / "final", resumed.advanced(cfg.run.steps, cfg.run.train_batch))
        cluster.write_trace(run_dir / "trace.json")
        return {
            **last,
            "eval/loss_before": loss_before,
            "eval/loss_after": loss_after,
            "eval/accuracy_before": acc_before,
            "eval/accuracy_after": acc_after,
        }
    finally:
        if own:
            cluster.shutdown()
