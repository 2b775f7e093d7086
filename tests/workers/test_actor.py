"""ActorWorker: micro-batch accumulation equals the full batch (any order, any split, elastic arrivals,
two DDP ranks); pushed weights change the rollout's outputs and bump its version; checkpoints restore
training state; offload between steps frees gradients and shows in the switch times; LoRA trains only
adapters and pushes merged weights; bad LoRA targets and a missing DeepSpeed fail with a fix."""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest
import torch

from rlinf import Channel, Placement, Worker
from rlinf.errors import ConfigError
from rlinf.models import build_tiny_model
from rlinf.workers.actor import ActorWorker
from rlinf.workers.config import ActorConfig, RolloutConfig
from rlinf.workers.inference import pack_groups, token_logprobs
from rlinf.workers.lora import add_lora
from rlinf.workers.rollout import Group, Prompt, RolloutWorker, load_model
from rlinf.workers.zero import require_deepspeed


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
CFG = ActorConfig(lr=1e-4, max_grad_norm=1.0, micro_batch_groups=3, min_micro_batch_groups=1)


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
    assert rollout.call(RolloutWorker.get_version).wait() == [1]  # loaded without a missing or extra name
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


def test_elastic_micro_batches_take_what_has_arrived_and_equal_one_full_batch(workers, model_dir):
    """Groups arrive unevenly (5, then 1, then 2); each pass takes 1..3 of what is there; same step."""
    actor, _, init = workers
    groups = scored_groups(model_dir, num_groups=8, seed=4)
    full = reference_step(model_dir, groups, CFG)
    actor.call(ActorWorker.load_checkpoint, init).wait()
    ch = Channel("elastic/train")
    for g in groups[:5]:
        ch.put(g)
    handle = actor.call(ActorWorker.train, ch, len(groups))  # micro_batch_groups=0: elastic, 1..3 per pass
    time.sleep(1.0)
    ch.put(groups[5])
    time.sleep(1.0)
    ch.put_many(groups[6:])
    metrics = handle.wait(timeout=120)
    assert [m["actor/groups"] for m in metrics] == [4, 4]
    passes = [m["actor/micro_batches"] for m in metrics]
    assert all(p >= 2 for p in passes), passes  # at most 3 groups per pass, 4 per rank
    assert sum(passes) < len(groups), passes  # some pass took several groups that had already arrived
    assert max(m["actor/micro_batch_max"] for m in metrics) == 3  # the first pull found 5 waiting
    trained = actor.on(0).call(ActorWorker.state_dict).wait()[0]
    moved = max(float((trained[k] - v).abs().max()) for k, v in full.items())
    assert moved < 1e-5, moved


class Holder(Worker):
    """Another component on the actor's device: taking the device lock makes the actor offload."""

    def hold(self, seconds: float) -> None:
        with self.device_lock():
            time.sleep(seconds)


def test_offload_between_steps_frees_grads_keeps_optimizer_and_is_timed(fresh_groups, model_dir):
    cluster = fresh_groups
    place = Placement.collocated(["actor", "holder"], len(cluster.devices), devices="0")
    actor = ActorWorker.launch(cluster, place, CFG, str(model_dir), 1.0, name="actor")
    holder = Holder.launch(cluster, place, name="holder")
    first, second = scored_groups(model_dir, 2, seed=5), scored_groups(model_dir, 2, seed=6)
    train_on(actor, "offload/one", first, micro=1)
    assert actor.call(ActorWorker.memory_state).wait()[0]["grad_tensors"] > 0
    holder.call(Holder.hold, 0.05).wait()  # the actor hands its device over between steps
    state = actor.call(ActorWorker.memory_state).wait()[0]
    assert state["grad_tensors"] == 0 and state["grad_bytes"] == 0
    assert state["optimizer_tensors"] > 0  # AdamW moments stay: they are needed by the next step

    # Mid-step hand-over: the half-accumulated gradients must survive it.
    ch = Channel("offload/two")
    ch.put(second[0])
    handle = actor.call(ActorWorker.train, ch, 2, 1)
    time.sleep(0.5)
    holder.call(Holder.hold, 0.05).wait()
    ch.put(second[1])
    handle.wait(timeout=120)
    trained = actor.call(ActorWorker.state_dict).wait()[0]
    expected = reference_steps(model_dir, [first, second], CFG)
    moved = max(float((trained[k] - v).abs().max()) for k, v in expected.items())
    assert moved < 1e-5, moved

    # The actor's hooks run inside the timed hand-overs: its onloads within its own switches, its
    # offloads within the holder's (the component taking the device waits for them).
    mine = [s for t in actor.collect_trace() for s in t.spans]
    theirs = [s for t in holder.collect_trace() for s in t.spans]
    onloads, offloads = [s for s in mine if s.name == "onload"], [s for s in mine if s.name == "offload"]
    assert len(onloads) >= 2 and len(offloads) >= 2

    def inside(span, switches) -> bool:
        return any(w.start <= span.start and span.end <= w.end for w in switches if w.name == "switch")

    assert all(inside(s, mine) for s in onloads) and all(inside(s, theirs) for s in offloads)
    switches = actor.switch_times()[0]
    assert len(switches) == len([s for s in mine if s.name == "switch"]) >= 2


