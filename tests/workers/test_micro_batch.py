"""Elastic micro-batches: pulls take what has arrived between a minimum and a maximum; the reward and
inference workers use them, report the sizes, and batched reference log-probs equal one group at a time."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rlinf import Channel
from rlinf.errors import ConfigError
from rlinf.models import build_tiny_model
from rlinf.workers.config import InferenceConfig, RewardConfig
from rlinf.workers.inference import InferenceWorker, pack_groups, token_logprobs
from rlinf.workers.micro_batch import ElasticPull
from rlinf.workers.reward import RewardWorker
from rlinf.workers.rollout import Group, load_model


def _verifier(text: str, problem: object, truncated: bool) -> tuple[float, bool, str]:
    return (1.0, True, "correct") if text == "yes" else (0.0, False, "wrong answer")


def _group(index: int, n: int = 2, width: int = 3, vocab: int = 200, seed: int = 0) -> Group:
    """A group of ``n`` random responses of different lengths (one per length up to ``width``)."""
    gen = torch.Generator().manual_seed(seed + index)
    ids = torch.randint(5, vocab, (n, width), generator=gen)
    mask = torch.zeros((n, width), dtype=torch.bool)
    for j in range(n):
        mask[j, : 1 + (index + j) % width] = True
    prompt = torch.randint(5, vocab, (3 + index % 4,), generator=gen)
    texts = tuple("yes" if (index + j) % 2 == 0 else "no" for j in range(n))
    return Group(prompt, ids, mask, torch.zeros((n, width)), texts, (False,) * n, ("",) * n, None, 0, index)


def test_config_and_bounds_errors_name_the_value_and_a_fix():
    with pytest.raises(ConfigError, match=r"reward.min_micro_batch_groups=0 must be >= 1"):
        RewardConfig(min_micro_batch_groups=0)
    with pytest.raises(ConfigError, match=r"inference.max_micro_batch_groups=2 is below .*=3; set .*=3 or more"):
        InferenceConfig(min_micro_batch_groups=3, max_micro_batch_groups=2)
    with pytest.raises(ValueError, match="need 1 <= min <= max"):
        ElasticPull(4, 2)


def test_pull_takes_what_has_arrived_up_to_the_maximum(cluster):
    ch = Channel("elastic/pull")
    for i in range(5):
        ch.put(i)
    pulls = ElasticPull(1, 3)
    assert [it.payload for it in pulls.pull(ch, 5)] == [0, 1, 2]
    assert [it.payload for it in pulls.pull(ch, 2)] == [3, 4]  # capped by what is left of the share
    assert pulls.metrics("x") == {
        "x/micro_batches": 2.0,
        "x/micro_batch_mean": 2.5,
        "x/micro_batch_min": 2.0,
        "x/micro_batch_max": 3.0,
    }
    ch.close()
    assert pulls.pull(ch, 1) == []


def test_pull_waits_for_the_minimum(cluster):
    ch = Channel("elastic/minimum")
    ch.put("a")
    late = threading.Timer(0.5, lambda: ch.put("b"))
    late.start()
    start = time.perf_counter()
    items = ElasticPull(2, 4).pull(ch, 10)
    assert [it.payload for it in items] == ["a", "b"]
    assert time.perf_counter() - start >= 0.4
    late.join()


def test_reward_worker_scores_in_elastic_micro_batches(fresh_groups):
    cluster = fresh_groups
    reward = RewardWorker.launch(
        cluster, [0], _verifier, RewardConfig(min_micro_batch_groups=1, max_micro_batch_groups=4), name="reward-elastic"
    )
    inp, out = Channel("reward-elastic/in"), Channel("reward-elastic/out")
    for i in range(6):  # all arrived before scoring starts: two passes, 4 then 2
        inp.put(_group(i), version=i)
    [m] = reward.call(RewardWorker.score, inp, out, 6).wait()
    assert (m["reward/micro_batches"], m["reward/micro_batch_max"], m["reward/micro_batch_min"]) == (2, 4, 2)
    got = [out.get_item(timeout=10) for _ in range(6)]
    assert [it.meta.version for it in got] == list(range(6))  # in order, versions kept
    assert [it.payload.rewards.tolist() for it in got[:2]] == [[1.0, 0.0], [0.0, 1.0]]
    assert m["reward/mean"] == pytest.approx(0.5) and m["reward/samples"] == 12

    handle = reward.call(RewardWorker.score, inp, out, 3)  # groups trickle in: each pass takes one
    for i in range(3):
        time.sleep(0.3)
        inp.put(_group(i), version=i)
    [m] = handle.wait()
    assert (m["reward/micro_batches"], m["reward/micro_batch_max"]) == (3, 1)


def test_reward_worker_waits_for_the_minimum_micro_batch(fresh_groups):
    cluster = fresh_groups
    reward = RewardWorker.launch(
        cluster, [0], _verifier, RewardConfig(min_micro_batch_groups=3, max_micro_batch_groups=8), name="reward-minimum"
    )
    inp, out = Channel("reward-minimum/in"), Channel("reward-minimum/out")
    handle = reward.call(RewardWorker.score, inp, out, 5)
    inp.put(_group(0))
    inp.put(_group(1))
    time.sleep(0.5)
    assert out.qsize() == 0 and not handle.done()  # two arrived, three are needed
    for i in range(2, 5):
        inp.put(_group(i))
    [m] = handle.wait()
    # the first pass took 3 (or more, if the rest had arrived), the last what was left of 5
    assert m["reward/micro_batch_min"] >= 2 and m["reward/micro_batches"] <= 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-nano", size="nano", seed=0)


def test_inference_batches_equal_one_group_at_a_time(fresh_groups, model_dir):
    cluster = fresh_groups
    worker = InferenceWorker.launch(
        cluster,
        [0],
        model_dir,
        0.8,
        "float32",
        InferenceConfig(min_micro_batch_groups=1, max_micro_batch_groups=4),
        name="inf-elastic",
    )
    inp, out = Channel("inf-elastic/in"), Channel("inf-elastic/out")
    groups = [_group(i, n=3, width=5) for i in range(5)]
    for i, g in enumerate(groups):
        inp.put(g, version=10 + i)
    [m] = worker.call(InferenceWorker.infer, inp, out, 5).wait()
    assert (m["inference/groups"], m["inference/micro_batches"], m["inference/micro_batch_max"]) == (5, 2, 4)
    model, tok = load_model(model_dir, "float32", torch.device("cpu"))
    for i, g in enumerate(groups):
        item = out.get_item(timeout=10)
        assert item.meta.version == 10 + i and item.payload.index == g.index
        with torch.no_grad():
            alone = token_logprobs(model, pack_groups([g], int(tok.pad_token_id)), 0.8)
        ref = item.payload.ref_logprobs
        assert ref.shape == g.logprobs.shape
        torch.testing.assert_close(ref[:, : alone.shape[1]], alone, atol=1e-5, rtol=1e-5)
        assert torch.all(ref[~g.response_mask] == 0)
