"""KL estimators against numbers worked out by hand and against the exact KL of small distributions."""

from __future__ import annotations

import math

import pytest
import torch

from rlinf.algorithms import kl_k1, kl_k2, kl_k3, token_kl


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


LOGP = torch.tensor([0.0, -1.0])
REF = torch.tensor([-1.0, 0.0])  # log_r = ref - logp = [-1, 1]


def test_estimators_by_hand():
    close(kl_k1(LOGP, REF), [1.0, -1.0])  # logp - ref
    close(kl_k2(LOGP, REF), [0.5, 0.5])  # .5 * (±1)^2
    # exp(log_r) - log_r - 1: e^-1 + 1 - 1 = .367879; e^1 - 1 - 1 = .718282
    close(kl_k3(LOGP, REF), [0.367879, 0.718282])


def test_token_kl_dispatches_by_name():
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        torch.testing.assert_close(token_kl(LOGP, REF, estimator=name), fn(LOGP, REF))


def test_k1_and_k3_are_unbiased_for_the_exact_kl():
    # p = [.5, .5], q = [.25, .75]: KL(p||q) = .5 ln 2 + .5 ln(2/3) = .143841
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    exact = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    logp, logq = p.log(), q.log()
    # the expectation over tokens sampled from p is the p-weighted sum
    close((p * kl_k1(logp, logq)).sum(), exact)
    close((p * kl_k3(logp, logq)).sum(), exact)
    assert (kl_k3(logp, logq) >= 0).all()


def test_k3_is_clamped_and_finite():
    logp = torch.tensor([-50.0, 0.0, -1.0], requires_grad=True)
    ref = torch.tensor([0.0, -50.0, -1.0])
    kl = kl_k3(logp, ref)
    # log_r = 50 -> clamped to 20 -> e^20 - 21 ~ 5e8 -> clamped to 10
    # log_r = -50 -> clamped to -20 -> e^-20 + 20 - 1 ~ 19 -> clamped to 10
    # log_r = 0 -> 0
    close(kl, [10.0, 10.0, 0.0])
    kl.sum().backward()
    close(logp.grad, [0.0, 0.0, 0.0])  # clamped tokens pass no gradient
    close(kl_k3(logp.detach(), ref, max_value=100.0)[1], 19.0)


def test_k2_gradient_points_towards_reference():
    logp = torch.tensor([0.0, -2.0], requires_grad=True)
    kl_k2(logp, torch.tensor([-1.0, -1.0])).sum().backward()
    # d/d logp .5 (logp - ref)^2 = logp - ref = [1, -1]: descent moves logp towards ref
    close(logp.grad, [1.0, -1.0])


def test_token_kl_masks_padding_without_nan():
    logp = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    ref = torch.tensor([[-2.0, float("-inf")]])
    mask = torch.tensor([[True, False]])
    for name in ("k1", "k2", "k3"):
        kl = token_kl(logp, ref, estimator=name, mask=mask)
        assert kl[0, 1] == 0 and torch.isfinite(kl).all()
        kl.sum().backward()
        assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
        logp.grad = None
    close(token_kl(logp, ref, estimator="k1", mask=mask), [[1.0, 0.0]])


def test_kl_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"ref_logprobs has shape \(3,\) but logprobs has shape \(2,\)"):
        kl_k1(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="Did you mean 'k3'"):
        token_kl(LOGP, REF, estimator="kl3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_value=-1"):
        kl_k3(LOGP, REF, max_value=-1)
    with pytest.raises(TypeError, match=r"wrap it with torch\.as_tensor"):
        kl_k1([0.0], torch.zeros(1))  # type: ignore[arg-type]
