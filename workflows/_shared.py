"""Plumbing the LLM workflows share: prompt batches, launching the workers, held-out evaluation.

The algorithm loops themselves stay one per file (grpo.py, rloo.py, reinforce_pp.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlinf.channel import Channel
from rlinf.cluster import Cluster
from rlinf.envs.math_task import MathProblem, MathTaskConfig, format_prompt
from rlinf.group import WorkerGroup
from rlinf.metrics import merge_rank_metrics
from rlinf.placement import Placement
from rlinf.workers.actor import ActorWorker
from rlinf.workers.config import ActorConfig, ModelConfig, RolloutConfig, RunConfig
from rlinf.workers.inference import InferenceWorker
from rlinf.workers.reward import RewardWorker, Verifier
from rlinf.workers.rollout import Prompt, RolloutWorker


def prompt_batches(
    problems: Sequence[MathProblem], task: MathTaskConfig, run: RunConfig, tokenizer: Any
) -> Iterator[list[Prompt]]:
    """``run.steps`` batches of ``run.train_batch`` prompts, cycling through shuffled train problems."""
    order = list(range(len(problems)))
    random.Random(run.seed).shuffle(order)
    cursor = 0
    for _ in range(run.steps):
        batch = []
        for _ in range(run.train_batch):
            p = problems[order[cursor % len(order)]]
            batch.append(Prompt(format_prompt(p, task, tokenizer), p, cursor))
            cursor += 1
        yield batch


@dataclass(frozen=True)
class Workers:
    """The launched components; ``inference`` only when the KL penalty is on."""

    rollout: WorkerGroup[RolloutWorker]
    reward: WorkerGroup[RewardWorker]
    actor: WorkerGroup[ActorWorker]
    inference: WorkerGroup[InferenceWorker] | None


def launch_workers(
    cluster: Cluster,
    place: Placement,
    model: ModelConfig,
    rollout: RolloutConfig,
    actor: ActorConfig,
    model_dir: Path,
    verifier: Verifier,
) -> Workers:
    dtype, temperature = model.dtype, rollout.temperature
    return Workers(
        rollout=RolloutWorker.launch(cluster, place, rollout, model_dir, dtype, name="rollout"),
        reward=RewardWorker.launch(cluster, place, verifier, name="reward"),
        actor=ActorWorker.launch(cluster, place, actor, model_dir, temperature, dtype, name="actor"),
        inference=InferenceWorker.launch(cluster, place, model_dir, temperature, dtype, name="inference")
        if actor.kl_coef > 0
        else None,
    )


def evaluate(w: Workers, prompts: Channel, samples: Channel, eval_prompts: list[Prompt]) -> float:
    """Held-out accuracy of the rollout's current weights (one response per prompt at eval_temperature)."""
    if not eval_prompts:
        return float("nan")
    prompts.put_many(eval_prompts)
    gen = w.rollout.call(RolloutWorker.generate, prompts, samples, len(eval_prompts), greedy=True)
    scores = w.reward.call(RewardWorker.score, samples, None, len(eval_prompts)).wait()
    gen.wait()
    return merge_rank_metrics(scores)["reward/accuracy"]
