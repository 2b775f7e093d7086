"""Advantage estimators against numbers worked out by hand, plus a reference-loop cross-check for GAE."""

from __future__ import annotations

import math

import pytest
import torch

from rlinf.algorithms import (
    gae,
    group_advantage,
    masked_whiten,
    reinforce_pp_advantage,
    returns_to_go,
    rloo_advantage,
    shaped_token_rewards,
    token_gae,
)


def close(actual: torch.Tensor, expected: list, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --- GRPO ---------------------------------------------------------------------------------------


def test_group_advantage_by_hand():
    # group [1,0,0,1]: mean .5, population std .5 -> [1,-1,-1,1]
    close(group_advantage(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4), [1, -1, -1, 1])
    # groups are contiguous: [1,2,3] mean 2, deviations [-1,0,1], var 2/3, std .8165 -> ±1.2247;
    # [5,5,5] all equal -> zeros (0 / eps), not nan
    s = 1 / math.sqrt(2 / 3)
    close(group_advantage(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3), [-s, 0, s, 0, 0, 0])


def test_group_advantage_uses_population_std():
    # G=2, [0,1]: mean .5, population std .5 -> [-1,1]; the Bessel std (.7071) would give ±.7071
    close(group_advantage(torch.tensor([0.0, 1.0]), 2), [-1, 1])


def test_group_advantage_unscaled_only_centres():
    # groups [1,2] and [3,4]: means 1.5, 3.5 -> [-.5,.5,-.5,.5]
    close(group_advantage(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2, scale=False), [-0.5, 0.5, -0.5, 0.5])


def test_group_advantage_all_equal_and_integer_rewards():
    adv = group_advantage(torch.tensor([1, 1, 1, 1]), 4)  # integer rewards from a verifier
    assert adv.dtype == torch.float32
    close(adv, [0, 0, 0, 0], atol=0)


@pytest.mark.parametrize(
    ("rewards", "group_size", "match"),
    [
        (torch.zeros(5), 2, "5 entries, not a positive multiple of group_size=2.*first 4"),
        (torch.zeros(4), 1, "group_size=1"),
        (torch.zeros(4), 0, "group_size=0 must be >= 1"),
        (torch.zeros(2, 2), 2, r"shape \(2, 2\).*reshape\(-1\)"),
        (torch.zeros(0), 2, "at least one whole group"),
    ],
)
def test_group_advantage_rejects_bad_layout(rewards, group_size, match):
    with pytest.raises(ValueError, match=match):
        group_advantage(rewards, group_size)


# --- RLOO ---------------------------------------------------------------------------------------


def test_rloo_by_hand():
    # group [1,0,0,1]: a 1 sees others [0,0,1] (mean 1/3) -> 2/3; a 0 sees [1,0,1] (mean 2/3) -> -2/3
    close(rloo_advantage(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3])
    # groups [3,1] -> [3-1, 1-3] = [2,-2]; [2,2] -> [0,0]
    close(rloo_advantage(torch.tensor([3.0, 1.0, 2.0, 2.0]), 2), [2, -2, 0, 0])


def test_rloo_equals_scaled_group_mean_baseline():
    r = torch.tensor([0.3, 1.7, -0.4, 2.0, 0.1, 0.0])
    # G/(G-1) * (r - group mean), with G=3
    torch.testing.assert_close(rloo_advantage(r, 3), 1.5 * group_advantage(r, 3, scale=False))


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="group_size=1"):
        rloo_advantage(torch.zeros(3), 1)


# --- token rewards and REINFORCE++ ------------------------------------------------------------------


def test_shaped_token_rewards_by_hand():
    seq = torch.tensor([1.0, 2.0, 5.0])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    out = shaped_token_rewards(seq, mask, kl=kl, kl_coef=0.5)
    # row 0: -.5*[.1,.2,.3] and +1 on token 2 -> [-.05,-.1,.85,0]
    # row 1: -.5*.5 on tokens 1..3, +2 on token 3 -> [0,-.25,-.25,1.75]
    # row 2: no valid token -> zeros, its reward 5 is dropped
    close(out, [[-0.05, -0.1, 0.85, 0], [0, -0.25, -0.25, 1.75], [0, 0, 0, 0]])
    # without kl only the sequence rewards remain, on the last valid token
    close(shaped_token_rewards(seq, mask), [[0, 0, 1, 0], [0, 0, 0, 2], [0, 0, 0, 0]])


def test_shaped_token_rewards_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2 entries but mask has 3 rows"):
        shaped_token_rewards(torch.zeros(2), torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"kl_coef=-0\.1"):
        shaped_token_rewards(torch.zeros(3), torch.ones(3, 4), kl=torch.zeros(3, 4), kl_coef=-0.1)
    with pytest.raises(ValueError, match=r"kl has shape \(3, 5\)"):
        shaped_token_rewards(torch.zeros(3), torch.ones(3, 4), kl=torch.zeros(3, 5), kl_coef=0.1)


