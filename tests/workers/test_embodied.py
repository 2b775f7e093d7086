"""Embodied actor and rollout workers: one PPO update equals a plain reference loop written here (one rank, and
two DDP ranks averaging gradients), GRPO advantages match hand-computed numbers, pushed weights reach the rollout
worker with their version, checkpoints restore the weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from rlinf import Channel
from rlinf.envs import EnvConfig, make_env
from rlinf.models.policies import PolicyConfig, build_policy
from rlinf.workers.embodied import (
    EmbodiedActorConfig,
    EmbodiedActorWorker,
    EmbodiedRunConfig,
    PolicyRolloutWorker,
    gae_advantages,
    group_trajectory_advantages,
)
from rlinf.workers.env import ObsRequest, Trajectory

POLICY = PolicyConfig(kind="mlp", hidden_sizes=(16, 16))
CFG = EmbodiedActorConfig(lr=1e-3, epochs=2, minibatches=2, gamma=0.9, gae_lambda=0.8, ent_coef=0.01, seed=4)


def make_policy(obs_space: Any, act_space: Any) -> nn.Module:
    return build_policy(POLICY, obs_space, act_space)


def spaces() -> tuple[Any, Any]:
    env = make_env(EnvConfig(num_envs=1))
    return env.observation_space, env.action_space


def fresh_policy(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return make_policy(*spaces())


def synthetic_trajectory(seed: int, steps: int = 6, n: int = 4, env_rank: int = 0) -> Trajectory:
    """Random CartPole-shaped data with log-probs and values from the actor's initial policy."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(steps, n, 4, generator=g)
    actions = torch.randint(0, 2, (steps, n), generator=g)
    policy = fresh_policy(CFG.seed)
    with torch.no_grad():
        logp, _, values = policy.evaluate(obs.reshape(-1, 4), actions.reshape(-1))
    terminated = torch.rand(steps, n, generator=g) < 0.15
    truncated = (torch.rand(steps, n, generator=g) < 0.1) & ~terminated
    next_values = torch.cat([values.reshape(steps, n)[1:], torch.randn(1, n, generator=g)])
    return Trajectory(
        obs=obs,
        actions=actions,
        logprobs=logp.reshape(steps, n),
        values=values.reshape(steps, n),
        next_values=next_values,
        rewards=torch.rand(steps, n, generator=g),
        terminated=terminated,
        truncated=truncated,
        mask=torch.ones(steps, n, dtype=torch.bool),
        group_ids=torch.arange(n),
        version=0,
        env_rank=env_rank,
        stage=0,
    )


def plain_gae(tr: Trajectory, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE written out step by step: no bootstrap past a termination, no advantage across any episode end."""
    adv = torch.zeros_like(tr.rewards)
    running = torch.zeros(tr.num_envs)
    for t in reversed(range(tr.num_steps)):
        not_term = (~tr.terminated[t]).float()
        cont = (~(tr.terminated[t] | tr.truncated[t])).float()
        delta = tr.rewards[t] + gamma * tr.next_values[t] * not_term - tr.values[t]
        running = delta + gamma * lam * cont * running
        adv[t] = running
    return adv, adv + tr.values


def reference_update(per_rank: list[list[Trajectory]], cfg: EmbodiedActorConfig) -> dict[str, torch.Tensor]:
    """One ``train`` call as a plain loop: each rank's minibatch gradients are averaged, then one AdamW step."""
    policy = fresh_policy(cfg.seed)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    data = []
    for rank, trajs in enumerate(per_rank):
        targets = [plain_gae(tr, cfg.gamma, cfg.gae_lambda) for tr in trajs]
        flat = {
            "obs": torch.cat([tr.obs.reshape(-1, 4) for tr in trajs]),
            "actions": torch.cat([tr.actions.reshape(-1) for tr in trajs]),
            "logprobs": torch.cat([tr.logprobs.reshape(-1) for tr in trajs]),
            "adv": torch.cat([a.reshape(-1) for a, _ in targets]),
            "ret": torch.cat([r.reshape(-1) for _, r in targets]),
        }
        gen = torch.Generator().manual_seed(cfg.seed + rank)
        orders = [torch.randperm(len(flat["adv"]), generator=gen).chunk(cfg.minibatches) for _ in range(cfg.epochs)]
        data.append((flat, orders))
    for epoch in range(cfg.epochs):
        for mb in range(cfg.minibatches):
            grads = []
            for flat, orders in data:
                idx = orders[epoch][mb]
                logp, entropy, values = policy.evaluate(flat["obs"][idx], flat["actions"][idx])
                adv = flat["adv"][idx]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                ratio = torch.exp(logp - flat["logprobs"][idx])
                pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)).mean()
                vl = 0.5 * ((values - flat["ret"][idx]) ** 2).mean()
                loss = pg + cfg.vf_coef * vl - cfg.ent_coef * entropy.mean()
                opt.zero_grad()
                loss.backward()
                grads.append([p.grad.clone() for p in policy.parameters()])
            for p, *gs in zip(policy.parameters(), *grads, strict=True):
                p.grad = torch.stack(gs).mean(0)
            nn.utils.clip_grad_norm_(list(policy.parameters()), cfg.max_grad_norm)
            opt.step()
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


