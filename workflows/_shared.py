"""Plumbing the LLM workflows share: prompt batches, launching the workers, held-out evaluation.

The algorithm loops themselves stay one per file (grpo.py, rloo.py, reinforce_pp.py, ppo.py).
"""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlinf.channel import Channel
from rlinf.cluster import Cluster
from rlinf.envs.math_task import MathProblem, MathTaskConfig, format_prompt
from rlinf.errors import ConfigError
from rlinf.group import Handle, PendingGroup, WorkerGroup
from rlinf.metrics import merge_rank_metrics
from rlinf.placement import Placement
from rlinf.workers.actor import ActorWorker
from rlinf.workers.config import ActorConfig, InferenceConfig, ModelConfig, RewardConfig, RolloutConfig, RunConfig
from rlinf.workers.inference import InferenceWorker
from rlinf.workers.reward import RewardWorker, Verifier
from rlinf.workers.rollout import Prompt, RolloutWorker


@dataclass(frozen=True)
class Progress:
    """Where training stands: optimizer steps done and prompts taken from the train stream (the data cursor)."""

    step: int = 0
    cursor: int = 0

    def advanced(self, step: int, train_batch: int) -> Progress:
        """The progress after training on to ``step`` with ``train_batch`` prompts per step."""
        return Progress(step, self.cursor + (step - self.step) * train_batch)


def prompt_batches(
    problems: Sequence[MathProblem],
    task: MathTaskConfig,
    run: RunConfig,
    tokenizer: Any,
    start: Progress = Progress(),
) -> Iterator[list[Prompt]]:
    """Batches of ``run.train_batch`` prompts for steps ``start.step + 1 .. run.steps``, cycling through
    shuffled train problems from prompt ``start.cursor`` on (``Prompt.index`` is the cursor)."""
    order = list(range(len(problems)))
    random.Random(run.seed).shuffle(order)
    cursor = start.cursor
    for _ in range(run.steps - start.step):
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
    reward: RewardConfig | None = None,
    inference: InferenceConfig | None = None,
) -> Workers:
    dtype, temperature = model.dtype, rollout.temperature
    # Every group's processes start side by side. The rollout engine is built first and alone: vLLM
    # sizes its KV cache from the device memory it finds free, which a model loading beside it on the
    # same GPU would change under it; the other groups are then built side by side.
    pending: dict[str, PendingGroup[Any]] = {
        "rollout": RolloutWorker.start(cluster, place, name="rollout"),
        "reward": RewardWorker.start(cluster, place, name="reward"),
        "actor": ActorWorker.start(cluster, place, name="actor"),
    }
    if actor.kl_coef > 0:
        pending["inference"] = InferenceWorker.start(cluster, place, name="inference")
    groups: dict[str, WorkerGroup[Any]] = {"rollout": pending["rollout"].launch(rollout, model_dir, dtype)}
    pending["reward"].construct(verifier, reward)
    pending["actor"].construct(actor, model_dir, temperature, dtype)
    if "inference" in pending:
        pending["inference"].construct(model_dir, temperature, dtype, inference)
    groups.update({name: p.wait() for name, p in pending.items() if name != "rollout"})
    return Workers(
        rollout=groups["rollout"], reward=groups["reward"], actor=groups["actor"], inference=groups.get("inference")
    )


def evaluate(w: Workers, tag: str, eval_prompts: list[Prompt], version: int | None = None) -> float:
    """Held-out accuracy (one response per prompt at eval_temperature) through the run's own eval
    channels, so it may run beside generation that is already in flight.

    Args:
        w: the launched workers.
        tag: the run's channel prefix.
        eval_prompts: the held-out prompts.
        version: answer with the actor's weights of at least this version, pulled from what it
            published (``ActorWorker.publish_weights``); None uses the rollout's current weights.
    """
    if not eval_prompts:
        return float("nan")
    prompts, samples = Channel(f"{tag}/eval-prompts", 0), Channel(f"{tag}/eval-samples")
    prompts.put_many(eval_prompts, version=version or 0)
    pull = version is not None
    gen = w.rollout.call(RolloutWorker.generate, prompts, samples, len(eval_prompts), greedy=True, pull_weights=pull)
    scores = w.reward.call(RewardWorker.score, samples, None, len(eval_prompts)).wait()
    gen.wait()
    return merge_rank_metrics(scores)["reward/accuracy"]


