"""Plumbing the embodied workflows share: the env/policy rollouts of successive training steps.

The algorithm loops themselves stay one per file (embodied_ppo.py, embodied_grpo.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlinf.channel import Channel
from rlinf.group import Handle, WorkerGroup, wait_all
from rlinf.metrics import merge_rank_metrics
from rlinf.workers.embodied import PolicyRolloutWorker
from rlinf.workers.env import EnvWorker, merge_env_metrics


class Rollouts:
    """Starts and collects rollout k (the envs and the policy ping-pong, trajectories to ``out``).

    Rollout k acts with weights of version ``k - 1 - ahead`` or newer, which the policy ranks pull
    from what the actor published (``EmbodiedActorWorker.publish_weights``). On-policy (``ahead=0``)
    the loop starts rollout k+1 once version k is published; with ``ahead=1`` it starts it as soon as
    rollout k has ended, so it collects while the actor trains on rollout k.

    Args:
        env: the env worker group.
        rollout: the policy rollout group; None when the env ranks act with their own copies of the
            policy (``rollout.inline``, ``EnvWorker.attach_policy``).
        out: the channel the trajectories go to.
        horizon: policy steps per env and rollout.
        ahead: ``run.rollout_ahead`` (0 or 1).
        steps: the last rollout the run trains on (none is started after it).
        interact_kwargs: extra ``EnvWorker.interact`` arguments for rollout k.
    """

    def __init__(
        self,
        env: WorkerGroup[EnvWorker],
        rollout: WorkerGroup[PolicyRolloutWorker] | None,
        out: Channel,
        horizon: int,
        ahead: int,
        steps: int,
        interact_kwargs: Callable[[int], dict[str, Any]] = lambda k: {},
    ) -> None:
        self.env, self.rollout, self.out, self.horizon = env, rollout, out, horizon
        self.ahead, self.steps, self.interact_kwargs = ahead, steps, interact_kwargs
        self.env_inboxes = env.call(EnvWorker.inbox).wait()
        self.policy_inboxes = rollout.call(PolicyRolloutWorker.inbox).wait() if rollout is not None else None
        self._running: tuple[int, list[Handle[dict[str, float]]]] | None = None

    @property
    def acting(self) -> WorkerGroup[PolicyRolloutWorker] | WorkerGroup[EnvWorker]:
        """The group whose ranks hold the acting policy: where the actor publishes its weights."""
        return self.rollout if self.rollout is not None else self.env

    def start(self, k: int) -> None:
        """Starts rollout ``k`` (nothing past ``steps``, nothing while another one runs)."""
        if k > self.steps or self._running is not None:
            return
        need = max(k - 1 - self.ahead, 0)
        kwargs = self.interact_kwargs(k)
        if self.rollout is None:
            handles = [self.env.call(EnvWorker.interact, None, self.out, self.horizon, need_version=need, **kwargs)]
        else:
            handles = [
                self.rollout.call(PolicyRolloutWorker.serve, self.env_inboxes, need),
                self.env.call(EnvWorker.interact, self.policy_inboxes, self.out, self.horizon, **kwargs),
            ]
        self._running = (k, handles)

    def collect(self, k: int) -> dict[str, float]:
        """Waits for rollout ``k`` to end and returns its env and policy metrics; with ``ahead=1``
        starts rollout k+1 right away."""
        if self._running is None or self._running[0] != k:
            raise RuntimeError(f"rollout {k} was not started (running: {self._running and self._running[0]}).")
        results = wait_all(self._running[1])
        env_metrics = merge_env_metrics(results[-1])
        metrics = {**merge_rank_metrics(results[0]), **env_metrics} if len(results) > 1 else env_metrics
        metrics["env/steps_per_s"] = env_metrics["env/steps"] / env_metrics["time/env_rollout"]
        self._running = None
        if self.ahead:
            self.start(k + 1)
        return metrics

    def published(self, version: int) -> None:
        """Weights of ``version`` were published: on-policy, rollout ``version + 1`` may start."""
        if not self.ahead:
            self.start(version + 1)

    def close(self) -> None:
        """Waits for a rollout still running (started ahead of a step the run did not reach)."""
        if self._running is not None:
            wait_all(self._running[1])
            self._running = None
