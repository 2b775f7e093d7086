"""GRPO time per step: rlinf against TRL's ``GRPOTrainer`` on the same model, prompts and settings.

Both train the same tiny Qwen2 model (built locally, random, then warm-started by ``--warm-start-steps``
steps of rlinf's SFT on the gold answers so that GRPO sees rewards; 0 keeps it random) with GRPO on
the generated one-digit addition task: the same prompts in the same order, ``--prompts`` prompts x
``--group`` samples per step, ``--tokens`` new tokens at most, temperature 1, one AdamW step per batch (lr, clipping and
epsilon equal), no KL term, token-level loss normalisation on both sides, float32 on both sides
(``--bf16``: bfloat16 mixed precision on both sides, TRL's default: TRL's ``bf16``, which autocasts
its training and its generation, against rlinf's ``actor.autocast`` and ``rollout.autocast``),
the whole batch in one forward/backward pass on both sides (rlinf's ``actor.micro_batch_groups``
set to the batch) and no activation recomputation (TRL's ``gradient_checkpointing``, on by default
in TRL, is turned off; ``--trl-gradient-checkpointing`` turns it back on). TRL runs in one process
with both cores; rlinf runs its example placement (rollout and reward on CPU slot 0, the actor on
slot 1, streaming through channels). Each side runs in its own subprocess; runs alternate between
the two; the first ``--warmup`` steps of every run are left out of the per-step times.

    python benchmarks/grpo_vs_trl.py                       # 3 runs each, 10 steps, the ~10M model
    python benchmarks/grpo_vs_trl.py --warm-start-steps 0 --lr 1e-3   # the random model (rewards stay 0)
    python benchmarks/grpo_vs_trl.py --runs 5 --size tiny  # the ~1M model
    python benchmarks/grpo_vs_trl.py --placement collocated   # rlinf on both slots, two ranks per component
    python benchmarks/grpo_vs_trl.py --rollout-ahead 1        # rlinf generates the next batch while training

Needs the ``bench`` extra (``make bench`` installs it): ``trl``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TASK = {
    "operations": ["add"],
    "min_digits": 1,
    "max_digits": 1,
    "num_eval": 20,
    "prompt_style": "plain",
    "few_shot": 0,
}


def _settings(args: argparse.Namespace) -> dict:
    return {
        "size": args.size,
        "prompts": args.prompts,
        "group": args.group,
        "tokens": args.tokens,
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
        "placement": args.placement,
        "rollout_ahead": args.rollout_ahead,
        "micro_batch_groups": args.micro_batch_groups or args.prompts,
        "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
        "bf16": args.bf16,
        "model": args.model,
    }


# rlinf placements: the example's (generation on slot 0, training on slot 1, streaming), or every
# component on both slots (two ranks each, taking turns through the device lock)
PLACEMENTS = {
    "example": [],
    "collocated": [
        "placement.mode=collocated",
        *(f"placement.components.{c}.devices=0-1" for c in ("rollout", "reward", "actor")),
    ],
}


def _train_problems(task_cfg, steps: int, batch: int, seed: int) -> list:
    """The prompts of steps 1..steps in the order rlinf's prompt stream takes them (same shuffle)."""
    from rlinf.envs.math_task import make_splits

    problems = make_splits(task_cfg).train
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    return [problems[order[i % len(order)]] for i in range(steps * batch)]