class Generations:
    """Launches generation batch by batch: the prompts, the rollout, the reward and (with a KL term)
    the reference log-probs, keeping up to ``ahead`` batches in flight beyond the one being trained.

    Batch ``i`` (from 0) trains at actor version ``version + i``; its prompts carry the oldest
    version allowed to answer them, ``version + i - ahead``, and the rollout pulls the weights the
    actor publishes after each step (``ActorWorker.publish_weights``) until it has that version.
    With ``ahead=0`` every batch is generated by the weights its step starts with (on-policy); with
    ``ahead=1`` the next batch is generated while this one trains.

    Args:
        w: the launched workers.
        prompts, samples, scored: the run's channels (``scored`` receives groups with rewards, and
            reference log-probs when ``w.inference`` is set).
        batches: the prompt batches, one per step.
        ahead: ``run.rollout_ahead``.
        version: the actor's version before the first of ``batches`` trains.
    """

    def __init__(
        self,
        w: Workers,
        prompts: Channel,
        samples: Channel,
        scored: Channel,
        batches: Iterator[list[Prompt]],
        ahead: int,
        version: int,
    ) -> None:
        self.w, self.prompts, self.samples, self.scored = w, prompts, samples, scored
        self.reward_out = Channel(f"{scored.name}/to-inference") if w.inference else scored
        self.batches, self.ahead, self.version = batches, ahead, version
        self.launched = 0
        self.in_flight: deque[tuple[int, list[Handle]]] = deque()

    def __iter__(self) -> Iterator[tuple[int, list[Handle]]]:
        """Per step: tops up the batches in flight to ``ahead + 1`` and yields the oldest one's size and
        its handles; ends when every batch has been handed out."""
        while (launched := self._top_up()) is not None:
            yield launched

    def _top_up(self) -> tuple[int, list[Handle]] | None:
        w = self.w
        while len(self.in_flight) <= self.ahead:
            batch = next(self.batches, None)
            if batch is None:
                break
            n = len(batch)
            self.prompts.put_many(batch, version=self.version + max(self.launched - self.ahead, 0))
            self.launched += 1
            handles = [
                w.rollout.call(RolloutWorker.generate, self.prompts, self.samples, n, pull_weights=True),
                w.reward.call(RewardWorker.score, self.samples, self.reward_out, n),
            ]
            if w.inference:
                handles.append(w.inference.call(InferenceWorker.infer, self.reward_out, self.scored, n))
            self.in_flight.append((n, handles))
        return self.in_flight.popleft() if self.in_flight else None


PROGRESS_FILE = "progress.json"


def save_checkpoint(w: Workers, directory: Path, progress: Progress) -> None:
    """Writes the actor's state (every rank), the rollout's sampling RNG and the data cursor into ``directory``."""
    import torch

    w.actor.call(ActorWorker.save_checkpoint, str(directory)).wait()
    torch.save(w.rollout.call(RolloutWorker.rng_state).wait(), directory / "rollout-rng.pt")
    (directory / PROGRESS_FILE).write_text(json.dumps({"step": progress.step, "cursor": progress.cursor}) + "\n")


def find_checkpoint(resume_from: str | Path) -> Path:
    """The checkpoint ``run.resume_from`` names: the directory itself, or a run directory's newest one."""
    path = Path(resume_from).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"run.resume_from={str(resume_from)!r} does not exist; pass a run directory (runs/<name>-<time>) "
            f"or one of its checkpoints/<step> directories."
        )
    if (path / PROGRESS_FILE).is_file():
        return path
    found = sorted(d for d in path.glob("checkpoints/*") if (d / PROGRESS_FILE).is_file())
    if not found:
        raise ConfigError(
            f"run.resume_from={str(resume_from)!r} holds no checkpoint (no {PROGRESS_FILE} in it or in its "
            f"checkpoints/*/); a run writes one every run.save_every steps and when it ends. Pass a run that "
            f"finished or saved, or drop run.resume_from to start afresh."
        )
    return max(found, key=lambda d: (read_progress(d).step, d.name == "final"))


def read_progress(checkpoint: Path) -> Progress:
    data = json.loads((checkpoint / PROGRESS_FILE).read_text())
    return Progress(int(data["step"]), int(data["cursor"]))


def resume(w: Workers, resume_from: str, run_dir: Path) -> Progress:
    """Restores a checkpoint into freshly launched workers; returns where training continues.

    The actor gets its weights, optimizer, version and RNG back, the rollout its sampling RNG and
    the restored weights, and ``run_dir/metrics.jsonl`` the earlier run's records up to that step.
    Without ``resume_from`` nothing happens and training starts at step 1.
    """
    if not resume_from:
        return Progress()
    import torch

    checkpoint = find_checkpoint(resume_from)
    progress = read_progress(checkpoint)
    w.actor.call(ActorWorker.load_checkpoint, str(checkpoint)).wait()
    rng_file = checkpoint / "rollout-rng.pt"
    states = torch.load(rng_file, weights_only=False) if rng_file.is_file() else []
    if len(states) == w.rollout.world_size:  # a different rollout world size samples differently anyway
        for rank, state in enumerate(states):
            w.rollout.on(rank).call(RolloutWorker.set_rng_state, state).wait()
    w.actor.call(ActorWorker.push_weights, w.rollout).wait()
    _continue_metrics(checkpoint.parent.parent / "metrics.jsonl", Path(run_dir) / "metrics.jsonl", progress.step)
    return progress


def _continue_metrics(source: Path, target: Path, step: int) -> None:
    """Carries the records of steps up to ``step`` from ``source`` into ``target`` (dropping later ones)."""
    if not source.is_file():
        return
    kept = [line for line in source.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    if source.resolve() != target.resolve() and target.is_file() and target.stat().st_size > 0:
        return  # the target run already has its own records
    target.write_text("".join(f"{line}\n" for line in kept))