def reference_steps(model_dir, batches: list[list[Group]], cfg: ActorConfig) -> dict[str, torch.Tensor]:
    """AdamW steps, one per batch, each on its full batch with the token-mean PPO loss."""
    from rlinf.algorithms import group_advantage, ppo_clip_loss

    model, tok = load_model(model_dir, "float32", torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    for groups in batches:
        opt.zero_grad()
        batch = pack_groups(groups, int(tok.pad_token_id))
        adv = torch.cat([group_advantage(g.rewards, g.size) for g in groups])
        loss, _ = ppo_clip_loss(
            token_logprobs(model, batch, 1.0), batch.old_logprobs, adv, batch.response_mask, aggregation="token-mean"
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


LORA = ActorConfig(lr=1e-2, lora_rank=4, lora_alpha=8, micro_batch_groups=2)


def test_lora_trains_only_adapters_and_pushes_merged_weights(workers, fresh_groups, model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    _, rollout, _ = workers
    actor = ActorWorker.launch(fresh_groups, [0], LORA, str(model_dir), 1.0, name="actor-lora")

    # Adapters on q, k, v, o of each layer: rank * (in + out) parameters each.
    c = AutoConfig.from_pretrained(model_dir)
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = LORA.lora_rank * ((c.hidden_size * 2) * 2 + (c.hidden_size + kv) * 2)
    counts = actor.call(ActorWorker.parameter_counts).wait()[0]
    assert counts["trainable"] == counts["in_optimizer"] == per_layer * c.num_hidden_layers
    assert counts["total"] > 10 * counts["trainable"]

    before = actor.call(ActorWorker.model_state).wait()[0]
    train_on(actor, "lora/train", scored_groups(model_dir, seed=7), micro=2)
    after = actor.call(ActorWorker.model_state).wait()[0]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed), sorted(changed)[:4]
    assert any(".lora_B." in k for k in changed)  # B starts at zero, so the update is not a no-op

    # What the rollout gets: the base weights with B @ A folded in, under the base model's names.
    pushed = actor.call(ActorWorker.state_dict).wait()[0]
    ckpt = tmp_path / "ckpt"
    actor.call(ActorWorker.save_checkpoint, str(ckpt)).wait()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), ckpt / "adapter")
    reference = merged.merge_and_unload().state_dict()
    assert pushed.keys() == reference.keys()
    assert max(float((pushed[k] - reference[k]).abs().max()) for k in pushed) < 1e-6
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert any(not torch.equal(pushed[k], base[k]) for k in pushed if "q_proj" in k)
    assert actor.call(ActorWorker.push_weights, rollout).wait()[0]["time/weight_sync"] >= 0
    assert rollout.call(RolloutWorker.get_version).wait() == [1]  # loaded without a missing or extra name

    saved = AutoModelForCausalLM.from_pretrained(ckpt / "model").state_dict()  # model.path accepts this
    assert max(float((saved[k] - reference[k]).abs().max()) for k in saved) < 1e-6
    assert (ckpt / "adapter" / "adapter_config.json").is_file()
    assert actor.call(ActorWorker.load_checkpoint, str(ckpt)).wait() == [1]


def test_lora_on_a_model_without_the_target_modules_names_them(model_dir):
    model, _ = load_model(model_dir, "float32", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"lora_target_modules=\['query'\].*q_proj"):
        add_lora(model, ActorConfig(lora_rank=4, lora_target_modules=("query",)))


def test_backend_deepspeed_without_the_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"actor.backend='deepspeed'.*pip install.*deepspeed.*actor.backend=torch"):
        require_deepspeed()


