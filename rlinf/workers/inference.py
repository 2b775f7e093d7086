"""Log-probs of given responses under a model: the helper the actor trains with, and InferenceWorker.

``InferenceWorker`` computes reference-model log-probs for a KL penalty; GRPO with ``kl_coef=0``
does not launch it. It takes groups in elastic micro-batches (``inference.min_micro_batch_groups``
to ``inference.max_micro_batch_groups``) and runs each micro-batch as one forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from rlinf.channel import Channel
from rlinf.worker import Worker
from rlinf.workers.config import InferenceConfig
from rlinf.workers.micro_batch import ElasticPull
from rlinf.workers.rollout import Group, load_model, rank_share


@dataclass(frozen=True)
class PackedBatch:
    """Samples of several groups as padded tensors (``B`` samples, ``L`` tokens, ``R`` response tokens).

    Args:
        input_ids: ``[B, L]`` prompt then response, right-padded.
        attention_mask: ``[B, L]`` 1 on real tokens.
        prompt_lens: ``[B]`` prompt length of each row.
        response_ids: ``[B, R]`` response tokens, right-padded.
        response_mask: ``[B, R]`` true on tokens that count (failed samples have none).
        old_logprobs: ``[B, R]`` log-probs the rollout recorded.
        ref_logprobs: ``[B, R]`` reference log-probs, when every group has them.
    """

    input_ids: Tensor
    attention_mask: Tensor
    prompt_lens: Tensor
    response_ids: Tensor
    response_mask: Tensor
    old_logprobs: Tensor
    ref_logprobs: Tensor | None = None

    def to(self, device: torch.device) -> PackedBatch:
        """The same batch on ``device`` (channels deliver CPU tensors)."""
        if self.input_ids.device == device:
            return self
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in moved.items() if isinstance(v, Tensor)})


def pack_groups(groups: Sequence[Group], pad_id: int) -> PackedBatch:
    """Concatenates every sample of ``groups`` into right-padded tensors."""
    rows: list[Tensor] = []
    resp: list[Tensor] = []
    masks: list[Tensor] = []
    olds: list[Tensor] = []
    refs: list[Tensor] = []
    plens: list[int] = []
    for g in groups:
        lengths = g.response_mask.sum(dim=1)
        for i in range(g.response_ids.shape[0]):
            n = int(lengths[i])
            rows.append(torch.cat([g.prompt_ids, g.response_ids[i, :n]]))
            resp.append(g.response_ids[i, :n])
            masks.append(g.response_mask[i, :n])
            olds.append(g.logprobs[i, :n])
            if g.ref_logprobs is not None:
                refs.append(g.ref_logprobs[i, :n])
            plens.append(int(g.prompt_ids.numel()))
    width = max(1, max(r.numel() for r in rows))
    rwidth = max(1, max(r.numel() for r in resp))
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    response_ids = torch.full((b, rwidth), pad_id, dtype=torch.long)
    response_mask = torch.zeros((b, rwidth), dtype=torch.bool)
    old = torch.zeros((b, rwidth), dtype=torch.float32)
    ref = torch.zeros((b, rwidth), dtype=torch.float32) if len(refs) == b else None
    for i in range(b):
        input_ids[i, : rows[i].numel()] = rows[i]
        attention[i, : rows[i].numel()] = 1
        k = resp[i].numel()
        response_ids[i, :k] = resp[i]
        response_mask[i, :k] = masks[i]
        old[i, :k] = olds[i]
        if ref is not None:
            ref[i, :k] = refs[i]
    return PackedBatch(input_ids, attention, torch.tensor(plens), response_ids, response_mask, old, ref)


def token_logprobs(model: Any, batch: PackedBatch, temperature: float) -> Tensor:
    """Log-probs ``[B, R]`` of each response token under ``softmax(logits / temperature)``.

    Only the response positions go through ``log_softmax``, so memory is ``B * R * vocab``.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    r = batch.response_ids.shape[1]
    # logits at position p predict token p + 1: response token t sits at prompt_len + t.
    steps = torch.arange(r, device=batch.prompt_lens.device)
    pos = (batch.prompt_lens[:, None] - 1 + steps[None, :]).clamp(max=logits.shape[1] - 1)
    picked = logits.gather(1, pos[:, :, None].expand(-1, -1, logits.shape[-1]))
    return _picked_logprobs(picked, batch.response_ids, batch.response_mask, temperature)


