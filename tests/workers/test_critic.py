"""CriticWorker: values of the prefix before each response token, gradients only through valid tokens, GAE
targets by hand through the worker, exact micro-batch accumulation over two ranks, checkpoint round trip."""

from __future__ import annotations

import math

import pytest
import torch

from rlinf import Channel
from rlinf.algorithms import value_loss
from rlinf.errors import ConfigError
from rlinf.models import build_tiny_model
from rlinf.workers.critic import (
    CriticConfig,
    CriticWorker,
    ValueModel,
    attach_values,
    gae_advantages,
    gae_targets,
    load_value_model,
    pack_values,
)
from rlinf.workers.inference import block_mask_kind, pack_groups
from rlinf.workers.rollout import Group

PAD = 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-nano", size="nano", seed=0)


def random_groups(num_groups: int = 4, n: int = 3, seed: int = 0, vocab: int = 200) -> list[Group]:
    """Scored groups of random responses of different lengths (1 to 6 tokens), rewards in [0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for i in range(num_groups):
        prompt = torch.randint(5, vocab, (3 + i,), generator=gen)
        ids = torch.full((n, 6), PAD, dtype=torch.long)
        mask = torch.zeros((n, 6), dtype=torch.bool)
        for j, length in enumerate(torch.randint(1, 7, (n,), generator=gen).tolist()):
            ids[j, :length] = torch.randint(5, vocab, (length,), generator=gen)
            mask[j, :length] = True
        rewards = torch.rand(n, generator=gen)
        groups.append(
            Group(prompt, ids, mask, torch.zeros((n, 6)), ("",) * n, (False,) * n, ("",) * n, None, 0, i, rewards)
        )
    return groups


def failed_group(n: int = 3, index: int = 99) -> Group:
    """A group whose prompt was too long: no valid token."""
    z = torch.zeros((n, 1))
    return Group(
        torch.tensor([5]), z.long(), z.bool(), z, ("",) * n, (False,) * n, ("too long",) * n, None, 0, index, z[:, 0]
    )


def local_model(model_dir, seed: int = 0, std: float = 0.1) -> ValueModel:
    torch.manual_seed(seed)
    return load_value_model(model_dir, "float32", torch.device("cpu"), head_init_std=std)[0]


# ---- the value model, in this process ----------------------------------------------------------------


def test_values_have_the_response_shape_are_zero_off_the_mask_and_ignore_padding(model_dir):
    model = local_model(model_dir)
    groups = random_groups()
    batch = pack_groups(groups, PAD)
    with torch.no_grad():
        values = model(batch)
    assert values.shape == batch.response_mask.shape and values.dtype == torch.float32
    assert torch.all(values[~batch.response_mask] == 0)
    assert torch.all(values[batch.response_mask] != 0) and torch.isfinite(values).all()
    # Each row alone (no right padding from longer rows) gives the same values as in the batch.
    row = 0
    for g in groups:
        for i in range(g.size):
            one = Group(
                g.prompt_ids,
                g.response_ids[i : i + 1],
                g.response_mask[i : i + 1],
                g.logprobs[i : i + 1],
                ("",),
                (False,),
                ("",),
                None,
                0,
            )
            with torch.no_grad():
                alone = model(pack_groups([one], PAD))[0]
            k = alone.shape[0]
            torch.testing.assert_close(alone, values[row, :k], atol=1e-5, rtol=1e-5)
            row += 1


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_group_rows_give_the_per_sample_values_and_gradients(model_dir, attention):
    model = local_model(model_dir)
    model.backbone.set_attn_implementation(attention)
    mask = block_mask_kind(model.backbone)
    assert mask == {"sdpa": "bool", "eager": "additive"}[attention]
    groups = [*random_groups(seed=4), failed_group()]
    batch = pack_groups(groups, PAD)
    weights = torch.linspace(-1, 1, batch.response_mask.numel()).view_as(batch.response_mask)

    per_sample = model(batch)
    (per_sample * weights).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    packed = model(batch, groups, mask)
    (packed * weights).sum().backward()

    torch.testing.assert_close(packed, per_sample, atol=1e-5, rtol=1e-5)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_value_of_a_token_is_the_head_on_the_hidden_state_before_it(model_dir):
    model = local_model(model_dir)
    g = random_groups(num_groups=1, n=1, seed=3)[0]
    batch = pack_groups([g], PAD)
    with torch.no_grad():
        hidden = model.backbone(input_ids=batch.input_ids).last_hidden_state[0]
        values = model(batch)[0]
    p = g.prompt_ids.numel()
    for t in range(int(g.response_mask.sum())):
        expected = hidden[p - 1 + t] @ model.head.weight[0].detach() + model.head.bias[0].detach()
        assert float(values[t]) == pytest.approx(float(expected), abs=1e-5)


def test_gradient_flows_only_through_valid_tokens(model_dir):
    model = local_model(model_dir)
    groups = random_groups(seed=1)
    batch = pack_groups(groups, PAD)
    mask = batch.response_mask
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))

    def grads(w: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        (model(batch) * w).sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    masked = grads(torch.where(mask, weights, torch.zeros_like(weights)))
    loud = grads(torch.where(mask, weights, torch.full_like(weights, 1e6)))  # huge weights off the mask
    assert masked.keys() == loud.keys()
    for k in masked:
        torch.testing.assert_close(loud[k], masked[k], atol=1e-6, rtol=1e-5)
    # The head's gradient by hand: d(sum w_t v_t)/d(head) = sum over valid tokens of w_t * h_t (and w_t).
    with torch.no_grad():
        hidden = model.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    expected_w, expected_b = torch.zeros(hidden.shape[-1]), 0.0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                expected_w += weights[b, t] * hidden[b, int(batch.prompt_lens[b]) - 1 + t]
                expected_b += float(weights[b, t])
    torch.testing.assert_close(masked["head.weight"][0], expected_w, atol=1e-4, rtol=1e-4)
    assert float(masked["head.bias"][0]) == pytest.approx(expected_b, abs=1e-4)


# ---- GAE targets by hand -----------------------------------------------------------------------------


def two_samples(values: list[float] | None, old: list[float], ref: list[float] | None = None) -> Group:
    """One prompt, two samples: a 2-token answer with reward 1 and a 1-token answer with reward 0."""
    return Group(
        prompt_ids=torch.tensor([1, 2]),
        response_ids=torch.tensor([[5, 6], [7, PAD]]),
        response_mask=torch.tensor([[True, True], [True, False]]),
        logprobs=torch.tensor([old[:2], [old[2], 0.0]]),
        texts=("", ""),
        truncated=(False, False),
        failures=("", ""),
        problem=None,
        version=0,
        rewards=torch.tensor([1.0, 0.0]),
        ref_logprobs=None if ref is None else torch.tensor([ref[:2], [ref[2], 0.0]]),
        values=None if values is None else torch.tensor([values[:2], [values[2], 0.0]]),
    )


def test_gae_by_hand():
    # gamma 1, lam 0.5, values [0.5, 0.25] and [0.5]:
    #   first sample: delta_1 = 1 - 0.25 = 0.75, delta_0 = 0.25 - 0.5 = -0.25, A = [-0.25 + 0.5 * 0.75, 0.75]
    #   second sample: delta_0 = 0 - 0.5, A = [-0.5]. Returns A + V: [0.625, 1.0] and [0.0].
    #   Whitened: [0.125, 0.75, -0.5] has mean 0.125 and std 0.625 * sqrt(2/3), so [0, sqrt(1.5), -sqrt(1.5)].
    g = two_samples([0.5, 0.25, 0.5], [-1.0, -1.0, -1.0])
    batch = pack_groups([g], PAD)
    raw, returns = gae_targets([g], batch, gamma=1.0, lam=0.5, whiten=False)
    assert raw.tolist() == [pytest.approx([0.125, 0.75]), pytest.approx([-0.5, 0.0])]
    assert returns.tolist() == [pytest.approx([0.625, 1.0]), pytest.approx([0.0, 0.0])]
    s = math.sqrt(1.5)
    adv = gae_advantages([g], batch, gamma=1.0, lam=0.5)
    assert adv.tolist() == [pytest.approx([0.0, s], abs=1e-5), pytest.approx([-s, 0.0], abs=1e-5)]


def test_gae_with_the_kl_penalty_in_the_reward_by_hand():
    # k1 = old - ref = [1, 0] and [0]; kl_coef 0.5 makes the token rewards [-0.5, 1] and [0]:
    #   delta_1 = 0.75, delta_0 = -0.5 + 0.25 - 0.5 = -0.75, A = [-0.75 + 0.375, 0.75], returns [0.125, 1.0].
    g = two_samples([0.5, 0.25, 0.5], [-1.0, -2.0, -3.0], ref=[-2.0, -2.0, -3.0])
    batch = pack_groups([g], PAD)
    raw, returns = gae_targets([g], batch, kl_coef=0.5, gamma=1.0, lam=0.5, whiten=False)
    assert raw.tolist() == [pytest.approx([-0.375, 0.75]), pytest.approx([-0.5, 0.0])]
    assert returns.tolist() == [pytest.approx([0.125, 1.0]), pytest.approx([0.0, 0.0])]
    no_ref = two_samples([0.0] * 3, [0.0] * 3)
    with pytest.raises(ValueError, match="reference log-probs"):
        gae_targets([no_ref], pack_groups([no_ref], PAD), kl_coef=0.5)
    no_values = two_samples(None, [0.0] * 3)
    with pytest.raises(ValueError, match="no critic values"):
        gae_targets([no_values], pack_groups([no_values], PAD))


def test_config_errors_name_the_value_and_a_fix():
    with pytest.raises(ConfigError, match=r"critic.epochs=0 .* try 1"):
        CriticConfig(epochs=0)
    with pytest.raises(ConfigError, match=r"critic.lam=1.5"):
        CriticConfig(lam=1.5)
    with pytest.raises(ConfigError, match="null"):
        CriticConfig(value_clip=-0.1)


# ---- the worker ----------------------------------------------------------------------------------------

# Adam moves a weight by ~lr whatever the rounding of a ~1e-8 gradient: a small lr keeps that below 1e-5.
CFG = CriticConfig(lr=1e-4, head_init_std=0.1, max_grad_norm=1.0, value_clip=0.2)


@pytest.fixture(scope="module")
def critic(cluster, model_dir, tmp_path_factory):
    """Two critic ranks on both slots (one model, gradients all-reduced), shared by this module's tests."""
    group = CriticWorker.launch(cluster, [0, 1], CFG, str(model_dir), name="critic-test")
    init = str(tmp_path_factory.mktemp("critic") / "init")
    group.call(CriticWorker.save_checkpoint, init).wait()
    yield group, init
    group.kill()
    cluster.groups.remove(group)


