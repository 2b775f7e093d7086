"""Policy, value and preference losses against numbers worked out by hand; gradients via autograd."""

from __future__ import annotations

import math

import pytest
import torch

from rlinf.algorithms import (
    decoupled_ppo_loss,
    dpo_loss,
    ipo_loss,
    policy_gradient_loss,
    ppo_clip_loss,
    value_loss,
)

LN = math.log


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def _four_tokens():
    """One sequence whose four tokens cover the four PPO cases: ratio 1.5 or .5, advantage +1 or -1."""
    old = torch.zeros(1, 4)
    logprobs = torch.tensor([[LN(1.5), LN(0.5), LN(1.5), LN(0.5)]], requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    return logprobs, old, advantages, torch.ones(1, 4)


# --- PPO clip ----------------------------------------------------------------------------------------


def test_ppo_clip_by_hand():
    logprobs, old, adv, mask = _four_tokens()
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    # per token max(-A*r, -A*clip(r, .8, 1.2)):
    #   r 1.5, A +1: max(-1.5, -1.2) = -1.2 (clipped)    r .5, A +1: max(-.5, -.8) = -.5
    #   r 1.5, A -1: max( 1.5,  1.2) =  1.5              r .5, A -1: max( .5,  .8) =  .8 (clipped)
    # token-mean: (-1.2 - .5 + 1.5 + .8) / 4 = .15
    close(loss, 0.15)
    close(metrics["clip_fraction"], 0.5)
    close(metrics["ratio_mean"], 1.0)  # (1.5 + .5 + 1.5 + .5) / 4
    # approx_kl = mean(r - 1 - ln r): 1.5 -> .094535, .5 -> .193147; mean .143841
    close(metrics["approx_kl"], 0.143841)
    close(metrics["dual_clip_fraction"], 0.0)
    assert all(not v.requires_grad for v in metrics.values())


def test_ppo_clip_gradient_direction():
    logprobs, old, adv, mask = _four_tokens()
    loss, _ = ppo_clip_loss(logprobs, old, adv, mask)
    loss.backward()
    # d(-A*r)/d logp = -A*r, divided by 4 tokens; clipped tokens get 0:
    #   [0, -(1)(.5)/4, -(-1)(1.5)/4, 0] = [0, -.125, .375, 0]
    close(logprobs.grad, [[0.0, -0.125, 0.375, 0.0]])
    # a descent step raises the log-prob of the positive-advantage token, lowers the negative one
    assert logprobs.grad[0, 1] < 0 < logprobs.grad[0, 2]


def test_ppo_clip_asymmetric():
    logprobs, old, adv, mask = _four_tokens()
    # clip-higher .28: token 0 is clipped at 1.28 -> -1.28; the rest as before:
    # (-1.28 - .5 + 1.5 + .8) / 4 = .13
    loss, _ = ppo_clip_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28)
    close(loss, 0.13)


def test_dual_clip_only_bounds_negative_advantages():
    logprobs = torch.tensor([[LN(5.0), LN(5.0), LN(2.0)]], requires_grad=True)
    old = torch.zeros(1, 3)
    adv = torch.tensor([[-1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask, dual_clip=3.0)
    # r 5, A -1: max(5, 1.2) = 5, bounded by -c*A = 3  -> 3, no gradient
    # r 5, A +1: max(-5, -1.2) = -1.2, dual clip does not apply to positive advantages
    # r 2, A -1: max(2, 1.2) = 2 < 3, unchanged
    # mean (3 - 1.2 + 2) / 3 = 1.266667
    close(loss, 3.8 / 3)
    close(metrics["dual_clip_fraction"], 1 / 3)
    loss.backward()
    # only token 2 passes a gradient: -A*r/3 = 2/3
    close(logprobs.grad, [[0.0, 0.0, 2 / 3]])
    # without the dual clip: (5 - 1.2 + 2) / 3
    close(ppo_clip_loss(logprobs, old, adv, mask)[0], 5.8 / 3)


def test_ppo_clip_masked_padding_is_ignored_without_nan():
    logprobs = torch.tensor([[LN(1.5), LN(0.5), float("-inf")]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, float("-inf")]])
    adv = torch.tensor([[1.0, 1.0, float("nan")]])
    mask = torch.tensor([[True, True, False]])
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask)
    # (-1.2 - .5) / 2 = -.85
    close(loss, -0.85)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 2] == 0
    assert all(torch.isfinite(v) for v in metrics.values())