def _picked_logprobs(logits: Tensor, ids: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / temperature)`` at ``ids`` (``[B, R]``), zero where ``mask`` is false."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(2, ids[:, :, None]).squeeze(2) * mask


def length_buckets(lengths: Sequence[int], row_cost: int = 32) -> list[list[int]]:
    """Splits samples into buckets of similar length, each to run as one right-padded forward pass.

    A bucket costs its size times its longest length (padded token rows) plus ``row_cost`` rows for
    the pass itself; the split minimises the total over buckets of samples sorted by length (dynamic
    programming, exact). Samples of length 0 are left out.

    Args:
        lengths: the number of tokens each sample feeds.
        row_cost: the fixed cost of one more forward pass, in token rows. On one CPU core with the
            10M benchmark model a pass costs about as much as 20-40 more rows (its ~1,000 small
            operations), more with bfloat16, whose matrix products are cheaper per row: 32 took the
            forward and backward of recorded batches from 0.46 to 0.36 s in bfloat16 and from 0.55
            to 0.50 s in float32, against 8.

    Returns:
        sample indices per bucket, shortest bucket first, each bucket sorted by length.
    """
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: lengths[i])
    n = len(order)
    best = [0] * (n + 1)  # best[j]: cost of the cheapest split of the j shortest samples
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        best[j], cut[j] = min((best[i] + (j - i) * longest + row_cost, i) for i in range(j))
    buckets, j = [], n
    while j > 0:
        buckets.append(order[cut[j] : j])
        j = cut[j]
    return buckets[::-1]


# attention kernels that take a custom 4D mask, and the form they take it in
_BLOCK_MASKS = {"sdpa": "bool", "eager": "additive"}
# model families whose transformers code passes a custom 4D mask through unchanged (tested: tiny Qwen2
# and Llama, SmolLM2 is Llama); others keep the cache layout
_BLOCK_MASK_FAMILIES = {"llama", "qwen2", "qwen3"}
# the packed layout's attention grows with the square of a row's width (prompt plus all its samples'
# responses); groups wider than this keep the cache layout, whose attention grows with each response
PACKED_MAX_WIDTH = 512