def stream(name: str, groups: list[Group]) -> tuple[Channel, Channel]:
    inp, out = Channel(f"{name}/in"), Channel(f"{name}/out")
    for g in groups:
        inp.put(g)
    return inp, out


def train_step(critic, name: str, groups: list[Group], micro: int = 1, kl_coef: float = 0.0):
    inp, out = stream(name, groups)
    metrics = critic.call(CriticWorker.train, inp, out, len(groups), kl_coef, micro).wait()
    valued = sorted((out.get(timeout=30) for _ in groups), key=lambda g: g.index)
    return metrics, valued


def test_worker_attaches_values_and_its_returns_are_the_hand_computed_ones(critic, model_dir):
    group, init = critic
    group.call(CriticWorker.load_checkpoint, init).wait()
    g = two_samples(None, [-1.0, -1.0, -1.0])
    metrics, valued = train_step(group, "gae/worker", [g, failed_group()], micro=2)
    out = valued[0]
    assert out.values is not None and out.values.shape == g.logprobs.shape
    assert float(out.values[1, 1]) == 0.0 and torch.all(valued[1].values == 0)
    # The values are the initial model's: the step comes after they were recorded.
    model = local_model(model_dir)
    model.load_state_dict(torch.load(f"{init}/critic.pt", weights_only=False)["model"])
    with torch.no_grad():
        expected = model(pack_groups([g], PAD))
    torch.testing.assert_close(out.values, expected, atol=1e-5, rtol=1e-5)
    # Returns by hand from the attached values (gamma 1, lam 0.95): R_1 = 1, R_0 = v_1 + 0.95 (1 - v_1), R'_0 = 0.
    (a0, a1), b0 = out.values[0].tolist(), float(out.values[1, 0])
    r0 = a1 + 0.95 * (1 - a1)
    returns, values = [r0, 1.0, 0.0], [a0, a1, b0]
    m = merge(metrics)
    assert m["critic/returns"] == pytest.approx(sum(returns) / 3, abs=1e-5)
    assert m["critic/values"] == pytest.approx(sum(values) / 3, abs=1e-5)
    assert m["critic/value_loss"] == pytest.approx(
        sum(0.5 * (v - r) ** 2 for v, r in zip(values, returns, strict=True)) / 3, abs=1e-5
    )
    assert m["critic/groups"] == 2 and m["critic/version"] == 1
    # The actor's hook on the worker's output: the same targets, whitened.
    adv = gae_advantages([out], pack_groups([out], PAD), gamma=1.0, lam=0.95)
    raw = torch.tensor([r0 - a0, 1.0 - a1, -b0])
    whitened = (raw - raw.mean()) / raw.std(correction=0)
    assert adv[pack_groups([out], PAD).response_mask].tolist() == pytest.approx(whitened.tolist(), abs=1e-4)


