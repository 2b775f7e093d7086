"""Policies for embodied RL: MLP, CNN and the small VLA on every supported space type."""

from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

from rlinf.config import from_dict
from rlinf.errors import ConfigError
from rlinf.models import Policy, PolicyConfig, build_policy, tokenize_instructions
from rlinf.models.policies import (
    CategoricalHead,
    GaussianHead,
    bin_centres,
    detokenize_instruction,
    tokenize_instruction,
    value_to_bin,
)

B = 6
STATE = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
IMAGE64 = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
IMAGE32 = gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)
# ManiSkill obs_mode="rgb": state vector plus two cameras concatenated on the channel axis
MANISKILL_RGB = gym.spaces.Dict(
    {"state": gym.spaces.Box(-np.inf, np.inf, (9,), np.float32), "rgb": gym.spaces.Box(0, 255, (40, 48, 6), np.uint8)}
)
BOX = gym.spaces.Box(-2.0, 2.0, (3,), np.float32)
DISCRETE = gym.spaces.Discrete(3, start=1)
MULTI = gym.spaces.MultiDiscrete([3, 5])
CHUNK = gym.spaces.Box(np.full((2, 3), -1.0, np.float32), np.ones((2, 3), np.float32))  # ActionChunk(k=2) of a Box
VLA = {"d_model": 32, "num_heads": 4, "num_layers": 1, "patch_size": 8, "instruction": "push the cube"}

CASES = [
    ("mlp", {}, STATE, DISCRETE),
    ("mlp", {}, STATE, BOX),
    ("mlp", {"action_bins": 7}, STATE, BOX),
    ("mlp", {}, STATE, MULTI),
    ("mlp", {}, gym.spaces.Dict({"state": STATE}), CHUNK),
    ("cnn", {}, IMAGE64, DISCRETE),
    ("cnn", {}, MANISKILL_RGB, BOX),
    ("cnn", {"use_state": False, "action_bins": 5}, MANISKILL_RGB, BOX),
    ("vla", VLA, IMAGE32, DISCRETE),
    ("vla", VLA, MANISKILL_RGB, BOX),
    ("vla", {**VLA, "action_bins": 11}, MANISKILL_RGB, MULTI),
    ("vla", VLA, IMAGE32, CHUNK),
    ("vla", VLA, STATE, BOX),  # no image: the state and the instruction only
    ("vla", VLA, gym.spaces.Dict({"state": STATE}), DISCRETE),
]


def _ids(case):
    kind, over, obs_space, act_space = case
    return f"{kind}-{type(obs_space).__name__}{obs_space.shape or ''}-{act_space}-{over.get('action_bins', '')}"


def sample_obs(space: gym.Space, n: int, seed: int = 0):
    space.seed(seed)
    if isinstance(space, gym.spaces.Dict):
        rows = [space.sample() for _ in range(n)]
        return {k: np.stack([r[k] for r in rows]).astype(space[k].dtype) for k in space.spaces}
    return np.stack([space.sample() for _ in range(n)]).astype(space.dtype)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # These models are small: on a busy 2-core machine, two threads spend most of their time waiting
    # for each other (measured 10-20x slower than one thread under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(kind, over, obs_space, act_space, seed=0) -> Policy:
    torch.manual_seed(seed)
    return build_policy(PolicyConfig(kind=kind, **over), obs_space, act_space)


