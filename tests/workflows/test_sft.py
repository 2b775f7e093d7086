"""SFT workflow: the CLI runs the example, held-out loss falls, and GRPO starts from its checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlinf import cli
from rlinf.config import load_config
from rlinf.models import build_tiny_model
from rlinf.workers.actor import ActorWorker, Example
from rlinf.workers.config import ModelConfig
from rlinf.workflows.grpo import GRPOConfig
from rlinf.workflows.grpo import main as grpo_main
from rlinf.workflows.sft import SFTConfig
from rlinf.workflows.sft import main as sft_main

from ._tiny_run import metric_records

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "sft_math_tiny.yaml"
GRPO_EXAMPLE = ROOT / "examples" / "grpo_math_tiny.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-nano", size="nano", seed=0)


def test_sft_loss_counts_only_response_tokens(cluster, fresh_groups, model_dir):
    """Held-out NLL by hand: minus the log-probs of the response tokens and end-of-sequence, nothing else."""
    from rlinf import Channel
    from rlinf.workers.config import ActorConfig
    from rlinf.workers.rollout import load_model

    actor = ActorWorker.launch(fresh_groups, [0], ActorConfig(), str(model_dir), 1.0, name="actor-sft")
    examples = [Example("Question: What is 2 + 3?\n", "Answer: 5"), Example("Question: 7 - 4?\n", "Answer: 3")]
    ch = Channel("sft/eval")
    ch.put_many(examples)
    got = actor.call(ActorWorker.eval_sft, ch, 2).wait()[0]

    model, tok = load_model(model_dir, "float32", torch.device("cpu"))
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for e in examples:
            prompt = tok(e.prompt, add_special_tokens=False)["input_ids"]
            response = [*tok(e.response, add_special_tokens=False)["input_ids"], tok.eos_token_id]
            logits = model(torch.tensor([prompt + response])).logits[0]
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
            nll -= float(logp.gather(1, torch.tensor(response)[:, None]).sum())
            tokens += len(response)
    assert got["eval/tokens"] == tokens
    assert got["eval/nll_sum"] == pytest.approx(nll, rel=1e-5)


def run_sft_cli(model_dir: Path, run_dir: Path, steps: int) -> list[dict]:
    args = [f"model.path={model_dir}", "run.eval_prompts=4", "rollout.max_new_tokens=6", f"steps={steps}"]
    assert cli.main(["run", "sft", str(EXAMPLE), *args, "--run-dir", str(run_dir), "--no-progress"]) == 0
    return metric_records(run_dir)[0]


def test_cli_runs_the_sft_example_and_its_checkpoint_is_a_model_path(cluster, model_dir, tmp_path):
    records = run_sft_cli(model_dir, tmp_path / "sft", steps=2)
    steps = [r for r in records if "actor/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[-1]["actor/loss"] < steps[0]["actor/loss"]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 2] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    checkpoint = tmp_path / "sft" / "checkpoints" / "final"
    assert ModelConfig(path=str(checkpoint)).resolve() == checkpoint / "model"


@pytest.mark.slow
def test_grpo_starts_from_an_sft_checkpoint(cluster, model_dir, tmp_path):
    """GRPO's first evaluation sees the SFT weights, and its actor starts from them exactly."""
    records = run_sft_cli(model_dir, tmp_path / "sft", steps=3)
    after = [r for r in records if "eval/accuracy" in r][-1]["eval/accuracy"]
    checkpoint = tmp_path / "sft" / "checkpoints" / "final"
    grpo_dir = tmp_path / "grpo"
    overrides = [f"model.path={checkpoint}", "run.steps=0", "run.eval_prompts=4", "rollout.max_new_tokens=6"]
    out = grpo_main(load_config(GRPOConfig, GRPO_EXAMPLE, overrides), grpo_dir, cluster=cluster, show_progress=False)
    assert out["eval/accuracy_before"] == after
    start = load_file(grpo_dir / "checkpoints" / "final" / "model" / "model.safetensors")
    sft = load_file(checkpoint / "model" / "model.safetensors")
    assert start.keys() == sft.keys() and all(torch.equal(start[k], sft[k]) for k in sft)


@pytest.mark.slow
def test_sft_makes_a_tiny_model_answer_held_out_sums(cluster, tmp_path):
    """200 steps of SFT on one-digit addition: held-out loss falls 10x and greedy accuracy leaves zero."""
    tiny = build_tiny_model(tmp_path / "tiny", size="tiny", seed=0)
    cfg = load_config(SFTConfig, EXAMPLE, [f"model.path={tiny}", "run.steps=200"])
    out = sft_main(cfg, tmp_path / "run", cluster=cluster, show_progress=False)
    assert out["eval/loss_after"] < out["eval/loss_before"] / 10, out
    assert out["eval/accuracy_after"] >= out["eval/accuracy_before"] + 0.2, out