def run_trl(s: dict) -> dict:
    """One TRL GRPOTrainer run; per-step wall times, rewards and completion tokens."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlinf.config import from_dict
    from rlinf.envs.math_task import MathTaskConfig, format_prompt, score_problem
    from rlinf.workers.config import ModelConfig

    torch.set_num_threads(2)
    task = from_dict(MathTaskConfig, TASK)
    model_dir = ModelConfig(path=s["model"], tiny_size=s["size"]).resolve()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    problems = _train_problems(task, s["steps"], s["prompts"], s["seed"])
    data = Dataset.from_dict(
        {"prompt": [format_prompt(p, task, tokenizer) for p in problems], "item": list(range(len(problems)))}
    )

    def reward(prompts: list, completions: list, item: list, **_: object) -> list[float]:
        return [score_problem(c, problems[i], task).reward for c, i in zip(completions, item, strict=True)]

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.logs: list[dict] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            self.times.append(time.perf_counter() - self._t)

        def on_log(self, args, state, control, logs=None, **kw):  # type: ignore[no-untyped-def]
            self.logs.append(dict(logs or {}))

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            bf16=s["bf16"],
            per_device_train_batch_size=s["prompts"] * s["group"],
            gradient_accumulation_steps=1,
            num_generations=s["group"],
            max_completion_length=s["tokens"],
            temperature=1.0,
            top_p=1.0,
            beta=0.0,
            epsilon=0.2,
            num_iterations=1,
            learning_rate=s["lr"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            loss_type="dapo",
            gradient_checkpointing=s["trl_gradient_checkpointing"],  # TRL's default is on; rlinf does not recompute
            max_steps=s["steps"],
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            shuffle_dataset=False,
            seed=s["seed"],
            disable_tqdm=True,
        )
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=cfg,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[clock],
        )
        trainer.train()
    steps = [log for log in clock.logs if "reward" in log]
    n = s["prompts"] * s["group"]
    return {
        "step_s": clock.times,
        "reward": [float(log["reward"]) for log in steps],
        "tokens": [float(log.get("completions/mean_length", 0.0)) * n for log in steps],
    }


def run_rlinf(s: dict) -> dict:
    """One rlinf GRPO run with the example's placement; per-step wall times, rewards and tokens."""
    from rlinf.config import load_config
    from rlinf.workflows import grpo

    root = Path(__file__).resolve().parent.parent
    overrides = [
        f"model.path={s['model']}",
        f"model.tiny_size={s['size']}",
        f"rollout.group_size={s['group']}",
        f"rollout.batch_prompts={s['prompts']}",
        f"rollout.max_new_tokens={s['tokens']}",
        "rollout.temperature=1.0",
        f"actor.lr={s['lr']}",
        "actor.clip_low=0.2",
        "actor.clip_high=0.2",
        "actor.max_grad_norm=1.0",
        f"run.steps={s['steps']}",
        f"run.train_batch={s['prompts']}",
        f"run.seed={s['seed']}",
        "run.eval_prompts=1",
        "run.eval_every=0",
        "run.save_every=0",
        f"run.rollout_ahead={s['rollout_ahead']}",
        f"actor.micro_batch_groups={s['micro_batch_groups']}",
        "actor.min_micro_batch_groups=1",
        f"actor.autocast={'bfloat16' if s['bf16'] else 'none'}",
        f"rollout.autocast={'bfloat16' if s['bf16'] else 'none'}",
        *PLACEMENTS[s["placement"]],
    ]
    cfg = load_config(grpo.GRPOConfig, root / "examples" / "grpo_math_tiny.yaml", overrides)
    with tempfile.TemporaryDirectory() as out:
        grpo.main(cfg, out, show_progress=False)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r]
    return {
        "step_s": [float(r["time/step"]) for r in rows],
        "reward": [float(r["reward/mean"]) for r in rows],
        "tokens": [float(r["rollout/tokens"]) for r in rows],
        "parts": {k: [float(r.get(f"time/{k}", 0.0)) for r in rows] for k in ("weight_sync", "rollout", "actor")},
    }