def test_bfloat16_autocast_keeps_float32_weights_and_takes_about_the_float32_step(fresh_groups, model_dir):
    cfg = replace(CFG, autocast="bfloat16", lr=1e-3)
    actor = ActorWorker.launch(fresh_groups, [0], cfg, str(model_dir), 1.0, name="actor-bf16")
    groups = scored_groups(model_dir, seed=4)
    init = actor.call(ActorWorker.state_dict).wait()[0]
    trained = train_on(actor, "acc/bf16", groups, 2)
    full = reference_step(model_dir, groups, replace(cfg, autocast="none"))
    assert all(v.dtype == torch.float32 for v in trained.values())
    # the same direction as the float32 step: Adam's first step moves each weight by about lr * sign(grad),
    # so compare the signs of the two updates over all weights that moved noticeably
    ups = [(trained[k] - init[k]).flatten() for k in init]
    refs = [(full[k] - init[k]).flatten() for k in init]
    up, ref = torch.cat(ups), torch.cat(refs)
    moved = ref.abs() > 0.5 * cfg.lr
    agree = float((up[moved].sign() == ref[moved].sign()).float().mean())
    assert moved.sum() > 1000 and agree > 0.8, agree


def test_attention_kernel_is_eager_only_for_bfloat16_on_cpu():
    assert ActorConfig().attention_kernel("cpu") == "sdpa"
    assert ActorConfig(autocast="bfloat16").attention_kernel("cpu") == "eager"
    assert ActorConfig(autocast="bfloat16").attention_kernel("cuda") == "sdpa"
    assert ActorConfig(autocast="bfloat16", attention="sdpa").attention_kernel("cpu") == "sdpa"
    assert ActorConfig(attention="eager").attention_kernel("cuda") == "eager"
    with pytest.raises(ConfigError, match=r"actor.attention='flash'.*'auto'"):
        ActorConfig(attention="flash")  # type: ignore[arg-type]


def test_actor_config_rejects_bad_elastic_and_lora_values():
    with pytest.raises(ConfigError, match="autocast='float16'"):
        ActorConfig(autocast="float16")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="min_micro_batch_groups=3"):
        ActorConfig(micro_batch_groups=2, min_micro_batch_groups=3)
    with pytest.raises(ConfigError, match="lora_rank=-1"):
        ActorConfig(lora_rank=-1)
    with pytest.raises(ConfigError, match=r"lora_dropout=1\.5"):
        ActorConfig(lora_rank=4, lora_dropout=1.5)


@pytest.mark.slow
@pytest.mark.parametrize(("ranks", "stage"), [(1, 2), (2, 1), (2, 2), (2, 3)])
def test_deepspeed_step_equals_the_torch_backend(fresh_groups, model_dir, ranks, stage):
    """One ZeRO step from uneven elastic arrivals gives the torch backend's parameters (ranks in lock step)."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (make setup installs it)")
    cfg = ActorConfig(lr=1e-4, max_grad_norm=1.0, micro_batch_groups=3, backend="deepspeed", zero_stage=stage)
    actor = ActorWorker.launch(fresh_groups, list(range(ranks)), cfg, str(model_dir), 1.0, name=f"actor-ds{stage}")
    groups = scored_groups(model_dir, num_groups=6, seed=8)
    ch = Channel(f"ds/{ranks}/{stage}")
    ch.put_many(groups[:4])
    handle = actor.call(ActorWorker.train, ch, len(groups))
    time.sleep(1.0)
    ch.put_many(groups[4:])
    metrics = handle.wait(timeout=600)
    assert sum(m["actor/groups"] for m in metrics) == len(groups)
    trained = actor.call(ActorWorker.state_dict).wait()[0]  # every rank: ZeRO-3 gathers collectively
    full = reference_step(model_dir, groups, cfg)
    moved = max(float((trained[k] - v).abs().max()) for k, v in full.items())
    assert moved < 1e-5, moved
    assert metrics[0]["actor/grad_norm"] == pytest.approx(reference_grad_norm(model_dir, groups), rel=1e-4)


def reference_grad_norm(model_dir, groups: list[Group]) -> float:
    """The global gradient norm (before clipping) of the full-batch token-mean PPO loss."""
    from rlinf.algorithms import group_advantage, ppo_clip_loss

    model, tok = load_model(model_dir, "float32", torch.device("cpu"))
    batch = pack_groups(groups, int(tok.pad_token_id))
    adv = torch.cat([group_advantage(g.rewards, g.size) for g in groups])
    loss, _ = ppo_clip_loss(
        token_logprobs(model, batch, 1.0), batch.old_logprobs, adv, batch.response_mask, aggregation="token-mean"
    )
    loss.backward()
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