def test_ppo_clip_fully_masked_batch_gives_zero():
    logprobs = torch.zeros(2, 3, requires_grad=True)
    loss, metrics = ppo_clip_loss(logprobs, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and (logprobs.grad == 0).all()
    assert all(v.item() == 0.0 for v in metrics.values())


def test_ppo_clip_sequence_advantages_broadcast_and_aggregation():
    logprobs = torch.tensor([[LN(1.5), LN(0.5), 0.0], [LN(1.5), 0.0, 0.0]])
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    per_seq = ppo_clip_loss(logprobs, old, torch.tensor([1.0, -1.0]), mask)[0]
    per_tok = ppo_clip_loss(logprobs, old, torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]), mask)[0]
    torch.testing.assert_close(per_seq, per_tok)
    # per-token losses: row 0 [-1.2, -.5], row 1 [1.5]
    close(per_seq, (-1.2 - 0.5 + 1.5) / 3)  # token-mean
    seq_mean = ppo_clip_loss(logprobs, old, torch.tensor([1.0, -1.0]), mask, aggregation="seq-mean-token-mean")
    close(seq_mean[0], (-0.85 + 1.5) / 2)  # row means -.85 and 1.5
    dr_grpo = ppo_clip_loss(
        logprobs,
        old,
        torch.tensor([1.0, -1.0]),
        mask,
        aggregation="seq-mean-token-sum",
        length_normaliser=4.0,
    )
    close(dr_grpo[0], (-1.7 / 4 + 1.5 / 4) / 2)  # row sums -1.7 and 1.5, each / 4, mean over 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_low": 1.5}, "clip_low=1.5"),
        ({"clip_high": -0.1}, "clip_high=-0.1"),
        ({"dual_clip": 1.0}, "dual_clip=1.0"),
        ({"dual_clip": 0.5}, "dual_clip=0.5"),
        ({"aggregation": "token_mean"}, "Did you mean 'token-mean'"),
        ({"length_normaliser": 8.0}, "length_normaliser=8.0 only applies"),
    ],
)
def test_ppo_clip_rejects_bad_arguments(kwargs, match):
    logprobs, old, adv, mask = _four_tokens()
    with pytest.raises(ValueError, match=match):
        ppo_clip_loss(logprobs, old, adv, mask, **kwargs)


def test_ppo_clip_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(2, 4\) but logprobs has shape \(2, 3\)"):
        ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask has shape \(3, 3\)"):
        ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\)"):
        ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))


# --- decoupled PPO ------------------------------------------------------------------------------------


def test_decoupled_ppo_by_hand():
    behaviour = torch.zeros(1, 2)
    proximal = torch.tensor([[LN(2.0), LN(10.0)]])
    logprobs = proximal + torch.tensor([[LN(1.5), 0.0]])
    adv, mask = torch.ones(1, 2), torch.ones(1, 2)
    loss, m = decoupled_ppo_loss(logprobs, proximal, behaviour, adv, mask, weight_cap=5.0)
    # token 0: w = p_prox/p_behav = 2, r = 1.5 clipped at 1.2 -> 2 * -1.2 = -2.4
    # token 1: w = 10 capped at 5, r = 1 -> 5 * -1 = -5;  mean -3.7
    close(loss, -3.7)
    close(m["behaviour_weight_mean"], 3.5)
    close(m["behaviour_weight_capped_fraction"], 0.5)
    # behaviour_kl = mean(w - 1 - ln w) on raw weights: (2-1-.693147 + 10-1-2.302585)/2 = 3.502134
    close(m["behaviour_kl"], 3.502134)
    close(m["clip_fraction"], 0.5)
    # no cap: (-2.4 - 10) / 2
    close(decoupled_ppo_loss(logprobs, proximal, behaviour, adv, mask, weight_cap=None)[0], -6.2)


def test_decoupled_ppo_equals_ppo_when_on_policy():
    logprobs, old, adv, mask = _four_tokens()
    decoupled, _ = decoupled_ppo_loss(logprobs, old, old, adv, mask, dual_clip=3.0)
    plain, _ = ppo_clip_loss(logprobs, old, adv, mask, dual_clip=3.0)
    torch.testing.assert_close(decoupled, plain)


def test_decoupled_ppo_gradient_scaled_by_weight():
    logprobs = torch.tensor([[LN(0.5)]], requires_grad=True)
    proximal, behaviour = torch.zeros(1, 1), torch.tensor([[-LN(3.0)]])
    loss, _ = decoupled_ppo_loss(logprobs, proximal, behaviour, torch.ones(1, 1), torch.ones(1, 1))
    loss.backward()
    # w = 3, r = .5 (pessimistic side, not clipped): d(-w*A*r)/d logp = -3 * .5 = -1.5
    close(logprobs.grad, [[-1.5]])


def test_decoupled_ppo_rejects_bad_cap():
    logprobs, old, adv, mask = _four_tokens()
    with pytest.raises(ValueError, match=r"weight_cap=0\.0"):
        decoupled_ppo_loss(logprobs, old, old, adv, mask, weight_cap=0.0)
    with pytest.raises(ValueError, match="behaviour_logprobs has shape"):
        decoupled_ppo_loss(logprobs, old, torch.zeros(1, 3), adv, mask)


# --- value loss --------------------------------------------------------------------------------------