def merge(metrics: list[dict[str, float]]) -> dict[str, float]:
    from rlinf.metrics import merge_rank_metrics

    return merge_rank_metrics(metrics)


def test_micro_batches_over_two_ranks_equal_one_full_batch_step(critic, model_dir):
    group, init = critic
    group.call(CriticWorker.load_checkpoint, init).wait()
    groups = random_groups(seed=4)
    # One AdamW step on the full batch, here.
    model = local_model(model_dir)
    model.load_state_dict(torch.load(f"{init}/critic.pt", weights_only=False)["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=CFG.lr, betas=CFG.betas, weight_decay=CFG.weight_decay)
    batch = pack_groups(groups, PAD)
    values = model(batch)
    with_values = attach_values(groups, values.detach())
    _, returns = gae_targets(with_values, batch, gamma=CFG.gamma, lam=CFG.lam, whiten=False)
    loss, _ = value_loss(values, pack_values(with_values, batch), returns, batch.response_mask, clip=CFG.value_clip)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CFG.max_grad_norm)
    opt.step()
    full = model.state_dict()
    # The worker: two ranks, two groups each, one per micro-batch.
    metrics, _ = train_step(group, "acc/one", groups, micro=1)
    assert merge(metrics)["critic/value_loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    for rank in (0, 1):
        trained = group.on(rank).call(CriticWorker.state_dict).wait()[0]
        moved = max(float((trained[k] - v).abs().max()) for k, v in full.items())
        assert moved < 1e-5, (rank, moved)


def test_value_loss_decreases_on_a_fixed_target(critic):
    group, init = critic
    group.call(CriticWorker.load_checkpoint, init).wait()
    groups = random_groups(seed=5)
    losses = [merge(train_step(group, f"fit/{i}", groups, micro=2)[0])["critic/value_loss"] for i in range(12)]
    assert losses[-1] < 0.3 * losses[0], losses
    assert group.call(CriticWorker.get_version).wait() == [12, 12]


def test_later_epochs_reuse_the_batch_and_the_clip_acts(cluster, fresh_groups, model_dir):
    cfg = CriticConfig(lr=1e-3, head_init_std=0.1, epochs=4, value_clip=0.01)
    one = CriticWorker.launch(cluster, [0], cfg, str(model_dir), name="critic-epochs")
    groups = random_groups(seed=6)
    m1, _ = train_step(one, "epochs/1", groups, micro=2)
    m2, _ = train_step(one, "epochs/2", groups, micro=2)
    assert m1[0]["critic/version"] == 4 and m2[0]["critic/version"] == 8
    assert m1[0]["critic/clip_fraction"] > 0  # epochs 2-4 move values more than 0.01 from the recorded ones
    assert m2[0]["critic/value_loss"] < m1[0]["critic/value_loss"]


def test_checkpoint_round_trip_restores_weights_optimizer_and_version(critic, tmp_path):
    group, init = critic
    group.call(CriticWorker.load_checkpoint, init).wait()
    train_step(group, "ckpt/warm", random_groups(seed=7))  # optimizer state worth saving
    saved = str(tmp_path / "saved")
    group.call(CriticWorker.save_checkpoint, saved).wait()
    before = group.on(0).call(CriticWorker.state_dict).wait()[0]
    train_step(group, "ckpt/a", random_groups(seed=8))
    after_a = group.on(0).call(CriticWorker.state_dict).wait()[0]
    assert any(not torch.equal(after_a[k], before[k]) for k in before)
    assert group.call(CriticWorker.load_checkpoint, saved).wait() == [1, 1]
    restored = group.on(1).call(CriticWorker.state_dict).wait()[0]
    assert all(torch.equal(restored[k], before[k]) for k in before)
    train_step(group, "ckpt/b", random_groups(seed=8))  # same step again: same result needs the same Adam state
    after_b = group.on(0).call(CriticWorker.state_dict).wait()[0]
    assert max(float((after_b[k] - v).abs().max()) for k, v in after_a.items()) < 1e-6
    with pytest.raises(Exception, match="save_checkpoint"):
        group.call(CriticWorker.load_checkpoint, str(tmp_path / "nothing")).wait()


def test_values_stage_attaches_values_without_training(critic):
    group, init = critic
    group.call(CriticWorker.load_checkpoint, init).wait()
    groups = random_groups(seed=9)
    inp, out = stream("values/only", groups)
    metrics = group.call(CriticWorker.values, inp, out, len(groups)).wait()
    assert merge(metrics)["critic/groups"] == len(groups)
    valued = sorted((out.get(timeout=30) for _ in groups), key=lambda g: g.index)
    for g in valued:
        assert g.values is not None and torch.all(g.values[~g.response_mask] == 0)
    assert group.call(CriticWorker.get_version).wait() == [0, 0]


@pytest.mark.slow
def test_critic_learns_a_content_dependent_value_on_fresh_batches(cluster, fresh_groups, model_dir):
    """Reward = share of response tokens from the lower half of the vocabulary: the values must read the text.

    Every step brings new random responses, so the explained variance measured before each update
    only rises if the critic generalises (the batch mean alone explains nothing).
    """
    cfg = CriticConfig(lr=3e-3, micro_batch_groups=8)
    one = CriticWorker.launch(cluster, [0], cfg, str(model_dir), name="critic-fit")
    gen = torch.Generator().manual_seed(1)
    vocab, explained = 200, []
    for step in range(120):
        groups = []
        for i in range(8):
            ids = torch.randint(5, vocab, (4, 8), generator=gen)
            rewards = (ids < vocab // 2).float().mean(dim=1)
            prompt = torch.randint(5, vocab, (4,), generator=gen)
            ones = torch.ones((4, 8), dtype=torch.bool)
            groups.append(
                Group(prompt, ids, ones, torch.zeros((4, 8)), ("",) * 4, (False,) * 4, ("",) * 4, None, 0, i, rewards)
            )
        metrics, _ = train_step(one, f"fit-fresh/{step}", groups, micro=8)
        explained.append(metrics[0]["critic/explained_variance"])
    first, last = sum(explained[:10]) / 10, sum(explained[-20:]) / 20
    assert first < 0.05 and last > 0.1, [round(e, 2) for e in explained]