def warm_start(s: dict, steps: int, out: Path) -> dict:
    """SFT of the tiny model on the task's gold answers, so that GRPO has rewards to work with; the
    checkpoint is what both sides start from."""
    from rlinf.config import load_config
    from rlinf.workflows import sft

    root = Path(__file__).resolve().parent.parent
    overrides = [f"model.tiny_size={s['size']}", f"run.steps={steps}", "actor.lr=1e-3", f"run.seed={s['seed']}"]
    cfg = load_config(sft.SFTConfig, root / "examples" / "sft_math_tiny.yaml", overrides)
    metrics = sft.main(cfg, out, show_progress=False)
    return {"model": str(out / "checkpoints" / "final"), "accuracy": metrics["eval/accuracy_after"]}


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per side (medians over runs)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the times")
    parser.add_argument("--size", default="small", help="tiny model size: nano, tiny, small, medium")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4, help="1e-4 keeps the warm start's rewards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--placement", choices=sorted(PLACEMENTS), default="example", help="rlinf's placement")
    parser.add_argument(
        "--rollout-ahead",
        type=int,
        default=0,
        help="rlinf's run.rollout_ahead (1: generate the next batch while training)",
    )
    parser.add_argument(
        "--micro-batch-groups",
        type=int,
        default=0,
        help="rlinf's actor.micro_batch_groups, the most groups per forward/backward pass "
        "(default: the whole batch, as TRL's one pass; fewer arrive when the actor catches up with the rollout)",
    )
    parser.add_argument(
        "--trl-gradient-checkpointing",
        action="store_true",
        help="TRL recomputes activations in the backward pass (its default); off by default here so that "
        "both sides do the same arithmetic",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="mixed precision on both sides: TRL's bf16 (its default), rlinf's actor.autocast=bfloat16 and "
        "rollout.autocast=bfloat16",
    )
    parser.add_argument(
        "--warm-start-steps",
        type=int,
        default=60,
        help="SFT steps on the gold answers before GRPO, so that rewards are not all zero (0: the random model)",
    )
    parser.add_argument("--model", default="tiny", help=argparse.SUPPRESS)  # set to the warm start's checkpoint
    parser.add_argument("--one", choices=["trl", "rlinf", "sft"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps={args.steps} must exceed --warmup={args.warmup} to leave steps to time.")

    if args.one == "sft":  # a child: the warm start
        args.out.write_text(json.dumps(warm_start(_settings(args), args.warm_start_steps, args.out.parent / "sft")))
        return
    if args.one:  # a child: one run of one side, results as JSON
        result = (run_trl if args.one == "trl" else run_rlinf)(_settings(args))
        args.out.write_text(json.dumps(result))
        return

    results: dict[str, list[dict]] = {"trl": [], "rlinf": []}

    def passthrough() -> list[str]:
        return [
            f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
            for k, v in _settings(args).items()
            if v is not False
        ]

    with tempfile.TemporaryDirectory() as tmp:
        if args.warm_start_steps > 0 and args.model == "tiny":
            out = Path(tmp) / "warm.json"
            cmd = [sys.executable, __file__, "--one=sft", f"--out={out}", f"--warm-start-steps={args.warm_start_steps}"]
            subprocess.run([*cmd, *passthrough()], check=True, stdout=subprocess.DEVNULL)
            warm = json.loads(out.read_text())
            args.model = warm["model"]
            print(f"warm start: {args.warm_start_steps} SFT steps, held-out greedy accuracy {warm['accuracy']:.2f}")
        for run in range(args.runs):
            for side in ("trl", "rlinf"):
                out = Path(tmp) / f"{side}-{run}.json"
                cmd = [sys.executable, __file__, f"--one={side}", f"--out={out}", *passthrough()]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                results[side].append(json.loads(out.read_text()))
                r = results[side][-1]
                print(f"run {run + 1}/{args.runs} {side:5s}: {_median(r['step_s'][args.warmup :]):.3f} s/step")

    print(
        f"\nGRPO, tiny-{args.size} model, {args.prompts} prompts x {args.group} samples, <= {args.tokens} new tokens, "
        f"{args.steps} steps (first {args.warmup} not timed), median of {args.runs} runs, "
        f"{'bfloat16 mixed precision' if args.bf16 else 'float32'}, TRL gradient checkpointing "
        f"{'on' if args.trl_gradient_checkpointing else 'off'}\n"
    )
    table = {}
    for side, runs in results.items():
        step_s = _median([_median(r["step_s"][args.warmup :]) for r in runs])
        tok_s = _median(
            [
                sum(r["tokens"][args.warmup :]) / max(sum(r["step_s"][args.warmup :]), 1e-9)
                for r in runs
                if len(r["tokens"]) == len(r["step_s"])
            ]
        )
        curve = [_median([r["reward"][i] for r in runs if i < len(r["reward"])]) for i in range(args.steps)]
        table[side] = (step_s, tok_s, curve)
    print(f"{'':8s} {'s/step':>8s} {'tokens/s':>9s}  mean reward per step (median over runs)")
    for side, (step_s, tok_s, curve) in table.items():
        print(f"{side:8s} {step_s:8.3f} {tok_s:9.0f}  " + " ".join(f"{x:.2f}" for x in curve))
    parts = {
        k: _median([_median(r["parts"][k][args.warmup :]) for r in results["rlinf"]])
        for k in ("weight_sync", "rollout", "actor")
    }
    print(
        f"rlinf ({args.placement} placement, rollout_ahead={args.rollout_ahead}) per step, medians: "
        f"weight sync {parts['weight_sync']:.3f} s, "
        f"rollout call {parts['rollout']:.3f} s, actor call {parts['actor']:.3f} s (rollout and actor overlap)"
    )
    ratio = table["rlinf"][0] / table["trl"][0]
    print(f"\nrlinf time per step = {ratio:.2f}x TRL's (goal <= 0.5x)")


if __name__ == "__main__":
    main()
