"""EnvWorker: stages and ranks give the trajectories of one unstaged loop (checked against a reference loop),
and so do env ranks acting with their own copy of the policy,
simulation really overlaps inference with two stages, GRPO rollouts keep first episodes of reset groups,
next-step auto-reset steps are masked, and bad splits are refused with a fix."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from rlinf import Channel
from rlinf.envs import AutoReset, EnvConfig, make_env
from rlinf.errors import ConfigError, WorkerError
from rlinf.models.policies import PolicyConfig, build_policy
from rlinf.workers.embodied import PolicyRolloutWorker
from rlinf.workers.env import EnvWorker, Trajectory, merge_env_metrics, stage_size
from rlinf.workers.weights import publish_state

POLICY = PolicyConfig(kind="mlp", hidden_sizes=(16, 16))


def make_policy(obs_space: Any, act_space: Any) -> nn.Module:
    return build_policy(POLICY, obs_space, act_space)


def reference_weights(seed: int = 3) -> dict[str, torch.Tensor]:
    env = make_env(EnvConfig(num_envs=1))
    torch.manual_seed(seed)
    policy = make_policy(env.observation_space, env.action_space)
    # Larger output weights than the orthogonal init's 0.01, so deterministic actions depend on the state.
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(30.0 if p.dim() == 2 and p.shape[0] == 2 else 1.0)
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


@pytest.fixture(scope="module")
def rollout(cluster):
    env = make_env(EnvConfig(num_envs=1))
    group = PolicyRolloutWorker.launch(
        cluster, [1], make_policy, env.observation_space, env.action_space, 0, name="rollout-envtest"
    )
    group.call(PolicyRolloutWorker.load_weights, reference_weights(), 7).wait()
    yield group
    group.kill()
    cluster.groups.remove(group)


def run_rollout(env_group, rollout_group, out: Channel | None, steps: int, stages: int, **kw) -> list[dict[str, float]]:
    # Inboxes first: a rank runs one call at a time, so it cannot answer inbox() while it serves.
    env_inboxes = env_group.call(EnvWorker.inbox).wait()
    policy_inboxes = rollout_group.call(PolicyRolloutWorker.inbox).wait()
    serving = rollout_group.call(PolicyRolloutWorker.serve, env_inboxes)
    metrics = env_group.call(EnvWorker.interact, policy_inboxes, out, steps, **kw).wait()
    serving.wait()
    return metrics


def collect(out: Channel, n: int) -> list[Trajectory]:
    items = [out.get(timeout=60) for _ in range(n)]
    return sorted(items, key=lambda t: (t.env_rank, t.stage))


def joined(trajs: list[Trajectory], field: str) -> torch.Tensor:
    """Stages and ranks side by side again: ``[T, N, ...]`` over the global envs."""
    parts = [getattr(t, field) for t in trajs]
    return torch.cat(parts, dim=1 if parts[0].dim() > 1 else 0)


def reference_rollout(cfg: EnvConfig, steps: int) -> dict[str, Any]:
    """The plain single-process loop over one ``VectorEnv`` of all envs, deterministic actions."""
    env = make_env(cfg)
    policy = make_policy(env.observation_space, env.action_space)
    policy.load_state_dict(reference_weights())
    obs, _ = env.reset(seed=[cfg.seed + i for i in range(cfg.num_envs)])
    rec: dict[str, list[Any]] = {k: [] for k in ("obs", "actions", "values", "rewards", "terminated", "truncated")}
    boot: list[tuple[int, np.ndarray, torch.Tensor]] = []
    returns = []
    for t in range(steps):
        actions, _, values = policy.act(obs, deterministic=True)
        result = env.step(actions.numpy())
        for key, value in (("obs", obs), ("actions", actions), ("values", values)):
            rec[key].append(torch.as_tensor(value))
        rec["rewards"].append(torch.as_tensor(result.reward))
        rec["terminated"].append(torch.as_tensor(result.terminated))
        rec["truncated"].append(torch.as_tensor(result.truncated))
        rows = np.flatnonzero(result.truncated & ~result.terminated)
        if rows.size:
            with torch.no_grad():
                boot.append((t, rows, policy.value(result.info["final_obs"][rows])))
        ep = result.info["episode"]
        returns += ep["return"][ep["mask"]].tolist()
        obs = result.obs
    out = {k: torch.stack(v) for k, v in rec.items()}
    with torch.no_grad():
        final = policy.value(obs)
    nxt = torch.cat([out["values"][1:], final[None]])
    for t, rows, v in boot:
        nxt[t, rows] = v
    out["next_values"] = nxt
    out["returns"] = returns
    env.close()
    return out


CFG = EnvConfig(kind="gym", id="CartPole-v1", num_envs=8, seed=11, max_episode_steps=30)


def test_stages_and_ranks_give_the_reference_trajectories(fresh_groups, rollout):
    steps = 40
    ref = reference_rollout(CFG, steps)
    assert ref["terminated"].any() and ref["truncated"].any()  # both bootstrap paths are exercised
    for devices, stages in (([0], 1), ([0, 1], 2)):
        env = EnvWorker.launch(fresh_groups, devices, CFG, stages, name="env-ref")
        out = Channel(f"envtest/ref-{len(devices)}-{stages}")
        metrics = run_rollout(env, rollout, out, steps, stages, deterministic=True)
        check_reference(collect(out, len(devices) * stages), ref, metrics, steps, version=7)
        env.kill()
        fresh_groups.groups.remove(env)


def check_reference(trajs: list[Trajectory], ref: dict[str, Any], metrics: list, steps: int, version: int) -> None:
    assert [t.num_envs for t in trajs] == [CFG.num_envs // len(trajs)] * len(trajs)
    assert all(t.version == version for t in trajs)
    assert torch.equal(joined(trajs, "obs"), ref["obs"])
    assert torch.equal(joined(trajs, "actions"), ref["actions"])
    assert torch.equal(joined(trajs, "rewards"), ref["rewards"])
    assert torch.equal(joined(trajs, "terminated"), ref["terminated"])
    assert torch.equal(joined(trajs, "truncated"), ref["truncated"])
    assert joined(trajs, "mask").all()
    torch.testing.assert_close(joined(trajs, "values"), ref["values"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joined(trajs, "next_values"), ref["next_values"], atol=1e-5, rtol=1e-5)
    merged = merge_env_metrics(metrics)
    assert merged["env/episodes"] == len(ref["returns"])
    assert merged["env/return_mean"] == pytest.approx(np.mean(ref["returns"]))
    assert merged["env/steps"] == steps * CFG.num_envs


def test_env_ranks_acting_themselves_give_the_reference_trajectories(fresh_groups):
    """rollout.inline: two env ranks, each with its own copy of the policy, no policy rollout workers."""
    steps = 40
    ref = reference_rollout(CFG, steps)
    env = EnvWorker.launch(fresh_groups, [0, 1], CFG, 1, name="env-inline")
    with pytest.raises(WorkerError, match=r"no policy of its own; call EnvWorker\.attach_policy"):
        env.call(EnvWorker.interact, None, None, 2).wait()
    env.call(EnvWorker.attach_policy, make_policy).wait()
    env.call(EnvWorker.load_weights, reference_weights(), 7).wait()  # pushed weights
    out = Channel("envtest/inline")
    metrics = env.call(EnvWorker.interact, None, out, steps, deterministic=True).wait()
    check_reference(collect(out, 2), ref, metrics, steps, version=7)
    merged = merge_env_metrics(metrics)
    assert merged["rollout/samples"] == (steps + 1) * CFG.num_envs  # the bootstrap request after the last step too
    assert merged["rollout/version"] == 7 and merged["time/rollout_compute"] > 0

    # Published weights are loaded before the rollout, once they are at least the version it needs.
    publish_state(env, reference_weights(seed=4), 9)
    metrics = env.call(EnvWorker.interact, None, out, 3, reset_round=0, need_version=9).wait()
    trajs = collect(out, 2)
    assert all(t.version == 9 for t in trajs)
    assert merge_env_metrics(metrics)["rollout/version"] == 9
    env.kill()
    fresh_groups.groups.remove(env)


class SlowEnv:
    """A ``VectorEnv`` whose step sleeps ``per_env_s`` per env: simulation cost without using a core."""

    def __init__(self, env: Any, per_env_s: float) -> None:
        self.env, self.per_env_s = env, per_env_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def step(self, actions: np.ndarray) -> Any:
        time.sleep(self.per_env_s * self.env.num_envs)
        return self.env.step(actions)


class SlowPolicy(nn.Module):
    """A policy whose ``act`` sleeps ``per_obs_s`` per observation: inference cost without using a core."""

    def __init__(self, inner: nn.Module, per_obs_s: float) -> None:
        super().__init__()
        self.inner, self.per_obs_s = inner, per_obs_s

    def act(self, obs: Any, deterministic: bool = False) -> Any:
        time.sleep(self.per_obs_s * len(obs))
        return self.inner.act(obs, deterministic)

    def value(self, obs: Any) -> torch.Tensor:
        return self.inner.value(obs)


def slow_env(cfg: EnvConfig) -> Any:
    return SlowEnv(make_env(cfg), 0.0015)


def slow_policy(obs_space: Any, act_space: Any) -> nn.Module:
    return SlowPolicy(make_policy(obs_space, act_space), 0.0015)


def overlap_s(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


def spans(group: Any, prefix: str) -> list[tuple[float, float]]:
    return [(s.start, s.end) for track in group.collect_trace() for s in track.spans if s.name.startswith(prefix)]


def test_two_stages_overlap_simulation_with_inference(fresh_groups):
    """16 envs, 1.5 ms per env step and per observation: one stage takes turns (~48 ms a step),
    two stages pipeline (~24 ms a step)."""
    cfg = EnvConfig(num_envs=16, seed=0)
    space = make_env(EnvConfig(num_envs=1))
    policy = PolicyRolloutWorker.launch(
        fresh_groups, [1], slow_policy, space.observation_space, space.action_space, name="rollout-slow"
    )
    rates, overlaps = {}, {}
    for stages in (1, 2):
        env = EnvWorker.launch(fresh_groups, [0], cfg, stages, 32, slow_env, name=f"env-slow-{stages}")
        run_rollout(env, policy, None, 2, stages)  # warm-up
        env.collect_trace(), policy.collect_trace()
        m = merge_env_metrics(run_rollout(env, policy, None, 12, stages))
        rates[stages] = m["env/steps"] / m["time/env_rollout"]
        steps_spans, act_spans = spans(env, "step stage"), spans(policy, "act stage")
        overlaps[stages] = overlap_s(steps_spans, act_spans) / sum(e - s for s, e in steps_spans)
    assert overlaps[1] < 0.05, overlaps
    assert overlaps[2] > 0.5, overlaps
    assert rates[2] > 1.4 * rates[1], rates


def test_grpo_rollout_keeps_first_episodes_of_reset_groups(fresh_groups, rollout):
    cfg = EnvConfig(num_envs=8, group_size=4, seed=5)
    env = EnvWorker.launch(fresh_groups, [0], cfg, 2, name="env-grpo")
    out = Channel("envtest/grpo")
    metrics = run_rollout(env, rollout, out, 600, 2, reset_round=2, first_episode_only=True)[0]
    trajs = collect(out, 2)
    mask, done = joined(trajs, "mask"), joined(trajs, "terminated") | joined(trajs, "truncated")
    obs0 = joined(trajs, "obs")[0]
    seeds = cfg.reset_groups.seeds(2)
    fresh = make_env(EnvConfig(num_envs=1))
    for j in range(2):
        members = obs0[4 * j : 4 * (j + 1)]
        assert torch.equal(members, members[:1].expand_as(members))  # one starting state per group
        assert torch.equal(members[0], torch.as_tensor(fresh.reset(seed=seeds[4 * j])[0][0]))
    assert not torch.equal(obs0[0], obs0[4])
    assert torch.equal(joined(trajs, "group_ids"), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    lengths = []
    for i in range(8):
        first_end = int(torch.nonzero(done[:, i])[0])
        assert mask[: first_end + 1, i].all() and not mask[first_end + 1 :, i].any()
        lengths.append(first_end + 1)
    assert trajs[0].num_steps == max(lengths) < 600  # stopped once every env finished its first episode
    assert metrics["env/episodes"] == 8 and metrics["env/length_mean"] == pytest.approx(np.mean(lengths))


def test_next_step_auto_reset_steps_are_masked(fresh_groups, rollout):
    cfg = EnvConfig(num_envs=2, seed=0, auto_reset=AutoReset.NEXT_STEP, max_episode_steps=5)
    env = EnvWorker.launch(fresh_groups, [0], cfg, 1, name="env-next")
    out = Channel("envtest/next")
    run_rollout(env, rollout, out, 14, 1)
    (traj,) = collect(out, 1)
    done = traj.terminated | traj.truncated
    after_done = torch.zeros_like(done)
    after_done[1:] = done[:-1]
    assert done.any() and torch.equal(traj.mask, ~after_done)
    assert (traj.rewards[after_done] == 0).all()
    # Under next-step reset the next row holds the final observation: its value bootstraps a truncation.
    torch.testing.assert_close(traj.next_values[:-1], traj.values[1:])


def test_bad_splits_are_refused_with_a_fix():
    assert stage_size(EnvConfig(num_envs=16, group_size=4), 2, 2) == 4
    with pytest.raises(ConfigError, match=r"env\.num_envs=6 does not split .* Try env\.num_envs=4"):
        stage_size(EnvConfig(num_envs=6), 1, 4)
    with pytest.raises(ConfigError, match=r"not a multiple of env\.group_size=4"):
        stage_size(EnvConfig(num_envs=8, group_size=4), 1, 4)


def test_a_failing_env_surfaces_at_the_driver(fresh_groups):
    with pytest.raises(WorkerError, match=r"env\.num_envs=6 does not split"):
        EnvWorker.launch(fresh_groups, [0], EnvConfig(num_envs=6), 4, name="env-bad")


def test_env_metrics_merge_weights_means_by_episodes():
    merged = merge_env_metrics(
        [
            {"env/episodes": 1.0, "env/return_mean": 10.0, "env/steps": 8.0, "time/env_rollout": 1.0},
            {"env/episodes": 3.0, "env/return_mean": 30.0, "env/steps": 8.0, "time/env_rollout": 2.0},
            {"env/episodes": 0.0, "env/return_mean": float("nan"), "env/steps": 8.0, "time/env_rollout": 0.5},
        ]
    )
    assert merged["env/episodes"] == 4 and merged["env/steps"] == 24
    assert merged["env/return_mean"] == pytest.approx(25.0)
    assert merged["time/env_rollout"] == 2.0
