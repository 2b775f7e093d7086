"""Held-out accuracy and generation speed of a model on the math task, with HF ``generate`` on CPU.

Measures, per difficulty preset and answer format, greedy and sampled (temperature 1.0) accuracy of
SmolLM2-135M-Instruct (or any local checkpoint), how often the requested answer format is followed,
a lenient accuracy (last number in the reply), tokens/s, and optionally pass@k over groups of k
samples (what GRPO needs: a group in which at least one sample is right).

    python benchmarks/math_task_baseline.py                      # the default sweep (~10 min on 2 busy cores)
    python benchmarks/math_task_baseline.py --presets addsub-2d --formats answer,boxed --modes greedy
    python benchmarks/math_task_baseline.py --presets word-1d --modes sample --group 8 --num 16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlinf.envs.math_task import format_prompt, make_splits, preset, score
from rlinf.models.pretrained import pretrained_model_path

_LAST_NUMBER = re.compile(r"-?\d[\d,]*")


@dataclass
class Row:
    preset: str
    answer_format: str
    mode: str
    prompts: int
    group: int
    accuracy: float  # strict: the verifier's verdict, mean over all samples
    formatted: float  # share of samples stating a number in the requested format
    lenient: float  # last number in the reply equals the answer, format ignored
    pass_at_group: float  # share of prompts with at least one correct sample in its group
    tokens: int  # generated tokens up to and including the end-of-sequence token
    positions: int  # batch rows x decoding steps: the work done, padding after EOS included
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def positions_per_s(self) -> float:
        return self.positions / max(self.seconds, 1e-9)


def last_number_correct(text: str, answer: int) -> bool:
    numbers = _LAST_NUMBER.findall(text)
    return bool(numbers) and numbers[-1].replace(",", "") == str(answer)


def run_setting(model, tokenizer, name: str, answer_format: str, mode: str, args: argparse.Namespace) -> Row:
    cfg = replace(preset(name), answer_format=answer_format, few_shot=args.few_shot, system_prompt=not args.no_system)
    problems = make_splits(cfg).eval[: args.num]
    group = args.group if mode == "sample" else 1
    prompts = [format_prompt(p, cfg, tokenizer) for p in problems]
    expanded = [(i, text) for i, text in enumerate(prompts) for _ in range(group)]
    correct = [0] * len(problems)
    n_formatted = n_lenient = n_correct = tokens = positions = 0
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    for b in range(0, len(expanded), args.batch):
        chunk = expanded[b : b + args.batch]
        enc = tokenizer([text for _, text in chunk], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=args.max_new_tokens,
                do_sample=mode == "sample",
                temperature=1.0 if mode == "sample" else None,
                top_p=1.0 if mode == "sample" else None,
                top_k=0 if mode == "sample" else None,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        positions += new.shape[0] * new.shape[1]
        for row, (i, _) in enumerate(chunk):
            ids = new[row].tolist()
            ended = tokenizer.eos_token_id in ids
            length = ids.index(tokenizer.eos_token_id) + 1 if ended else len(ids)
            tokens += length
            text = tokenizer.decode(ids[:length], skip_special_tokens=True)
            verdict = score(text, problems[i].answer, answer_format=answer_format, truncated=not ended)
            n_correct += verdict.correct
            n_formatted += verdict.formatted
            n_lenient += last_number_correct(text, problems[i].answer)
            correct[i] += verdict.correct
            if args.show and row < args.show and b == 0:
                print(f"  [{verdict.reason}] {problems[i].question} -> {text!r}", file=sys.stderr)
    seconds = time.perf_counter() - start
    total = len(expanded)
    return Row(
        preset=name,
        answer_format=answer_format,
        mode=mode,
        prompts=len(problems),
        group=group,
        accuracy=n_correct / total,
        formatted=n_formatted / total,
        lenient=n_lenient / total,
        pass_at_group=sum(c > 0 for c in correct) / len(problems),
        tokens=tokens,
        positions=positions,
        seconds=seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--presets", default="add-1d,addsub-2d,mul-2d,word-1d,word-2d")
    parser.add_argument("--formats", default="answer")
    parser.add_argument("--modes", default="greedy,sample")
    parser.add_argument("--num", type=int, default=64, help="held-out prompts per setting")
    parser.add_argument("--group", type=int, default=1, help="samples per prompt in sample mode")
    parser.add_argument("--few-shot", type=int, default=1, help="worked examples in the prompt")
    parser.add_argument("--no-system", action="store_true", help="leave out the task's system message")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=0, help="print this many completions per setting")
    parser.add_argument("--out", type=Path, default=None, help="append rows as JSON lines here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else pretrained_model_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    header = (
        f"{'preset':<10} {'format':<7} {'mode':<7} {'n':>4} {'k':>2} {'acc':>6} {'fmt':>6} "
        f"{'lenient':>7} {'pass@k':>6} {'tokens':>6} {'tok/s':>6} {'pos/s':>6}"
    )
    print(f"few_shot={args.few_shot} system_prompt={not args.no_system} max_new_tokens={args.max_new_tokens}")
    print(header)
    for name in args.presets.split(","):
        for answer_format in args.formats.split(","):
            for mode in args.modes.split(","):
                r = run_setting(model, tokenizer, name, answer_format, mode, args)
                print(
                    f"{r.preset:<10} {r.answer_format:<7} {r.mode:<7} {r.prompts:>4} {r.group:>2} "
                    f"{r.accuracy:>6.1%} {r.formatted:>6.1%} {r.lenient:>7.1%} {r.pass_at_group:>6.1%} "
                    f"{r.tokens:>6} {r.tokens_per_s:>6.1f} {r.positions_per_s:>6.1f}",
                    flush=True,
                )
                if args.out is not None:
                    with args.out.open("a") as f:
                        row = {**asdict(r), "tokens_per_s": r.tokens_per_s, "positions_per_s": r.positions_per_s}
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