def block_mask_kind(model: Any) -> str | None:
    """How ``model`` takes a custom block attention mask: ``"bool"`` (sdpa), ``"additive"`` (eager),
    or None where it cannot (other kernels such as flash-attention, sliding windows, other families).

    ``model`` is a transformers causal LM, possibly wrapped by peft (whose ``config`` is the base's).
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in _BLOCK_MASK_FAMILIES:
        return None
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return None
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return None
    return _BLOCK_MASKS.get(getattr(config, "_attn_implementation", None) or "")


def group_token_logprobs(
    model: Any, groups: Sequence[Group], batch: PackedBatch, temperature: float, block_mask: str | None = None
) -> Tensor:
    """``token_logprobs(model, batch, temperature)`` for ``batch = pack_groups(groups)``, each group's
    prompt computed once instead of once per sample. Same numbers up to rounding.

    Two layouts. With ``block_mask`` (what :func:`block_mask_kind` says the model takes), each group is
    one row: its prompt, then every sample's response, with a block mask under which a response sees
    the prompt and itself only, and position ids that restart after the prompt for each response. A
    micro-batch is then one pass (or one per bucket of groups of very different widths): on one CPU
    core a pass of the 10M benchmark model costs about as much as 30-50 more token rows, and the cache
    layout takes three or four. Groups wider than ``PACKED_MAX_WIDTH`` tokens use the cache layout.

    Without it (the cache layout), the prompts go through ``model`` as one left-padded batch with the
    key/value cache on; only their last position's logits are computed (``logits_to_keep=1``), which
    predict each response's first token. Each sample's response then continues from a copy of its
    group's cached prompt (the copies carry the gradient of every sample back to the shared prompt
    pass), in buckets of similar length (:func:`length_buckets`), so one long response does not pad
    every other one to its length.

    Either way a response's last token, which predicts nothing, is not fed. Groups of one sample gain
    nothing, and then this is ``token_logprobs``.
    """
    sizes = torch.tensor([g.response_ids.shape[0] for g in groups])
    if int(sizes.max()) <= 1:
        return token_logprobs(model, batch, temperature)
    if block_mask is not None:
        packed = _packed_group_logprobs(model, groups, batch, temperature, block_mask)
        if packed is not None:
            return packed
    return _cached_group_logprobs(model, groups, batch, temperature, sizes)


@dataclass(frozen=True)
class PackedPass:
    """One forward pass of the packed layout (see :func:`group_token_logprobs`): ``G`` rows of ``W`` tokens.

    Args:
        input_ids: ``[G, W]`` each group's prompt, then its samples' responses but their last token.
        position_ids: ``[G, W]`` restarting after the prompt for each response.
        attention_mask: ``[G, 1, W, W]`` the block mask, in the form the model takes it.
        first: the first column whose output is needed (the earliest prompt's last token).
        rows: ``[S]`` the row of each sample with tokens.
        cols: ``[S, R]`` per sample, the column (counted from ``first``) whose output predicts (or
            values) response token ``t``; 0 past the sample's length.
        samples: ``[S]`` each sample's index in the batch.
    """

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    first: int
    rows: Tensor
    cols: Tensor
    samples: Tensor


def packed_passes(groups: Sequence[Group], batch: PackedBatch, block_mask: str) -> list[PackedPass] | None:
    """The passes of the packed layout for ``batch = pack_groups(groups)``: one per bucket of groups of
    similar width (:func:`length_buckets` over the row widths). None when a group is wider than
    ``PACKED_MAX_WIDTH`` tokens; no passes when no sample has tokens."""
    device = batch.input_ids.device
    lengths = [int(n) for n in batch.response_mask.sum(dim=1)]
    # per group: its token row, position ids, segment ids (0 prompt, j + 1 the j-th sample's response),
    # and per sample with tokens: (sample index, prompt length, column of its first fed token, length)
    rows: list[tuple[Tensor, Tensor, Tensor]] = []
    spans: list[list[tuple[int, int, int, int]]] = []
    first = 0
    for g in groups:
        p = int(g.prompt_ids.numel())
        id_parts = [g.prompt_ids.to(device)]
        pos_parts = [torch.arange(p, device=device)]
        seg_parts = [torch.zeros(p, dtype=torch.long)]
        mine, col = [], p
        for j in range(g.response_ids.shape[0]):
            n = lengths[first + j]
            if n > 0:
                fed = n - 1  # tokens 0 .. n-2 predict tokens 1 .. n-1; token 0 is predicted by the prompt
                id_parts.append(batch.response_ids[first + j, :fed])
                pos_parts.append(torch.arange(p, p + fed, device=device))
                seg_parts.append(torch.full((fed,), j + 1, dtype=torch.long))
                mine.append((first + j, p, col, n))
                col += fed
        first += g.response_ids.shape[0]
        rows.append((torch.cat(id_parts), torch.cat(pos_parts), torch.cat(seg_parts)))
        spans.append(mine)
    widths = [int(r[0].numel()) if s else 0 for r, s in zip(rows, spans, strict=True)]
    if max(widths) > PACKED_MAX_WIDTH:
        return None
    passes = []
    for bucket in length_buckets(widths):  # groups of similar width, one pass each
        width = max(widths[i] for i in bucket)
        ids = torch.zeros((len(bucket), width), dtype=torch.long, device=device)  # padding is masked out
        pos = torch.zeros((len(bucket), width), dtype=torch.long, device=device)
        seg = torch.full((len(bucket), width), -1, dtype=torch.long)
        for r, i in enumerate(bucket):
            ids[r, : widths[i]], pos[r, : widths[i]], seg[r, : widths[i]] = rows[i]
        q, k = seg[:, :, None], seg[:, None, :]
        # a prompt token sees the prompt before it; a response token the whole prompt and its own
        # response before it; padding only itself (a row with no key would give NaNs)
        allowed = torch.ones((width, width), dtype=torch.bool).tril() & ((k == 0) | (k == q)) & (q >= 0)
        allowed |= torch.eye(width, dtype=torch.bool)
        if block_mask == "bool":
            mask = allowed[:, None].to(device)
        else:
            mask = torch.zeros(allowed[:, None].shape, device=device)
            mask.masked_fill_(~allowed[:, None].to(device), torch.finfo(torch.float32).min)
        picks = [(r, *span) for r, i in enumerate(bucket) for span in spans[i]]
        start = min(p for _, _, p, _, _ in picks) - 1
        cols = torch.zeros((len(picks), max(n for *_, n in picks)), dtype=torch.long)
        for s, (_, _, p, col, n) in enumerate(picks):
            cols[s, 0] = p - 1 - start
            cols[s, 1:n] = torch.arange(col - start, col - start + n - 1)
        passes.append(
            PackedPass(
                ids,
                pos,
                mask,
                start,
                torch.tensor([r for r, *_ in picks], device=device),
                cols.to(device),
                torch.tensor([s for _, s, *_ in picks], device=device),
            )
        )
    return passes


def _packed_group_logprobs(
    model: Any, groups: Sequence[Group], batch: PackedBatch, temperature: float, block_mask: str
) -> Tensor | None:
    """The packed layout of :func:`group_token_logprobs`; None when a group is wider than ``PACKED_MAX_WIDTH``."""
    passes = packed_passes(groups, batch, block_mask)
    if passes is None:
        return None
    result = torch.zeros(batch.response_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
    for p in passes:
        # the output layer runs only from the earliest position that predicts a response token
        keep = torch.arange(p.first, p.input_ids.shape[1], device=p.input_ids.device)
        out = model(
            input_ids=p.input_ids,
            attention_mask=p.attention_mask,
            position_ids=p.position_ids,
            use_cache=False,
            logits_to_keep=keep,
        )
        r = p.cols.shape[1]
        picked = out.logits[p.rows[:, None], p.cols]
        ids, mask = batch.response_ids[p.samples, :r], batch.response_mask[p.samples, :r]
        result[p.samples, :r] = _picked_logprobs(picked, ids, mask, temperature)
    return result


def _cached_group_logprobs(
    model: Any, groups: Sequence[Group], batch: PackedBatch, temperature: float, sizes: Tensor
) -> Tensor:
    """The cache layout of :func:`group_token_logprobs`."""
    device = batch.input_ids.device
    plens = torch.tensor([int(g.prompt_ids.numel()) for g in groups], device=device)
    width = int(plens.max())
    prompts = torch.zeros((len(groups), width), dtype=torch.long, device=device)  # padding is masked out
    pmask = torch.zeros((len(groups), width), dtype=torch.long, device=device)
    for i, g in enumerate(groups):  # left-padded: every prompt's last token sits at the last position
        prompts[i, width - int(plens[i]) :] = g.prompt_ids.to(device)
        pmask[i, width - int(plens[i]) :] = 1
    positions = (pmask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=prompts, attention_mask=pmask, position_ids=positions, use_cache=True, logits_to_keep=1)
    rows = torch.repeat_interleave(torch.arange(len(groups), device=device), sizes.to(device))
    first = out.logits[rows, -1]  # the logits that predict each response's first token
    lengths = batch.response_mask.sum(dim=1)
    result = torch.zeros(batch.response_ids.shape, dtype=torch.float32, device=device)
    cache = out.past_key_values
    counts = [int(n) for n in lengths]
    copyable = isinstance(cache, DynamicCache)  # other cache kinds are narrowed once, in place, for one bucket
    buckets = length_buckets(counts) if copyable else [[i for i, n in enumerate(counts) if n > 0]]
    for bucket in (b for b in buckets if b):
        idx = torch.tensor(bucket, device=device)
        r = int(lengths[idx].max())
        logits = first[idx, None]
        if r > 1:  # tokens 0 .. r-2 predict tokens 1 .. r-1
            steps = torch.arange(r - 1, device=device)
            if copyable:
                past = DynamicCache([(k[rows[idx]], v[rows[idx]], *rest) for k, v, *rest in cache])
            else:
                past = cache
                past.batch_select_indices(rows[idx])
            cont = model(
                input_ids=batch.response_ids[idx, : r - 1],
                attention_mask=torch.cat([pmask[rows[idx]], (steps[None] < lengths[idx, None]).long()], dim=1),
                position_ids=plens[rows[idx], None] + steps[None],
                past_key_values=past,
                use_cache=True,
            )
            logits = torch.cat([logits, cont.logits], dim=1)
        ids = batch.response_ids[idx, :r]
        result[idx, :r] = _picked_logprobs(logits, ids, batch.response_mask[idx, :r], temperature)
    return result


class InferenceWorker(Worker):
    """Reference-model log-probs for a KL penalty; attaches ``ref_logprobs`` to each group.

    Args:
        model_dir: the model directory (resolved by the driver).
        temperature: the rollout's sampling temperature.
        dtype: parameter dtype.
        cfg: the inference section (micro-batch bounds); default ``InferenceConfig()``.
    """

    def __init__(
        self,
        model_dir: str | Path,
        temperature: float = 1.0,
        dtype: str = "float32",
        cfg: InferenceConfig | None = None,
    ) -> None:
        self.model, self.tokenizer = load_model(model_dir, dtype, self.device)
        self.model.eval()
        self.block_mask = block_mask_kind(self.model)
        self.temperature = temperature
        self.cfg = cfg or InferenceConfig()

    def infer(self, inp: Channel, out: Channel, num_groups: int) -> dict[str, float]:
        """Takes this rank's share of ``num_groups`` groups, adds ``ref_logprobs`` and forwards each.

        Groups come in elastic micro-batches, one forward pass each; returns the groups done and the
        micro-batch sizes seen (``inference/micro_batch_*``).
        """
        mine = rank_share(num_groups, self.rank, self.world_size)
        start, done = time.perf_counter(), 0
        pulls = ElasticPull(self.cfg.min_micro_batch_groups, self.cfg.max_micro_batch_groups)
        while done < mine:
            items = pulls.pull(inp, mine - done)
            if not items:
                raise RuntimeError(f"channel {inp.name!r} closed after {done} of {mine} groups.")
            groups: list[Group] = [it.payload for it in items]
            with self.device_lock():
                refs = self.ref_logprobs(groups)
            for item, group, ref in zip(items, groups, refs, strict=True):
                out.put(replace(group, ref_logprobs=ref), version=item.meta.version)
            done += len(items)
        return {
            "inference/groups": float(done),
            **pulls.metrics("inference"),
            "time/inference": time.perf_counter() - start,
        }

    def ref_logprobs(self, groups: Sequence[Group]) -> list[Tensor]:
        """One forward pass over ``groups``; per group, ``[n, R]`` log-probs shaped like its ``logprobs``."""
        with torch.no_grad():
            batch = pack_groups(groups, int(self.tokenizer.pad_token_id)).to(self.device)
            ref = group_token_logprobs(self.model, groups, batch, self.temperature, self.block_mask)
        out, row = [], 0
        for g in groups:  # pack_groups lays out the samples group after group
            full = torch.zeros_like(g.logprobs)
            width = min(ref.shape[1], full.shape[1])
            full[:, :width] = ref[row : row + g.size, :width].to(full.device)
            out.append(full)
            row += g.size
        return out