def test_returns_to_go_by_hand():
    # gamma .5, rewards [1,2,3]: G2 = 3, G1 = 2 + .5*3 = 3.5, G0 = 1 + .5*3.5 = 2.75
    close(returns_to_go(torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), gamma=0.5), [[2.75, 3.5, 3]])
    # a gap passes the return through without reward or discount: G2 = 3, G0 = 1 + .5*3 = 2.5
    hole = returns_to_go(torch.tensor([[1.0, 9.0, 3.0]]), torch.tensor([[1, 0, 1]]), gamma=0.5)
    close(hole, [[2.5, 0, 3]])
    # trailing padding contributes nothing: gamma 1, reward 1 on the last valid token
    pad = returns_to_go(torch.tensor([[0.0, 0.0, 1.0, 7.0]]), torch.tensor([[1, 1, 1, 0]]))
    close(pad, [[1, 1, 1, 0]])


def test_reinforce_pp_by_hand():
    rewards = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # returns (gamma 1): [[2,2],[1,-]]; valid [2,2,1]: mean 5/3, deviations [1/3,1/3,-2/3],
    # population var (1/9+1/9+4/9)/3 = 2/9, std sqrt(2)/3 -> [1/sqrt2, 1/sqrt2, -sqrt2]
    r2 = math.sqrt(2)
    close(reinforce_pp_advantage(rewards, mask), [[1 / r2, 1 / r2], [-r2, 0]])


def test_reinforce_pp_masked_rows_and_batches_give_zeros():
    rewards = torch.tensor([[0.0, 2.0], [float("nan"), 3.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    # valid returns [2,2] are constant -> zeros; the fully masked row stays 0 despite its nan
    close(reinforce_pp_advantage(rewards, mask), [[0, 0], [0, 0]], atol=0)
    close(reinforce_pp_advantage(rewards, torch.zeros(2, 2)), [[0, 0], [0, 0]], atol=0)


# --- GAE, embodied ------------------------------------------------------------------------------


def _embodied_case():
    # T=3 steps, N=2 envs that match except at t=1: env 0 terminates, env 1 is truncated
    rewards = torch.ones(3, 2)
    values = torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]])
    # t=0 -> values[1]=2; t=1 -> value of the final observation, 4; t=2 -> bootstrap after the rollout, 3
    next_values = torch.tensor([[2.0, 2.0], [4.0, 4.0], [3.0, 3.0]])
    terminated = torch.tensor([[False, False], [True, False], [False, False]])
    truncated = torch.tensor([[False, False], [False, True], [False, False]])
    return rewards, values, next_values, terminated, truncated


def test_gae_termination_vs_truncation_by_hand():
    adv, ret = gae(*_embodied_case(), gamma=0.5, lam=0.5)
    # deltas (r + gamma*V' - V): t=2: 1 + .5*3 - 1 = 1.5 for both
    #   t=1: env 0 terminated, no bootstrap: 1 - 2 = -1;  env 1 truncated: 1 + .5*4 - 2 = 1
    #   t=0: 1 + .5*2 - 1 = 1
    # advantages: A2 = 1.5; A1 = delta1 (the episode boundary cuts the trace); A0 = 1 + .25*A1
    #   env 0: [.75, -1, 1.5], env 1: [1.25, 1, 1.5]
    close(adv, [[0.75, 1.25], [-1, 1], [1.5, 1.5]])
    # the difference is gamma*V(final) = 2 at t=1 and gamma*lam*2 = .5 at t=0
    close(adv[:, 1] - adv[:, 0], [0.5, 2, 0])
    close(ret, [[1.75, 2.25], [1, 3], [2.5, 2.5]])


def test_gae_termination_wins_over_truncation():
    rewards, values, next_values, terminated, truncated = _embodied_case()
    both = terminated | truncated
    adv_both, _ = gae(rewards, values, next_values, both, both, gamma=0.5, lam=0.5)
    adv_term, _ = gae(rewards, values, next_values, both, torch.zeros_like(both), gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv_both, adv_term)


def test_gae_special_lambdas():
    r = torch.tensor([[1.0], [2.0], [3.0]])
    v = torch.tensor([[0.5], [1.0], [1.5]])
    nv = torch.tensor([[1.0], [1.5], [4.0]])
    no = torch.zeros(3, 1, dtype=torch.bool)
    # lam 0: one-step TD errors r + V' - V = [1.5, 2.5, 5.5]
    close(gae(r, v, nv, no, no, gamma=1.0, lam=0.0)[0], [[1.5], [2.5], [5.5]])
    # lam 1, gamma 1: sum of rewards to go + bootstrap 4 - V: [10-.5, 9-1, 7-1.5]
    close(gae(r, v, nv, no, no, gamma=1.0, lam=1.0)[0], [[9.5], [8.0], [5.5]])