# ---------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_shapes_dtypes_bounds_and_act_logprob_equals_evaluate(case):
    _, _, obs_space, act_space = case
    policy = make(*case)
    obs = sample_obs(obs_space, B)
    actions, logp, values = policy.act(obs)  # numpy in
    assert actions.shape == (B, *(act_space.shape or ()))
    assert actions.dtype == (torch.float32 if isinstance(act_space, gym.spaces.Box) else torch.int64)
    assert logp.shape == values.shape == (B,)
    assert logp.dtype == values.dtype == torch.float32
    assert not logp.requires_grad and not values.requires_grad
    for row in actions.numpy():
        assert act_space.contains(row.astype(act_space.dtype)), row
    assert torch.isfinite(logp).all()

    obs_t = {k: torch.as_tensor(v) for k, v in obs.items()} if isinstance(obs, dict) else torch.as_tensor(obs)
    logp2, entropy, values2 = policy.evaluate(obs_t, actions)  # tensors in
    assert logp2.shape == entropy.shape == values2.shape == (B,)
    assert logp2.requires_grad
    torch.testing.assert_close(logp2, logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values2, values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(policy.value(obs), values, atol=1e-5, rtol=1e-5)
    assert (entropy > 0).all()


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_deterministic_actions_are_the_mode(case):
    _, _, obs_space, act_space = case
    policy = make(*case)
    obs = sample_obs(obs_space, B, seed=1)
    a1, _, _ = policy.act(obs, deterministic=True)
    a2, _, _ = policy.act(obs, deterministic=True)
    torch.testing.assert_close(a1, a2)
    params, _ = policy.action_params(obs)
    head = policy.head
    if isinstance(head, GaussianHead):
        low, high = torch.as_tensor(act_space.low).reshape(-1), torch.as_tensor(act_space.high).reshape(-1)
        expected = low + (torch.tanh(params) + 1) / 2 * (high - low)
        torch.testing.assert_close(a1.reshape(B, -1), expected.detach())
    else:
        expected = head.decode(params.masked_fill(~head.valid, -1e9).argmax(-1))
        torch.testing.assert_close(a1, expected)
        # the mode is at least as likely as any sampled action (dimensions are independent)
        tiled = {k: np.repeat(v, 8, axis=0) for k, v in obs.items()} if isinstance(obs, dict) else np.repeat(obs, 8, 0)
        _, logp_sampled, _ = policy.act(tiled)
        best = policy.evaluate(obs, a1)[0].repeat_interleave(8)
        assert (logp_sampled <= best + 1e-5).all()


def test_sampling_is_random_and_covers_discrete_actions():
    policy = make("mlp", {}, STATE, DISCRETE)
    obs = np.zeros((2000, 5), np.float32)
    actions, _, _ = policy.act(obs)
    counts = torch.bincount(actions, minlength=4)
    assert counts[0] == 0 and (counts[1:] > 500).all()  # start=1; near-uniform at init (out gain 0.01)


# ---------------------------------------------------------------------------------------- math by hand


def test_bin_centres_and_value_to_bin_by_hand():
    low, high = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 10.0])
    centres = bin_centres(low, high, 4)
    torch.testing.assert_close(centres, torch.tensor([[-0.75, -0.25, 0.25, 0.75], [1.25, 3.75, 6.25, 8.75]]))
    values = torch.tensor([[-1.0, 0.0], [0.3, 9.99], [1.0, 5.0], [-0.5, 2.5], [7.0, -3.0]])
    expected = torch.tensor([[0, 0], [2, 3], [3, 2], [1, 1], [3, 0]])  # ends clamp into the edge bins
    torch.testing.assert_close(value_to_bin(values, low, high, 4), expected)


def test_binned_box_head_round_trips_bin_centres():
    space = gym.spaces.Box(np.array([-1.0, 0.0], np.float32), np.array([1.0, 10.0], np.float32))
    head = CategoricalHead(space, bins=4)
    idx = torch.tensor([[0, 3], [2, 1], [3, 0]])
    actions = head.decode(idx)
    torch.testing.assert_close(actions, torch.tensor([[-0.75, 8.75], [0.25, 3.75], [0.75, 1.25]]))
    torch.testing.assert_close(head.encode(actions), idx)
    # any value inside a bin maps to that bin
    torch.testing.assert_close(head.encode(torch.tensor([[-0.99, 2.49], [0.49, 5.01]])), torch.tensor([[0, 0], [2, 2]]))


def test_discrete_and_multidiscrete_heads_apply_start_offsets():
    head = CategoricalHead(gym.spaces.MultiDiscrete([2, 4], start=[10, -1]), bins=None)
    idx = torch.tensor([[1, 0], [0, 3]])
    torch.testing.assert_close(head.decode(idx), torch.tensor([[11, -1], [10, 2]]))
    torch.testing.assert_close(head.encode(head.decode(idx)), idx)
    # the second dimension has 4 classes, the first only 2: class 2/3 of dim 0 is impossible
    logits = torch.zeros(1, 2, 4)
    torch.testing.assert_close(head.entropy(logits), torch.tensor([math.log(2) + math.log(4)]))