@pytest.fixture(scope="module")
def single(cluster, tmp_path_factory):
    """One actor rank on slot 0 and a rollout rank on slot 1, with the actor's initial state saved."""
    actor = EmbodiedActorWorker.launch(cluster, [0], CFG, make_policy, *spaces(), 10, name="actor-single")
    rollout = PolicyRolloutWorker.launch(cluster, [1], make_policy, *spaces(), 0, name="rollout-single")
    init = str(tmp_path_factory.mktemp("embodied-actor") / "init")
    actor.call(EmbodiedActorWorker.save_checkpoint, init).wait()
    yield actor, rollout, init
    for g in (actor, rollout):
        g.kill()
        cluster.groups.remove(g)


def test_one_ppo_update_equals_the_reference_loop(single):
    actor, _, init = single
    actor.call(EmbodiedActorWorker.load_checkpoint, init).wait()
    trajs = [synthetic_trajectory(1), synthetic_trajectory(2, env_rank=1)]
    ch = Channel("embodied-test/one-rank")
    for tr in trajs:
        ch.put(tr)
    (metrics,) = actor.call(EmbodiedActorWorker.train, ch, 2, gae_advantages).wait()
    assert metrics["actor/samples"] == 48 and metrics["actor/version"] == 1
    trained = actor.call(EmbodiedActorWorker.state_dict).wait()[0]
    expected = reference_update([trajs], CFG)
    assert max_diff(trained, expected) < 1e-5
    assert max_diff(trained, fresh_policy(CFG.seed).state_dict()) > 1e-4  # it did move


def test_two_ddp_ranks_average_their_gradients(fresh_groups):
    actor = EmbodiedActorWorker.launch(fresh_groups, [0, 1], CFG, make_policy, *spaces(), 10, name="actor-ddp")
    a, b = synthetic_trajectory(1), synthetic_trajectory(2, env_rank=1)
    ch = Channel("embodied-test/ddp")
    ch.put_many([a, b])
    actor.call(EmbodiedActorWorker.train, ch, 2, gae_advantages).wait()
    w0, w1 = actor.call(EmbodiedActorWorker.state_dict).wait()
    assert max_diff(w0, w1) == 0.0
    # Which rank took which trajectory is a race; the result must be the reference for one of the two.
    best = min(max_diff(w0, reference_update(order, CFG)) for order in ([[a], [b]], [[b], [a]]))
    assert best < 1e-5


def test_grpo_advantages_are_group_normalised_first_episode_returns():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], [1.0, 5.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 1, 0]], dtype=torch.bool)
    tr = synthetic_trajectory(0, steps=3, n=4)
    tr = Trajectory(**{**tr.__dict__, "rewards": rewards, "mask": mask, "group_ids": torch.tensor([0, 0, 1, 1])})
    (targets,) = group_trajectory_advantages([tr], CFG)
    # First-episode returns: env 0: 3, env 1: 2 (its 5 came after the episode), env 2: 4, env 3: 1.
    # Group (3, 2): mean 2.5, population std 0.5 -> (+1, -1); group (4, 1): mean 2.5, std 1.5 -> (+1, -1).
    expected = torch.tensor([1.0, -1.0, 1.0, -1.0])
    torch.testing.assert_close(targets.advantages, expected.expand(3, 4), atol=1e-5, rtol=0)
    assert targets.returns is None
    bad = Trajectory(**{**tr.__dict__, "group_ids": torch.tensor([0, 0, 0, 1])})
    with pytest.raises(ValueError, match="groups of sizes"):
        group_trajectory_advantages([bad], CFG)


def test_pushed_weights_reach_the_rollout_with_their_version_and_checkpoints_restore(single, tmp_path):
    actor, rollout, init = single
    actor.call(EmbodiedActorWorker.load_checkpoint, init).wait()
    request = ObsRequest(0, 0, np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32), None, True)
    actor.call(EmbodiedActorWorker.push_weights, rollout).wait()
    before = rollout.call(PolicyRolloutWorker.answer, request).wait()[0]
    assert before.version == 0
    actor.call(EmbodiedActorWorker.save_checkpoint, str(tmp_path / "ckpt")).wait()
    ch = Channel("embodied-test/push")
    ch.put(synthetic_trajectory(3))
    actor.call(EmbodiedActorWorker.train, ch, 1, gae_advantages).wait()
    actor.call(EmbodiedActorWorker.push_weights, rollout).wait()
    after = rollout.call(PolicyRolloutWorker.answer, request).wait()[0]
    assert after.version == 1 and not np.allclose(after.values, before.values)
    assert actor.call(EmbodiedActorWorker.load_checkpoint, str(tmp_path / "ckpt")).wait() == [0]
    actor.call(EmbodiedActorWorker.push_weights, rollout).wait()
    restored = rollout.call(PolicyRolloutWorker.answer, request).wait()[0]
    np.testing.assert_allclose(restored.values, before.values, atol=1e-6)


def test_config_errors_name_the_value_and_a_fix():
    from rlinf.errors import ConfigError
    from rlinf.workers.embodied import EmbodiedRolloutConfig

    with pytest.raises(ConfigError, match=r"actor\.minibatches=0"):
        EmbodiedActorConfig(minibatches=0)
    with pytest.raises(ConfigError, match=r"rollout\.stages=0 .* use 2"):
        EmbodiedRolloutConfig(stages=0)
    run = EmbodiedRunConfig(target_return=475.0)
    assert not run.reached({"env/return_window": 474.0}) and run.reached({"env/return_window": 480.0})
    assert not EmbodiedRunConfig().reached({"env/return_window": 1e9})