def test_value_loss_by_hand():
    values = torch.tensor([[1.5, 1.1, 0.5, 3.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    returns = torch.tensor([[2.0, 2.0, 0.0, 3.0]])
    mask = torch.ones(1, 4)
    loss, metrics = value_loss(values, old, returns, mask, clip=0.2)
    # 0.5 * max((v-R)^2, (old + clip(v-old, ±.2) - R)^2):
    #   v 1.5: max(.25, (1.2-2)^2=.64) -> .32 (clipped)   v 1.1: max(.81, .81) -> .405
    #   v  .5: max(.25, (.8-0)^2=.64) -> .32 (clipped)    v 3.0: max(0, (1.2-3)^2=3.24) -> 1.62 (clipped)
    # mean (.32 + .405 + .32 + 1.62) / 4 = .66625
    close(loss, 0.66625)
    close(metrics["clip_fraction"], 0.75)
    loss.backward()
    # only the unclipped token passes a gradient: (v - R) / 4 = -.9 / 4
    close(values.grad, [[0.0, -0.225, 0.0, 0.0]])
    # unclipped: .5 * (.25 + .81 + .25 + 0) / 4 = .16375
    close(value_loss(values, old, returns, mask, clip=None)[0], 0.16375)


def test_value_loss_explained_variance_and_masking():
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    values = torch.tensor([[1.0, 2.0, 3.0, float("nan")]])
    loss, metrics = value_loss(values, values, returns, mask)
    close(loss, 0.0)
    close(metrics["explained_variance"], 1.0)
    # predicting the mean everywhere explains nothing
    _, metrics = value_loss(torch.full((1, 4), 2.0), torch.full((1, 4), 2.0), returns, mask)
    close(metrics["explained_variance"], 0.0)


def test_value_loss_rejects_negative_clip():
    with pytest.raises(ValueError, match="clip=-1"):
        value_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.ones(2), clip=-1)


# --- REINFORCE ----------------------------------------------------------------------------------------


def test_policy_gradient_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, metrics = policy_gradient_loss(logprobs, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    # -A*logp = [1, -2]; mean -.5; d/d logp = -A/2 = [-.5, .5]
    close(loss, -0.5)
    close(metrics["logprob_mean"], -1.5)
    loss.backward()
    close(logprobs.grad, [[-0.5, 0.5]])


# --- DPO / IPO ----------------------------------------------------------------------------------------


def _pair():
    # chosen log-ratio to the reference: -1 - (-2) = 1; rejected: -3 - (-2) = -1
    chosen = torch.tensor([-1.0], requires_grad=True)
    return chosen, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])


def test_dpo_by_hand():
    chosen, rejected, ref_c, ref_r = _pair()
    loss, m = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1)
    # z = .1 * (1 - (-1)) = .2; -log sigmoid(.2) = log(1 + e^-.2) = .598139
    close(loss, 0.598139)
    close(m["chosen_reward"], 0.1)
    close(m["rejected_reward"], -0.1)
    close(m["reward_margin"], 0.2)
    close(m["reward_accuracy"], 1.0)
    loss.backward()
    # d/d chosen = -beta * (1 - sigmoid(.2)) = -.1 * .450166: descent raises the chosen log-prob
    close(chosen.grad, [-0.0450166])


def test_dpo_label_smoothing_by_hand():
    # .9 * log(1 + e^-.2) + .1 * log(1 + e^.2) = .9 * .598139 + .1 * .798139 = .618139
    loss, _ = dpo_loss(*_pair(), beta=0.1, label_smoothing=0.1)
    close(loss, 0.618139)


def test_ipo_by_hand():
    # margin h = 1 - (-1) = 2; target 1/(2*.1) = 5 -> (2 - 5)^2 = 9; with beta .25 the target is 2 -> 0
    close(ipo_loss(*_pair(), beta=0.1)[0], 9.0)
    close(ipo_loss(*_pair(), beta=0.25)[0], 0.0)


def test_preference_losses_reject_bad_inputs():
    chosen, rejected, ref_c, ref_r = _pair()
    with pytest.raises(ValueError, match="beta=0"):
        dpo_loss(chosen, rejected, ref_c, ref_r, beta=0)
    with pytest.raises(ValueError, match=r"label_smoothing=0\.5"):
        dpo_loss(chosen, rejected, ref_c, ref_r, label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"rejected_logprobs has shape \(2,\)"):
        ipo_loss(chosen, torch.zeros(2), ref_c, ref_r)
    with pytest.raises(ValueError, match="must be 1-D"):
        dpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1))


def test_no_mask_matches_an_all_valid_mask():
    torch.manual_seed(0)
    logprobs = torch.randn(16, requires_grad=True)
    old, adv = torch.randn(16), torch.randn(16)
    values, old_values, returns = torch.randn(16, requires_grad=True), torch.randn(16), torch.randn(16)
    ones = torch.ones(16, dtype=torch.bool)
    for fn, args, kwargs in [
        (ppo_clip_loss, (logprobs, old, adv), {"dual_clip": 3.0}),
        (decoupled_ppo_loss, (logprobs, old, old + 0.1, adv), {"weight_cap": None}),
        (value_loss, (values, old_values, returns), {"clip": 0.2}),
    ]:
        loss, metrics = fn(*args, None, **kwargs)
        ref_loss, ref_metrics = fn(*args, ones, **kwargs)
        torch.testing.assert_close(loss, ref_loss)
        assert metrics.keys() == ref_metrics.keys()
        for k in metrics:
            torch.testing.assert_close(metrics[k], ref_metrics[k])
        inputs = [t for t in args if t.requires_grad]
        torch.testing.assert_close(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref_loss, inputs))