@pytest.mark.parametrize(
    "space",
    [gym.spaces.Discrete(3), gym.spaces.MultiDiscrete([2, 5, 3]), gym.spaces.Box(-1.0, 1.0, (2,), np.float32)],
    ids=["discrete", "multidiscrete-padded", "binned-box"],
)
def test_categorical_head_matches_torch_distributions(space):
    head = CategoricalHead(space, bins=4)
    torch.manual_seed(0)
    logits = torch.randn(64, *head.param_shape, requires_grad=True)
    actions = head.sample(logits.detach(), deterministic=False)
    idx = head.encode(actions)
    masked = logits.masked_fill(~head.valid, float("-inf"))
    ref = torch.distributions.Categorical(logits=masked)
    ref_logp, ref_entropy = ref.log_prob(idx).sum(-1), ref.entropy().sum(-1)
    logp, entropy = head.log_prob_and_entropy(logits, actions)
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(entropy, ref_entropy)
    torch.testing.assert_close(head.log_prob(logits, actions), ref_logp)
    torch.testing.assert_close(head.entropy(logits), ref_entropy)
    assert bool((idx < torch.as_tensor(head.valid.sum(-1))).all()), "sampled a class the dimension lacks"
    (g,) = torch.autograd.grad((logp + entropy).sum(), logits)
    (ref_g,) = torch.autograd.grad((ref_logp + ref_entropy).sum(), logits)
    torch.testing.assert_close(g, ref_g)
    torch.testing.assert_close(head.sample(logits.detach(), deterministic=True), head.decode(ref.probs.argmax(-1)))


def test_gaussian_head_log_prob_by_hand():
    head = GaussianHead(gym.spaces.Box(-2.0, 2.0, (1,), np.float32), init_log_std=0.0)
    mean = torch.zeros(1, 1)
    # a = 1 on [-2, 2]: y = 0.5, u = atanh(0.5) = 0.549306; N(u; 0, 1) in logs = -0.150869 - 0.918939;
    # |da/du| = 2 (1 - y^2) = 1.5, log 1.5 = 0.405465  ->  -1.475273
    torch.testing.assert_close(head.log_prob(mean, torch.tensor([[1.0]])), torch.tensor([-1.475273]))
    # the squashed density integrates to 1 over [-2, 2]
    a = torch.linspace(-2 + 1e-4, 2 - 1e-4, 20001)[:, None]
    density = head.log_prob(mean.expand(len(a), 1), a).exp()
    assert abs(torch.trapezoid(density, a[:, 0]).item() - 1.0) < 1e-3
    # entropy of N(0, 1): 0.5 + 0.5 log(2 pi)
    torch.testing.assert_close(head.entropy(mean), torch.tensor([1.418939]))


def test_gaussian_head_leaves_unbounded_dimensions_unsquashed():
    space = gym.spaces.Box(np.array([-1.0, -np.inf], np.float32), np.array([1.0, np.inf], np.float32))
    head = GaussianHead(space, init_log_std=math.log(0.5))
    mean = torch.tensor([[0.3, 4.0]])
    torch.testing.assert_close(head.sample(mean, deterministic=True), torch.tensor([[math.tanh(0.3), 4.0]]))
    # the unbounded dimension alone: log N(4.5; 4, 0.5) = -0.5 - log 0.5 - 0.918939
    lp_both = head.log_prob(mean, torch.tensor([[0.0, 4.5]]))
    lp_first = head.log_prob(mean, torch.tensor([[0.0, 4.0]]))
    torch.testing.assert_close(lp_both - lp_first, torch.tensor([-0.5]))


def test_byte_tokenizer_round_trips():
    ids = tokenize_instruction("pick é", 16)
    assert ids.tolist() == [ord("p") + 1, ord("i") + 1, ord("c") + 1, ord("k") + 1, 33, 0xC3 + 1, 0xA9 + 1]
    assert detokenize_instruction(ids) == "pick é"
    batch = tokenize_instructions(["ab", ""], 4)
    assert batch.tolist() == [[98, 99, 0, 0], [0, 0, 0, 0]]


# ---------------------------------------------------------------------------------------- learning


