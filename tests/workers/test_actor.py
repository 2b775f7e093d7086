"""ActorWorker: micro-batch accumulation equals the full batch (any order, any split, two DDP ranks);
pushed weights change the rollout's outputs and bump its version; checkpoints restore training state."""

from __future__ import annotations

import random

import pytest
import torch

from rlinf import Channel
from rlinf.models import build_tiny_model
from rlinf.workers.actor import ActorWorker
from rlinf.workers.config import ActorConfig, RolloutConfig
from rlinf.workers.inference import pack_groups, token_logprobs
from rlinf.workers.rollout import Group, Prompt, RolloutWorker, load_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-nano", size="nano", seed=0)


def scored_groups(model_dir, num_groups: int = 4, n: int = 3, seed: int = 0) -> list[Group]:
    """On-policy groups of random responses of different lengths, with old log-probs from the model."""
    model, tok = load_model(model_dir, "float32", torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    groups = []
    for i in range(num_groups):
        prompt = torch.randint(5, vocab, (4 + i,), generator=gen)
        lengths = torch.randint(1, 7, (n,), generator=gen)
        ids = torch.full((n, 6), int(tok.pad_token_id), dtype=torch.long)
        mask = torch.zeros((n, 6), dtype=torch.bool)
        for j, length in enumerate(lengths.tolist()):
            ids[j, :length] = torch.randint(5, vocab, (length,), generator=gen)
            mask[j, :length] = True
        g = Group(prompt, ids, mask, torch.zeros((n, 6)), ("",) * n, (False,) * n, ("",) * n, None, 0, i)
        with torch.no_grad():
            old = token_logprobs(model, pack_groups([g], int(tok.pad_token_id)), 1.0)
        logp = torch.zeros((n, 6))
        logp[:, : old.shape[1]] = old
        rewards = torch.rand(n, generator=gen)
        groups.append(Group(prompt, ids, mask, logp, ("",) * n, (False,) * n, ("",) * n, None, 0, i, rewards))
    return groups


def reference_step(model_dir, groups: list[Group], cfg: ActorConfig) -> dict[str, torch.Tensor]:
    """One AdamW step on the full batch, computed here with the plain token-mean PPO loss."""
    from rlinf.algorithms import group_advantage, ppo_clip_loss

    torch.manual_seed(cfg.seed)
    model, tok = load_model(model_dir, "float32", torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    batch = pack_groups(groups, int(tok.pad_token_id))
    adv = torch.cat([group_advantage(g.rewards, g.size) for g in groups])
    loss, _ = ppo_clip_loss(
        token_logprobs(model, batch, 1.0), batch.old_logprobs, adv, batch.response_mask, aggregation="token-mean"
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_on(actor, name: str, groups: list[Group], micro: int) -> dict[str, torch.Tensor]:
    ch = Channel(name)
    for g in groups:
        ch.put(g)
    actor.call(ActorWorker.train, ch, len(groups), micro).wait()
    return actor.on(0).call(ActorWorker.state_dict).wait()[0]


# Adam divides by sqrt(v) + eps, so a gradient of ~1e-8 moves its weight by ~lr whatever its rounding:
# a small lr keeps that rounding far below the 1e-5 tolerance.
CFG = ActorConfig(lr=1e-4, max_grad_norm=1.0)


@pytest.fixture(scope="module")
def workers(cluster, model_dir, tmp_path_factory):
    """Two DDP actor ranks on both slots and a rollout on slot 1, shared by the tests of this module."""
    actor = ActorWorker.launch(cluster, [0, 1], CFG, str(model_dir), 1.0, name="actor-test")
    rollout_cfg = RolloutConfig(group_size=2, batch_prompts=2, max_new_tokens=8, eval_temperature=0.0)
    rollout = RolloutWorker.launch(cluster, [1], rollout_cfg, str(model_dir), name="rollout-push")
    init = str(tmp_path_factory.mktemp("actor") / "init")
    actor.call(ActorWorker.save_checkpoint, init).wait()
    yield actor, rollout, init
    for g in (actor, rollout):
        g.kill()
        cluster.groups.remove(g)


def test_micro_batches_in_any_order_and_split_over_ranks_equal_one_full_batch(workers, model_dir):
    actor, _, init = workers
    groups = scored_groups(model_dir)
    full = reference_step(model_dir, groups, CFG)
    shuffled = groups[:]
    random.Random(1).shuffle(shuffled)
    for name, micro in (("acc/one", 1), ("acc/three", 3)):  # 2 per rank as 1+1; 2 per rank as one batch of 2
        assert actor.call(ActorWorker.load_checkpoint, init).wait() == [0, 0]
        trained = train_on(actor, name, shuffled, micro)
        assert actor.call(ActorWorker.get_version).wait() == [1, 1]
        moved = max(float((trained[k] - v).abs().max()) for k, v in full.items())
        assert moved < 1e-5, (name, moved)


def test_checkpoint_restores_weights(workers, model_dir):
    actor, _, init = workers
    actor.call(ActorWorker.load_checkpoint, init).wait()
    before = actor.on(0).call(ActorWorker.state_dict).wait()[0]
    after = train_on(actor, "ckpt/train", scored_groups(model_dir, seed=2), micro=2)
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert actor.call(ActorWorker.load_checkpoint, init).wait() == [0, 0]
    restored = actor.on(1).call(ActorWorker.state_dict).wait()[0]
    assert all(torch.equal(restored[k], before[k]) for k in before)


def test_push_weights_changes_rollout_outputs_and_bumps_version(workers, model_dir):
    actor, rollout, init = workers
    actor.call(ActorWorker.load_checkpoint, init).wait()
    actor.call(ActorWorker.push_weights, rollout).wait()
    prompts, out = Channel("push/prompts", 0), Channel("push/out")

    def greedy() -> Group:
        prompts.put(Prompt("What is 3 + 4?", problem=None))
        rollout.call(RolloutWorker.generate, prompts, out, 1, True).wait()
        item = out.get_item(timeout=30)
        assert item.meta.version == item.payload.version
        return item.payload

    first = greedy()
    assert first.version == 0
    train_on(actor, "push/train", scored_groups(model_dir, seed=1), micro=2)
    actor.call(ActorWorker.push_weights, rollout).wait()
    assert rollout.call(RolloutWorker.get_version).wait() == [1]
    second = greedy()
    assert second.version == 1
    changed_tokens = not torch.equal(first.response_ids, second.response_ids)
    n = min(first.logprobs.shape[1], second.logprobs.shape[1])
    changed_logprobs = not torch.allclose(first.logprobs[:, :n], second.logprobs[:, :n], atol=1e-4)
    assert changed_tokens or changed_logprobs


def test_failed_samples_carry_no_gradient(workers, model_dir):
    actor, _, init = workers
    actor.call(ActorWorker.load_checkpoint, init).wait()
    ok = scored_groups(model_dir, num_groups=2, seed=3)
    n = ok[0].size
    failed = Group(
        torch.tensor([5]),
        torch.zeros((n, 1), dtype=torch.long),
        torch.zeros((n, 1), dtype=torch.bool),
        torch.zeros((n, 1)),
        ("",) * n,
        (False,) * n,
        ("prompt too long",) * n,
        None,
        0,
        9,
        torch.zeros(n),
    )
    ch = Channel("failed/train")
    for g in (ok[0], failed, ok[1]):
        ch.put(g)
    metrics = actor.call(ActorWorker.train, ch, 3, 1).wait()
    expected = sum(int(g.response_mask.sum()) for g in ok)
    assert [m["actor/batch_tokens"] for m in metrics] == [expected, expected]
    assert actor.call(ActorWorker.get_version).wait() == [1, 1]
