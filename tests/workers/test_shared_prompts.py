"""A group's prompt computed once for all its samples: the actor's log-probs and gradients, and the
hf engine's samples, equal those of computing the prompt once per sample."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlinf.models import build_tiny_model
from rlinf.workers import inference
from rlinf.workers.inference import (
    block_mask_kind,
    group_token_logprobs,
    length_buckets,
    pack_groups,
    token_logprobs,
)
from rlinf.workers.rollout import Group, HFEngine, load_model


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model_dir(request, tmp_path_factory):
    arch = request.param
    return build_tiny_model(tmp_path_factory.getbasetemp() / f"tiny-{arch}", arch=arch, size="nano", seed=0)


def _groups(vocab: int, pad: int) -> list[Group]:
    """Prompts of different lengths; responses of different lengths, one failed (empty), one group of one."""
    gen = torch.Generator().manual_seed(3)
    groups = []
    for plen, lengths in [(5, [4, 0, 2]), (9, [6, 6]), (1, [3]), (3, [1, 2, 3, 5])]:
        n, r = len(lengths), max(lengths)
        mask = torch.arange(r)[None] < torch.tensor(lengths)[:, None]
        resp = torch.where(mask, torch.randint(3, vocab, (n, r), generator=gen), pad)
        prompt = torch.randint(3, vocab, (plen,), generator=gen)
        groups.append(Group(prompt, resp, mask, torch.zeros(n, r), ("",) * n, (False,) * n, ("",) * n, None, 0))
    return groups


@pytest.mark.parametrize("layout", ["packed", "cache"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_group_logprobs_and_gradients_equal_the_per_sample_ones(model_dir, attention, layout):
    model, tok = load_model(model_dir, "float32", torch.device("cpu"), attention)
    assert model.config._attn_implementation == attention
    mask = block_mask_kind(model) if layout == "packed" else None
    assert layout == "cache" or mask == {"sdpa": "bool", "eager": "additive"}[attention]
    groups = _groups(int(model.config.vocab_size), int(tok.pad_token_id))
    batch = pack_groups(groups, int(tok.pad_token_id))

    packed = token_logprobs(model, batch, 0.7)
    (packed * torch.linspace(-1, 1, packed.numel()).view_as(packed)).sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    shared = group_token_logprobs(model, groups, batch, 0.7, mask)
    (shared * torch.linspace(-1, 1, shared.numel()).view_as(shared)).sum().backward()

    assert shared.shape == packed.shape
    assert (shared[~batch.response_mask] == 0).all()
    torch.testing.assert_close(shared, packed, atol=1e-5, rtol=1e-5)
    for p, g in zip(model.parameters(), packed_grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_groups_of_one_sample_take_the_packed_path(model_dir):
    model, tok = load_model(model_dir, "float32", torch.device("cpu"))
    groups = [g for g in _groups(int(model.config.vocab_size), int(tok.pad_token_id)) if g.size == 1]
    batch = pack_groups(groups, int(tok.pad_token_id))
    calls = []
    counted = lambda **kw: calls.append(kw) or model(**kw)  # noqa: E731
    with torch.no_grad():
        out = group_token_logprobs(counted, groups, batch, 1.0)
    assert len(calls) == 1 and "past_key_values" not in calls[0]
    torch.testing.assert_close(out, token_logprobs(model, batch, 1.0))


def _shared_pass_shapes(model, groups: list[Group], pad: int, block_mask: str | None = None) -> list[tuple[int, ...]]:
    """The ``input_ids`` shapes of the forward passes ``group_token_logprobs`` makes; checks its log-probs
    against the per-sample layout on the way."""
    batch = pack_groups(groups, pad)
    seen: list[tuple[int, ...]] = []

    def counted(**kw):  # type: ignore[no-untyped-def]
        seen.append(tuple(kw["input_ids"].shape))
        return model(**kw)

    with torch.no_grad():
        out = group_token_logprobs(counted, groups, batch, 0.7, block_mask)
        torch.testing.assert_close(out, token_logprobs(model, batch, 0.7), atol=1e-5, rtol=1e-5)
    return seen


def test_length_buckets_minimise_padded_rows_plus_a_cost_per_pass():
    lengths = [5, 5, 6, 6, 14, 0, 9]
    # sorted: 5 5 6 6 9 14. One pass: 6*14 + 8 = 92; {5 5 6 6}{9 14}: 4*6 + 8 + 2*14 + 8 = 68, the least
    assert length_buckets(lengths, row_cost=8) == [[0, 1, 2, 3], [6, 4]]
    assert length_buckets(lengths, row_cost=100) == [[0, 1, 2, 3, 6, 4]]
    assert length_buckets(lengths, row_cost=0) == [[0, 1], [2, 3], [6], [4]]  # no padding at all
    assert length_buckets([0, 0]) == []


def test_continuations_run_in_length_buckets_and_skip_one_token_responses(model_dir):
    model, tok = load_model(model_dir, "float32", torch.device("cpu"))
    pad, vocab = int(tok.pad_token_id), int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(5)

    def group(lengths: list[int]) -> Group:
        n, r = len(lengths), max(lengths)
        mask = torch.arange(r)[None] < torch.tensor(lengths)[:, None]
        resp = torch.where(mask, torch.randint(3, vocab, (n, r), generator=gen), pad)
        prompt = torch.randint(3, vocab, (4,), generator=gen)
        return Group(prompt, resp, mask, torch.zeros(n, r), ("",) * n, (False,) * n, ("",) * n, None, 0)

    for lengths, shapes in [
        ([[1, 1], [1, 1, 1]], [(2, 4)]),  # every response is one token: the prompt pass predicts them all
        ([[2, 2, 30], [2, 0]], [(2, 4), (3, 1), (1, 29)]),  # one long response does not pad the others
    ]:
        groups = [group(x) for x in lengths]
        assert _shared_pass_shapes(model, groups, pad) == shapes


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_packed_layout_takes_one_pass_per_bucket_of_groups(model_dir, attention):
    model, tok = load_model(model_dir, "float32", torch.device("cpu"), attention)
    pad, vocab = int(tok.pad_token_id), int(model.config.vocab_size)
    mask = block_mask_kind(model)
    # each group's row: its prompt, then every response but its last token (widths 9, 19, 3, 10)
    assert _shared_pass_shapes(model, _groups(vocab, pad), pad, mask) == [(4, 19)]

    gen = torch.Generator().manual_seed(7)

    def group(plen: int, lengths: list[int]) -> Group:
        n, r = len(lengths), max(lengths)
        resp_mask = torch.arange(r)[None] < torch.tensor(lengths)[:, None]
        resp = torch.where(resp_mask, torch.randint(3, vocab, (n, r), generator=gen), pad)
        prompt = torch.randint(3, vocab, (plen,), generator=gen)
        return Group(prompt, resp, resp_mask, torch.zeros(n, r), ("",) * n, (False,) * n, ("",) * n, None, 0)

    # seven rows of 6 tokens and one of 242: one pass would pad 7 * 236 tokens, two cost 32 more rows
    groups = [group(4, [2, 2]) for _ in range(7)] + [group(4, [120, 120])]
    assert _shared_pass_shapes(model, groups, pad, mask) == [(7, 6), (1, 242)]


def test_groups_wider_than_the_packed_limit_keep_the_cache_layout(model_dir, monkeypatch):
    model, tok = load_model(model_dir, "float32", torch.device("cpu"))
    pad = int(tok.pad_token_id)
    groups = _groups(int(model.config.vocab_size), pad)
    monkeypatch.setattr(inference, "PACKED_MAX_WIDTH", 18)  # the widest group is 19 tokens
    assert _shared_pass_shapes(model, groups, pad, "bool") == _shared_pass_shapes(model, groups, pad, None)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_both_layouts_agree_under_bfloat16_autocast(model_dir, attention):
    model, tok = load_model(model_dir, "float32", torch.device("cpu"), attention)
    groups = _groups(int(model.config.vocab_size), int(tok.pad_token_id))
    batch = pack_groups(groups, int(tok.pad_token_id))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = group_token_logprobs(model, groups, batch, 1.0, block_mask_kind(model))
        cached = group_token_logprobs(model, groups, batch, 1.0, None)
    assert packed.dtype == torch.float32 and torch.isfinite(packed).all()
    torch.testing.assert_close(packed, cached, atol=0.08, rtol=0)  # bfloat16 rounding, as in the rollout test


def test_block_masks_only_where_the_model_takes_them():
    def model(**config):  # type: ignore[no-untyped-def]
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert block_mask_kind(model(model_type="llama", _attn_implementation="sdpa")) == "bool"
    assert block_mask_kind(model(model_type="qwen2", _attn_implementation="eager", sliding_window=None)) == "additive"
    assert block_mask_kind(model(model_type="qwen2", _attn_implementation="flash_attention_2")) is None
    assert block_mask_kind(model(model_type="gpt2", _attn_implementation="sdpa")) is None
    sliding = ["full_attention", "sliding_attention"]
    assert block_mask_kind(model(model_type="qwen3", _attn_implementation="sdpa", layer_types=sliding)) is None
    windowed = dict(model_type="qwen2", _attn_implementation="sdpa", sliding_window=64)
    assert block_mask_kind(model(**windowed, use_sliding_window=True)) is None
    assert block_mask_kind(model(**windowed, use_sliding_window=False)) == "bool"
    assert block_mask_kind(object()) is None


def test_a_cache_that_cannot_be_copied_per_bucket_is_narrowed_once(model_dir, monkeypatch):
    model, tok = load_model(model_dir, "float32", torch.device("cpu"))
    groups = _groups(int(model.config.vocab_size), int(tok.pad_token_id))

    class OtherCache:
        """Stands in for DynamicCache, so the model's real cache is no longer recognised as one."""

    monkeypatch.setattr(inference, "DynamicCache", OtherCache)
    # the prompts, then every non-empty response in one pass
    assert len(_shared_pass_shapes(model, groups, int(tok.pad_token_id))) == 2


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hf_engine_samples_from_one_prompt_pass_per_group(model_dir, temperature):
    engine = HFEngine(model_dir, "float32", torch.device("cpu"))
    prompts = [[5, 9, 11, 7], [6] * 11, [8, 3]]
    seen: list[tuple[int, ...]] = []
    hook = engine.model.model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    torch.manual_seed(1)
    shared = engine.generate(prompts, 4, temperature, 1.0, 6, [])
    hook.remove()
    torch.manual_seed(1)
    # the same rows, each prompt sent 4 times: every sample computes its own prompt
    apart = engine.generate([p for p in prompts for _ in range(4)], 1, temperature, 1.0, 6, [])

    assert seen[0] == (3, 10)  # the prompts once, all but their last token (left-padded to 11)
    assert seen[1] == (12, 1)  # then 4 rows per prompt
    for i, s in enumerate(shared):
        for j in range(4):
            other = apart[4 * i + j]
            assert s.tokens[j] == other.tokens[0]
            assert s.truncated[j] == other.truncated[0]
            torch.testing.assert_close(torch.tensor(s.logprobs[j]), torch.tensor(other.logprobs[0]), atol=1e-5, rtol=0)