def _targets(kind, obs, act_space, obs_space):
    """Actions that depend on the observation: a simple function for each model to fit."""
    if kind == "mlp" or (not isinstance(obs_space, gym.spaces.Dict) and len(obs_space.shape) == 1):
        feature = torch.as_tensor(obs if not isinstance(obs, dict) else obs["state"]).reshape(len(obs), -1)[:, 0]
    else:
        rgb = obs["rgb"] if isinstance(obs, dict) else obs
        feature = torch.as_tensor(rgb).float().mean(dim=(1, 2, 3)) - 127.5
    positive = feature > feature.median()
    if isinstance(act_space, gym.spaces.Discrete):
        return torch.where(positive, act_space.start + act_space.n - 1, act_space.start)
    low, high = torch.as_tensor(act_space.low), torch.as_tensor(act_space.high)
    return torch.where(positive[:, None], 0.7 * high + 0.3 * low, 0.7 * low + 0.3 * high)


STEPS = 30
FIT_CASES = [
    ("mlp", {}, STATE, DISCRETE, 1e-2),
    ("mlp", {}, STATE, BOX, 1e-2),
    ("cnn", {}, gym.spaces.Box(0, 255, (36, 36, 3), np.uint8), DISCRETE, 1e-3),
    ("cnn", {"action_bins": 9}, MANISKILL_RGB, BOX, 1e-3),
    ("vla", VLA, MANISKILL_RGB, BOX, 3e-3),
    ("vla", {**VLA, "d_model": 64}, STATE, BOX, 3e-3),
]


@pytest.mark.parametrize("case", FIT_CASES, ids=[_ids(c[:4]) for c in FIT_CASES])
def test_each_kind_fits_a_simple_target(case):
    kind, over, obs_space, act_space, lr = case
    torch.manual_seed(0)
    policy = make(kind, over, obs_space, act_space)
    obs = sample_obs(obs_space, 32, seed=2)
    target = _targets(kind, obs, act_space, obs_space)
    returns = torch.linspace(-1.0, 1.0, 32)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    nll, mse = [], []
    for _ in range(STEPS):
        logp, _, values = policy.evaluate(obs, target)
        loss_pi, loss_v = -logp.mean(), ((values - returns) ** 2).mean()
        opt.zero_grad()
        (loss_pi + loss_v).backward()
        opt.step()
        nll.append(loss_pi.item())
        mse.append(loss_v.item())
    assert nll[-1] < nll[0] - 0.5, nll[::5]
    assert mse[-1] < 0.5 * mse[0], mse[::5]
    # the fitted policy now acts like the target
    actions, _, _ = policy.act(obs, deterministic=True)
    if isinstance(act_space, gym.spaces.Discrete):
        assert (actions == target).float().mean() > 0.9
    else:
        assert (actions - target).abs().mean() < 0.3 * float(np.mean(act_space.high - act_space.low))


# ---------------------------------------------------------------------------------------- the VLA's instruction


def test_vla_output_depends_on_the_instruction():
    a = make("vla", VLA, MANISKILL_RGB, BOX)
    b = build_policy(PolicyConfig(kind="vla", **{**VLA, "instruction": "lift the cube"}), MANISKILL_RGB, BOX)
    b.load_state_dict(a.state_dict())  # same weights, other instruction
    obs = sample_obs(MANISKILL_RGB, B, seed=3)
    logits_a, values_a = a.action_params(obs)
    logits_b, values_b = b.action_params(obs)
    assert (logits_a - logits_b).abs().max() > 1e-4
    assert (values_a - values_b).abs().max() > 1e-4

    # a per-sample instruction in the observation (padded) overrides the configured one
    texts = ["lift the cube", "push the cube"] * (B // 2)
    mixed = {**obs, "instruction": tokenize_instructions(texts, a.cfg.max_instruction_tokens)}
    logits_m, values_m = a.action_params(mixed)
    torch.testing.assert_close(logits_m[0::2], logits_b[0::2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_m[1::2], logits_a[1::2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values_m[0::2], values_b[0::2], atol=1e-5, rtol=1e-5)
    actions, logp, _ = a.act(mixed)
    torch.testing.assert_close(a.evaluate(mixed, actions)[0], logp, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "transformer"}, "kind='transformer' is not one of ['mlp', 'cnn', 'vla']"),
        ({"kind": "cnm"}, "did you mean 'cnn'"),
        ({"hidden_sizes": (64, 0)}, "hidden_sizes=(64, 0) must be a non-empty list of positive ints"),
        ({"hidden_sizes": ()}, "hidden_sizes=() must be a non-empty"),
        ({"activation": "sigmoid"}, "activation='sigmoid' is not one of"),
        ({"action_bins": 1}, "action_bins=1 must be None (Gaussian actions) or an int >= 2"),
        ({"d_model": 64, "num_heads": 6}, "d_model=64 is not divisible by num_heads=6; attention splits d_model"),
        ({"vocab_size": 100}, "vocab_size=100 is too small for the byte tokenizer"),
        ({"patch_size": 0}, "patch_size=0 must be a positive int"),
        ({"instruction": "x" * 70}, "is 70 bytes, more than max_instruction_tokens=64; set max_instruction_tokens=70"),
    ],
)
def test_bad_configs_name_the_value_and_a_fix(fields, message):
    with pytest.raises(ConfigError) as err:
        PolicyConfig(**fields)
    assert message in str(err.value)