def _reference_gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    """Textbook GAE, one env and one step at a time on Python floats."""
    steps, envs = len(rewards), len(rewards[0])
    adv = [[0.0] * envs for _ in range(steps)]
    for n in range(envs):
        last = 0.0
        for t in reversed(range(steps)):
            if terminated[t][n]:
                delta = rewards[t][n] - values[t][n]
                last = delta
            elif truncated[t][n]:
                delta = rewards[t][n] + gamma * next_values[t][n] - values[t][n]
                last = delta
            else:
                delta = rewards[t][n] + gamma * next_values[t][n] - values[t][n]
                last = delta + gamma * lam * last
            adv[t][n] = last
    return adv


def test_gae_matches_reference_loop():
    g = torch.Generator().manual_seed(0)
    steps, envs = 9, 4
    rewards = torch.randn(steps, envs, generator=g, dtype=torch.float64)
    values = torch.randn(steps, envs, generator=g, dtype=torch.float64)
    next_values = torch.randn(steps, envs, generator=g, dtype=torch.float64)
    terminated = torch.rand(steps, envs, generator=g) < 0.2
    truncated = torch.rand(steps, envs, generator=g) < 0.2
    adv, ret = gae(rewards, values, next_values, terminated, truncated, gamma=0.9, lam=0.8)
    expected = _reference_gae(
        rewards.tolist(), values.tolist(), next_values.tolist(), terminated.tolist(), truncated.tolist(), 0.9, 0.8
    )
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(ret, adv + values)


def test_gae_rejects_bad_inputs():
    r, v, nv, term, trunc = _embodied_case()
    with pytest.raises(ValueError, match=r"next_values has shape \(2, 2\)"):
        gae(r, v, nv[:2], term, trunc)
    with pytest.raises(ValueError, match=r"gamma=1\.5"):
        gae(r, v, nv, term, trunc, gamma=1.5)
    with pytest.raises(ValueError, match=r"lam=-0\.1"):
        gae(r, v, nv, term, trunc, lam=-0.1)


# --- GAE, per token ---------------------------------------------------------------------------------


def test_token_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.8, 99.0]])  # the padded value must not leak in
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = token_gae(rewards, values, mask, gamma=1.0, lam=0.5, whiten=False)
    # delta2 = 1 + 0 - .8 = .2 (terminal after the last token); A2 = .2
    # delta1 = 0 + .8 - .6 = .2; A1 = .2 + .5*.2 = .3
    # delta0 = 0 + .6 - .5 = .1; A0 = .1 + .5*.3 = .25
    close(adv, [[0.25, 0.3, 0.2, 0]])
    close(ret, [[0.75, 0.9, 1.0, 0]])


def test_token_gae_skips_gaps():
    # mask [1,0,1], gamma 1, lam 1: delta2 = 1 - .8 = .2; token 1 is skipped; delta0 = 0 + .8 - .5 = .3,
    # A0 = .3 + .2 = .5; returns = A + V = [1, -, 1] (the sequence reward, as Monte Carlo says)
    adv, ret = token_gae(
        torch.tensor([[0.0, 7.0, 1.0]]),
        torch.tensor([[0.5, 9.0, 0.8]]),
        torch.tensor([[1, 0, 1]]),
        gamma=1.0,
        lam=1.0,
        whiten=False,
    )
    close(adv, [[0.5, 0, 0.2]])
    close(ret, [[1.0, 0, 1.0]])


def test_token_gae_matches_embodied_gae_on_one_sequence():
    # a right-padded sequence of 5 tokens is an episode of 5 steps that terminates at the last one
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(1, 7, generator=g, dtype=torch.float64)
    values = torch.randn(1, 7, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    adv, ret = token_gae(rewards, values, mask, gamma=0.9, lam=0.7, whiten=False)
    r, v = rewards[0, :5, None], values[0, :5, None]
    nv = torch.cat([v[1:], torch.zeros(1, 1, dtype=v.dtype)])
    term = torch.zeros(5, 1, dtype=torch.bool)
    term[-1] = True
    ref_adv, ref_ret = gae(r, v, nv, term, torch.zeros_like(term), gamma=0.9, lam=0.7)
    torch.testing.assert_close(adv[0, :5], ref_adv[:, 0])
    torch.testing.assert_close(ret[0, :5], ref_ret[:, 0])
    close(adv[0, 5:], [0, 0], atol=0)


def test_token_gae_whitening_changes_advantages_not_returns():
    g = torch.Generator().manual_seed(2)
    rewards, values = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    raw_adv, raw_ret = token_gae(rewards, values, mask, whiten=False)
    adv, ret = token_gae(rewards, values, mask, whiten=True)
    torch.testing.assert_close(ret, raw_ret)
    torch.testing.assert_close(adv, masked_whiten(raw_adv, mask))
    valid = adv[mask.bool()]
    assert abs(valid.mean().item()) < 1e-5
    assert abs(valid.std(correction=0).item() - 1) < 1e-4
    assert not adv.isnan().any()