def test_config_loads_from_yaml_like_dicts():
    cfg = from_dict(PolicyConfig, {"kind": "vla", "hidden_sizes": [32, 32], "action_bins": None})
    assert cfg.hidden_sizes == (32, 32) and cfg.bins == 256
    assert PolicyConfig(kind="mlp").bins is None
    with pytest.raises(ConfigError, match="Did you mean 'cnn'"):
        from_dict(PolicyConfig, {"kind": "cnnn"})


@pytest.mark.parametrize(
    ("kind", "over", "obs_space", "act_space", "message"),
    [
        ("mlp", {}, IMAGE64, DISCRETE, "holds images; use kind='cnn' or kind='vla'"),
        ("cnn", {}, STATE, DISCRETE, "has no image; use kind='mlp'"),
        ("vla", {"use_state": False}, gym.spaces.Dict({"state": STATE}), BOX, "use_state=false drops its state"),
        ("cnn", {}, IMAGE32, DISCRETE, "32x32 pixels are too small for the Nature-CNN stack"),
        ("vla", {"patch_size": 64}, IMAGE32, DISCRETE, "patch_size=64 is larger than the 32x32 image"),
        ("mlp", {"action_bins": 8}, STATE, gym.spaces.Box(-np.inf, np.inf, (2,)), "action_bins=8 needs finite Box"),
        ("vla", {}, IMAGE32, gym.spaces.Box(-np.inf, np.inf, (2,)), "action_bins=256 needs finite Box"),
        ("mlp", {}, STATE, gym.spaces.Tuple([DISCRETE]), "is not supported; use Box, Discrete or MultiDiscrete"),
        (
            "cnn",
            {},
            gym.spaces.Dict({"rgb": IMAGE64, "depth": IMAGE64}),
            DISCRETE,
            "has keys ['depth'] that policies do not read",
        ),
        ("mlp", {}, gym.spaces.Discrete(4), DISCRETE, "observation space Discrete(4) is not supported"),
    ],
)
def test_bad_spaces_name_the_space_and_a_fix(kind, over, obs_space, act_space, message):
    with pytest.raises(ConfigError) as err:
        build_policy(PolicyConfig(kind=kind, **over), obs_space, act_space)
    assert message in str(err.value)


def test_state_dict_holds_only_float_weights_and_read_only_obs_are_accepted():
    policy = make("vla", VLA, MANISKILL_RGB, BOX)
    state = policy.state_dict()
    assert all(v.is_floating_point() for v in state.values())
    assert "head.log_std" not in state and not any(k.endswith(("low", "high", "instruction")) for k in state)
    obs = sample_obs(MANISKILL_RGB, 2)
    for v in obs.values():
        v.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a non-writable array
        policy.act(obs)


def test_bad_inputs_name_the_shape_and_a_fix():
    policy = make("mlp", {}, STATE, BOX)
    with pytest.raises(ValueError, match=r"shape \(5,\); expected \[B, 5\].*Add a batch dimension"):
        policy.act(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"actions have shape \(4, 2\); expected \(4, 3\)"):
        policy.evaluate(np.zeros((4, 5), np.float32), torch.zeros(4, 2))
    with pytest.raises(TypeError, match="pass one array, not a dict"):
        policy.act({"state": np.zeros((4, 5), np.float32)})
    cnn = make("cnn", {}, MANISKILL_RGB, BOX)
    with pytest.raises(KeyError, match="obs has no 'rgb' entry"):
        cnn.act({"state": np.zeros((4, 9), np.float32)})
    with pytest.raises(TypeError, match="must be a dict with keys"):
        cnn.act(np.zeros((4, 40, 48, 6), np.uint8))
