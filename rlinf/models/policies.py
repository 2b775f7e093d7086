"""Actor-critic policies for embodied RL: an MLP for state vectors, a Nature-style CNN for pixels and a
small vision-language-action (VLA) transformer.

``build_policy(cfg, observation_space, action_space)`` returns a ``Policy`` with three methods, which
is all a PPO or GRPO loop needs:

- ``act(obs, deterministic=False) -> (actions, logprobs [B], values [B])``, without gradients;
- ``evaluate(obs, actions) -> (logprobs [B], entropy [B], values [B])``, also reachable as
  ``policy(obs, actions)`` so that a ``DistributedDataParallel`` wrapper synchronises gradients;
- ``value(obs) -> values [B]``.

**Observations** are batched on dim 0 and may be tensors or numpy arrays (moved to the policy's
device): one array for a ``Box`` space, a dict of arrays for a ``Dict`` space with a ``"state"``
and/or an ``"rgb"`` key (what ``ManiSkillVectorEnv(obs_mode="rgb")`` returns). A ``Box`` with three
dimensions and dtype ``uint8`` is an image ``[H, W, C]`` (channels last, cameras concatenated on C);
uint8 images are scaled to ``[0, 1]`` inside the policy. Any other ``Box`` is a state, flattened.

**Actions** come back as tensors in the env's action space:

- ``Discrete(n)``: ``int64 [B]``, ``start`` included; ``MultiDiscrete``: ``int64 [B, *nvec.shape]``.
- ``Box`` with ``action_bins=None`` (MLP and CNN): ``float32 [B, *shape]`` from a diagonal Gaussian with
  a state-independent log-std, **squashed by tanh** into ``[low, high]`` on every dimension with
  finite bounds (dimensions without bounds are returned as sampled). Log-probs include the tanh
  Jacobian and are computed from the returned action, so ``evaluate(obs, act(obs)[0])`` reproduces
  ``act``'s log-probs and the env never sees an action out of bounds. ``deterministic=True`` gives
  ``squash(mean)`` (the median of the squashed distribution); the entropy is that of the Gaussian
  before squashing, which has a closed form (the squashed one does not).
- ``Box`` with ``action_bins=K`` (always for the VLA): each dimension is a categorical over ``K`` equal
  bins of ``[low, high]`` (the action tokens); bin ``i`` maps to its centre
  ``low + (i + 0.5) * (high - low) / K``, and ``evaluate`` maps any in-bounds value back to the bin
  holding it. ``deterministic=True`` gives the most likely bin of each dimension.

Log-probs and entropies are summed over action dimensions. ``state_dict()`` holds only learned
weights: action bounds come from the spaces and the instruction from the config.

**Networks and value heads.** Linear and conv layers use orthogonal init as in common PPO practice:
gain ``sqrt(2)`` for hidden layers, 0.01 for the action output, 1 for the value output, zero biases.

- ``mlp``: separate actor and critic MLPs of ``hidden_sizes`` with ``activation``.
- ``cnn``: Nature-CNN conv stack (8x8/4, 4x4/2, 3x3/1, ReLU) on images of at least 36x36 pixels, the
  state concatenated to its features when the space has one (``use_state``), one ReLU layer of
  ``cnn_hidden`` units shared by the action and the value head.
- ``vla``: image patches embedded by a linear map (a stride-``patch_size`` convolution), the
  instruction as byte tokens (``tokenize_instruction``, no vocabulary to download), the state as one
  token, a learned pooling token and one query token per action dimension go through a
  pre-norm transformer encoder; each action token gives logits over the bins (a linear layer shared
  by all dimensions), the pooling token gives the value. The instruction is ``cfg.instruction``, or
  per sample the ``"instruction"`` entry of a dict observation (``int64 [B, L]`` from
  ``tokenize_instructions``, 0 = padding). Transformer weights keep PyTorch's init; the output heads
  are orthogonal as above. Without an image in the space it reads the state and the instruction
  alone (a language-conditioned transformer over states; no rendering needed).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
import torch
from torch import Tensor, nn

from rlinf.errors import ConfigError

if TYPE_CHECKING:  # gymnasium comes with the embodied extra; imported where spaces are read
    import gymnasium as gym

PolicyKind = Literal["mlp", "cnn", "vla"]
POLICY_KINDS: tuple[str, ...] = ("mlp", "cnn", "vla")
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
PAD_TOKEN = 0
BYTE_VOCAB = 257  # padding + 256 byte values
VLA_DEFAULT_BINS = 256
_OBS_KEYS = ("state", "rgb", "instruction")
_SQUASH_EPS = 1e-6
_NATURE_CNN = ((8, 4), (4, 2), (3, 1))  # (kernel, stride) of each conv layer

ObsInput: TypeAlias = Tensor | np.ndarray | Mapping[str, Tensor | np.ndarray]
"""A batch of observations: an array/tensor ``[B, ...]`` or a dict of them."""


@dataclass(frozen=True)
class PolicyConfig:
    """How to build a policy; only the fields of the chosen ``kind`` are used.

    Args:
        kind: ``"mlp"`` (state vectors), ``"cnn"`` (images, plus state if present) or ``"vla"``
            (images, instruction, plus state if present).
        hidden_sizes: MLP layer widths (actor and critic each get these).
        activation: MLP activation: ``tanh``, ``relu``, ``gelu`` or ``silu``.
        init_log_std: initial log standard deviation of Gaussian (``Box``) actions.
        action_bins: None: Gaussian ``Box`` actions for ``mlp``/``cnn`` and ``VLA_DEFAULT_BINS`` bins for
            ``vla``; an int ``K >= 2``: every ``Box`` dimension is a categorical over ``K`` bins.
        conv_channels: output channels of the three CNN conv layers.
        cnn_hidden: width of the CNN's fully connected layer.
        use_state: ``cnn``/``vla``: also feed ``obs["state"]`` when the observation space has one.
        d_model: VLA token width.
        num_layers: VLA transformer layers.
        num_heads: VLA attention heads; must divide ``d_model``.
        patch_size: VLA image patch side in pixels.
        vocab_size: VLA token embedding rows; the byte tokenizer needs at least ``BYTE_VOCAB`` (257).
        max_instruction_tokens: longest instruction in bytes (one token per UTF-8 byte).
        instruction: the VLA's default language instruction, e.g. ``"push the cube to the goal"``.
    """

    kind: PolicyKind = "mlp"
    hidden_sizes: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    init_log_std: float = 0.0
    action_bins: int | None = None
    conv_channels: tuple[int, int, int] = (32, 64, 64)
    cnn_hidden: int = 512
    use_state: bool = True
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    patch_size: int = 16
    vocab_size: int = BYTE_VOCAB
    max_instruction_tokens: int = 64
    instruction: str = ""

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            near = difflib.get_close_matches(str(self.kind), POLICY_KINDS, n=1)
            hint = f"did you mean {near[0]!r}?" if near else "use 'mlp' for state vectors, 'cnn' for images."
            raise ConfigError(f"policy kind={self.kind!r} is not one of {list(POLICY_KINDS)}; {hint}")
        if not self.hidden_sizes or any(not _is_pos_int(h) for h in self.hidden_sizes):
            raise ConfigError(
                f"policy hidden_sizes={self.hidden_sizes!r} must be a non-empty list of positive ints, e.g. [64, 64]."
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"policy activation={self.activation!r} is not one of {list(ACTIVATIONS)}; use 'tanh'.")
        if not math.isfinite(self.init_log_std):
            raise ConfigError(f"policy init_log_std={self.init_log_std!r} must be a finite number, e.g. 0.0.")
        if self.action_bins is not None and (not _is_pos_int(self.action_bins) or self.action_bins < 2):
            raise ConfigError(
                f"policy action_bins={self.action_bins!r} must be None (Gaussian actions) or an int >= 2, e.g. 256."
            )
        if len(self.conv_channels) != 3 or any(not _is_pos_int(c) for c in self.conv_channels):
            raise ConfigError(
                f"policy conv_channels={self.conv_channels!r} must be 3 positive ints, e.g. [32, 64, 64]."
            )
        for name in ("cnn_hidden", "d_model", "num_layers", "num_heads", "patch_size", "max_instruction_tokens"):
            if not _is_pos_int(getattr(self, name)):
                raise ConfigError(f"policy {name}={getattr(self, name)!r} must be a positive int.")
        if self.d_model % self.num_heads:
            fit = max(h for h in range(1, self.num_heads + 1) if self.d_model % h == 0)
            raise ConfigError(
                f"policy d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                f"attention splits d_model across heads. Use num_heads={fit} or a d_model that is a multiple of it."
            )
        if not _is_pos_int(self.vocab_size) or self.vocab_size < BYTE_VOCAB:
            raise ConfigError(
                f"policy vocab_size={self.vocab_size!r} is too small for the byte tokenizer, which uses "
                f"{BYTE_VOCAB} ids (padding + 256 bytes); use vocab_size={BYTE_VOCAB}."
            )
        n = len(self.instruction.encode("utf-8"))
        if n > self.max_instruction_tokens:
            raise ConfigError(
                f"policy instruction {self.instruction!r} is {n} bytes, more than "
                f"max_instruction_tokens={self.max_instruction_tokens}; set max_instruction_tokens={n} or shorten it."
            )

    @property
    def bins(self) -> int | None:
        """Bins per ``Box`` action dimension, None for Gaussian actions (the VLA always uses bins)."""
        if self.kind == "vla" and self.action_bins is None:
            return VLA_DEFAULT_BINS
        return self.action_bins


def _is_pos_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool) and bool(x > 0)


# ------------------------------------------------------------------------------------- tokenizer


def tokenize_instruction(text: str, max_tokens: int) -> Tensor:
    """Byte-level token ids of one instruction: byte ``b`` is id ``b + 1``; ``PAD_TOKEN`` (0) is padding.

    Args:
        text: the instruction.
        max_tokens: the longest allowed encoding in bytes.

    Returns:
        ``int64 [len(text.encode())]``, unpadded.
    """
    data = text.encode("utf-8")
    if len(data) > max_tokens:
        raise ValueError(
            f"instruction {text!r} is {len(data)} bytes, more than max_tokens={max_tokens}; shorten it or "
            f"raise the policy's max_instruction_tokens."
        )
    return torch.tensor(list(data), dtype=torch.int64) + 1


def tokenize_instructions(texts: Sequence[str], max_tokens: int) -> Tensor:
    """A batch of instructions as ``int64 [B, max_tokens]``, right-padded with ``PAD_TOKEN``; pass it as
    ``obs["instruction"]`` to give each sample its own instruction."""
    out = torch.full((len(texts), max_tokens), PAD_TOKEN, dtype=torch.int64)
    for i, text in enumerate(texts):
        ids = tokenize_instruction(text, max_tokens)
        out[i, : len(ids)] = ids
    return out


def detokenize_instruction(ids: Tensor) -> str:
    """The text of ``int64 [L]`` byte ids (padding dropped); the inverse of ``tokenize_instruction``."""
    return bytes(int(i) - 1 for i in ids.tolist() if i != PAD_TOKEN).decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------- action heads


def bin_centres(low: Tensor, high: Tensor, bins: int) -> Tensor:
    """Centres of ``bins`` equal bins per dimension: ``[A] -> [A, bins]``."""
    frac = (torch.arange(bins, dtype=torch.float32, device=low.device) + 0.5) / bins
    return low[:, None] + frac[None, :] * (high - low)[:, None]


def value_to_bin(values: Tensor, low: Tensor, high: Tensor, bins: int) -> Tensor:
    """The bin holding each value, ``float [B, A] -> int64 [B, A]``; values outside ``[low, high]`` get the
    nearest end bin."""
    idx = torch.floor((values - low) / (high - low) * bins).long()
    return idx.clamp(0, bins - 1)


class GaussianHead(nn.Module):
    """Tanh-squashed diagonal Gaussian over a ``Box``; parameters are the means ``[B, A]``.

    Args:
        space: the action ``Box``.
        init_log_std: initial (state-independent, learned) log standard deviation.
    """

    low: Tensor
    high: Tensor
    bounded: Tensor

    def __init__(self, space: gym.spaces.Box, init_log_std: float) -> None:
        super().__init__()
        self.action_shape: tuple[int, ...] = tuple(space.shape)
        low = torch.as_tensor(np.asarray(space.low, dtype=np.float64).reshape(-1), dtype=torch.float32)
        high = torch.as_tensor(np.asarray(space.high, dtype=np.float64).reshape(-1), dtype=torch.float32)
        bounded = torch.isfinite(low) & torch.isfinite(high)
        self.register_buffer("low", torch.where(bounded, low, -1.0), persistent=False)
        self.register_buffer("high", torch.where(bounded, high, 1.0), persistent=False)
        self.register_buffer("bounded", bounded, persistent=False)
        self.num_dims = int(low.numel())
        self.log_std = nn.Parameter(torch.full((self.num_dims,), float(init_log_std)))

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape of the parameters per sample (the means)."""
        return (self.num_dims,)

    def sample(self, mean: Tensor, deterministic: bool) -> Tensor:
        """Actions ``float32 [B, *shape]`` for means ``[B, A]``."""
        u = mean if deterministic else mean + torch.randn_like(mean) * self.log_std.exp()
        squashed = self.low + (torch.tanh(u) + 1.0) * 0.5 * (self.high - self.low)
        return torch.where(self.bounded, squashed, u).reshape(-1, *self.action_shape)

    def log_prob(self, mean: Tensor, actions: Tensor) -> Tensor:
        """Log-density ``[B]`` of ``actions [B, *shape]`` (tanh Jacobian included)."""
        a = actions.reshape(mean.shape).to(mean.dtype)
        half = 0.5 * (self.high - self.low)
        y = ((a - self.low) / half - 1.0).clamp(-1.0 + _SQUASH_EPS, 1.0 - _SQUASH_EPS)
        u = torch.where(self.bounded, torch.atanh(y), a)
        std = self.log_std.exp()
        gauss = -0.5 * ((u - mean) / std) ** 2 - self.log_std - 0.5 * math.log(2 * math.pi)
        jacobian = torch.where(self.bounded, torch.log1p(-y * y) + torch.log(half), torch.zeros_like(y))
        return (gauss - jacobian).sum(-1)

    def entropy(self, mean: Tensor) -> Tensor:
        """Entropy ``[B]`` of the Gaussian before squashing."""
        per_dim = 0.5 + 0.5 * math.log(2 * math.pi) + self.log_std
        return per_dim.sum().expand(mean.shape[0])

    def log_prob_and_entropy(self, mean: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """``(log_prob(mean, actions), entropy(mean))``."""
        return self.log_prob(mean, actions), self.entropy(mean)


class CategoricalHead(nn.Module):
    """Independent categoricals over ``D`` action dimensions; parameters are logits ``[B, D, K]``.

    Covers ``Discrete`` (``D = 1``), ``MultiDiscrete`` (``K = max(nvec)``, extra classes masked) and a
    binned ``Box`` (``K = bins``; actions are bin centres).

    Args:
        space: the action space.
        bins: bins per ``Box`` dimension (ignored for discrete spaces).
    """

    low: Tensor
    high: Tensor
    valid: Tensor
    start: Tensor

    def __init__(self, space: gym.Space[Any], bins: int | None) -> None:
        import gymnasium as gym

        super().__init__()
        self.action_shape: tuple[int, ...] = tuple(space.shape or ())
        self.binned = isinstance(space, gym.spaces.Box)
        if isinstance(space, gym.spaces.Box):
            if bins is None:
                raise ConfigError("CategoricalHead: a Box action space needs action_bins >= 2.")
            low = np.asarray(space.low, dtype=np.float64).reshape(-1)
            high = np.asarray(space.high, dtype=np.float64).reshape(-1)
            if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
                raise ConfigError(
                    f"action_bins={bins} needs finite Box bounds, but the action space is {space}; "
                    f"use action_bins=None (Gaussian actions) or wrap the env to rescale its actions."
                )
            nvec = np.full(low.size, bins)
            start = np.zeros(low.size, dtype=np.int64)
            self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32), persistent=False)
            self.register_buffer("high", torch.as_tensor(high, dtype=torch.float32), persistent=False)
        elif isinstance(space, gym.spaces.Discrete):
            nvec = np.array([int(space.n)])
            start = np.array([int(space.start)])
        elif isinstance(space, gym.spaces.MultiDiscrete):
            nvec = np.asarray(space.nvec).reshape(-1)
            start = np.asarray(space.start).reshape(-1)
        else:
            raise ConfigError(f"CategoricalHead: action space {space} is not Box, Discrete or MultiDiscrete.")
        self.num_dims = int(nvec.size)
        self.num_classes = int(nvec.max())
        valid = torch.arange(self.num_classes)[None, :] < torch.as_tensor(nvec)[:, None]
        self.register_buffer("valid", valid, persistent=False)
        self.register_buffer("start", torch.as_tensor(start, dtype=torch.int64), persistent=False)
        self.bins = self.num_classes if self.binned else None
        self.padded = bool(not valid.all())  # MultiDiscrete with unequal sizes: some classes masked

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape of the parameters per sample (the logits)."""
        return (self.num_dims, self.num_classes)

    def _log_softmax(self, logits: Tensor) -> Tensor:
        """Normalised log-probabilities ``[B, D, K]``; classes a dimension does not have get ``finfo.min``."""
        if not self.padded:
            return torch.log_softmax(logits, dim=-1)
        masked = logits.masked_fill(~self.valid, torch.finfo(logits.dtype).min)
        return torch.log_softmax(masked, dim=-1).clamp(min=torch.finfo(logits.dtype).min)

    def decode(self, idx: Tensor) -> Tensor:
        """Class indices ``int64 [B, D]`` -> actions in the env's space."""
        if self.binned:
            centres = bin_centres(self.low, self.high, self.num_classes)  # [D, K]
            values = centres.gather(1, idx.t()).t()
            return values.reshape(-1, *self.action_shape)
        return (idx + self.start).reshape(-1, *self.action_shape)

    def encode(self, actions: Tensor) -> Tensor:
        """Actions in the env's space -> class indices ``int64 [B, D]``."""
        flat = actions.reshape(actions.shape[0], self.num_dims)
        if self.binned:
            return value_to_bin(flat.float(), self.low, self.high, self.num_classes)
        return flat.long() - self.start

    def sample(self, logits: Tensor, deterministic: bool) -> Tensor:
        """Actions for logits ``[B, D, K]``: sampled, or the most likely class of each dimension."""
        logp = self._log_softmax(logits)
        if deterministic:
            idx = logp.argmax(-1)
        else:
            idx = torch.multinomial(logp.exp().reshape(-1, self.num_classes), 1).reshape(logp.shape[:-1])
        return self.decode(idx)

    def log_prob(self, logits: Tensor, actions: Tensor) -> Tensor:
        """Log-probability ``[B]`` of ``actions``, summed over dimensions."""
        return self._taken(self._log_softmax(logits), actions)

    def entropy(self, logits: Tensor) -> Tensor:
        """Entropy ``[B]``, summed over dimensions."""
        return _categorical_entropy(self._log_softmax(logits))

    def log_prob_and_entropy(self, logits: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """``(log_prob(logits, actions), entropy(logits))`` with one softmax (the training step's hot path)."""
        logp = self._log_softmax(logits)
        return self._taken(logp, actions), _categorical_entropy(logp)

    def _taken(self, logp: Tensor, actions: Tensor) -> Tensor:
        """The log-probabilities ``[B, D, K]`` of ``actions``' classes, summed over dimensions: ``[B]``."""
        return logp.gather(-1, self.encode(actions)[..., None]).squeeze(-1).sum(-1)


def _categorical_entropy(logp: Tensor) -> Tensor:
    """``-sum p log p`` over classes and dimensions: ``[B, D, K] -> [B]`` (masked classes add 0)."""
    return -(logp.exp() * logp).sum((-2, -1))


ActionHead: TypeAlias = GaussianHead | CategoricalHead


# ------------------------------------------------------------------------------------- observations


@dataclass(frozen=True)
class ObsLayout:
    """What a policy reads from an observation space.

    Args:
        state_shape: shape of one state observation, or None.
        rgb_shape: ``(H, W, C)`` of one image, or None.
        rgb_scale: factor applied to images (1/255 for uint8).
        is_dict: whether observations are dicts.
    """

    state_shape: tuple[int, ...] | None
    rgb_shape: tuple[int, int, int] | None
    rgb_scale: float
    is_dict: bool

    @property
    def state_dim(self) -> int:
        """Length of the flattened state (0 without one)."""
        return int(np.prod(self.state_shape)) if self.state_shape is not None else 0

    @staticmethod
    def from_space(space: gym.Space[Any]) -> ObsLayout:
        """Reads a ``Box`` (state or uint8 ``[H, W, C]`` image) or a ``Dict`` with ``state``/``rgb`` keys."""
        import gymnasium as gym

        if isinstance(space, gym.spaces.Box):
            if _is_image(space):
                return ObsLayout(None, _hwc(space), 1.0 / 255.0, is_dict=False)
            return ObsLayout(tuple(space.shape or ()), None, 1.0, is_dict=False)
        if isinstance(space, gym.spaces.Dict):
            extra = [k for k in space.spaces if k not in ("state", "rgb")]
            if extra or not space.spaces:
                raise ConfigError(
                    f"observation space {space} has keys {extra or '(none)'} that policies do not read; "
                    f"policies take a Dict with 'state' and/or 'rgb' Box entries (drop or rename the others)."
                )
            state, rgb = space.spaces.get("state"), space.spaces.get("rgb")
            for key, sub in (("state", state), ("rgb", rgb)):
                if sub is not None and not isinstance(sub, gym.spaces.Box):
                    raise ConfigError(f"observation space entry {key!r} is {sub}; policies need a Box there.")
            if rgb is not None and len(rgb.shape or ()) != 3:
                raise ConfigError(f"observation 'rgb' has shape {rgb.shape}; expected an image [H, W, C].")
            return ObsLayout(
                tuple(state.shape or ()) if state is not None else None,
                _hwc(rgb) if rgb is not None else None,
                1.0 / 255.0 if rgb is not None and rgb.dtype == np.uint8 else 1.0,
                is_dict=True,
            )
        raise ConfigError(
            f"observation space {space} is not supported; policies take a Box (state vector or uint8 "
            f"[H, W, C] image) or a Dict with 'state'/'rgb' keys."
        )


def _is_image(space: gym.spaces.Box) -> bool:
    return len(space.shape) == 3 and space.dtype == np.uint8


def _hwc(space: gym.Space[Any]) -> tuple[int, int, int]:
    h, w, c = space.shape or (0, 0, 0)
    return int(h), int(w), int(c)


def _as_tensor(x: Any, device: torch.device, what: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, np.ndarray | np.generic | list | tuple | int | float):
        arr = np.asarray(x)
        if not arr.flags.writeable:  # e.g. an env's read-only final_obs; torch warns on those
            arr = arr.copy()
        return torch.as_tensor(arr, device=device)
    raise TypeError(f"{what}: got {type(x).__name__}; pass a torch tensor or a numpy array batched on dim 0.")


# ------------------------------------------------------------------------------------- networks


def _layer_init(layer: nn.Linear | nn.Conv2d, gain: float) -> nn.Linear | nn.Conv2d:
    nn.init.orthogonal_(layer.weight, gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str, out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [_layer_init(nn.Linear(in_dim, h), math.sqrt(2)), ACTIVATIONS[activation]()]
        in_dim = h
    layers.append(_layer_init(nn.Linear(in_dim, out_dim), out_gain))
    return nn.Sequential(*layers)


class MLPTrunk(nn.Module):
    """Separate actor and critic MLPs on the flattened state.

    Args:
        state_dim: flattened state length.
        out_dim: number of action parameters.
        hidden_sizes: layer widths of each MLP.
        activation: a key of ``ACTIVATIONS``.
    """

    def __init__(self, state_dim: int, out_dim: int, hidden_sizes: Sequence[int], activation: str) -> None:
        super().__init__()
        self.actor = _mlp(state_dim, hidden_sizes, out_dim, activation, out_gain=0.01)
        self.critic = _mlp(state_dim, hidden_sizes, 1, activation, out_gain=1.0)

    def forward(self, obs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``obs["state"] [B, D]`` -> (action parameters ``[B, out_dim]``, values ``[B]``)."""
        x = obs["state"]
        return self.actor(x), self.critic(x).squeeze(-1)


def conv_output_hw(h: int, w: int) -> tuple[int, int]:
    """Spatial size after the Nature-CNN conv stack (``(n - kernel) // stride + 1`` per layer)."""
    for k, s in _NATURE_CNN:
        h, w = (h - k) // s + 1, (w - k) // s + 1
    return h, w


class CNNTrunk(nn.Module):
    """Nature-CNN on ``[B, H, W, C]`` images (plus the state, if given), shared by both heads.

    Args:
        rgb_shape: ``(H, W, C)``.
        rgb_scale: factor applied to pixels (1/255 for uint8).
        state_dim: flattened state length concatenated to the conv features (0 for none).
        out_dim: number of action parameters.
        conv_channels: output channels of the three conv layers.
        hidden: width of the shared fully connected layer.
    """

    def __init__(
        self,
        rgb_shape: tuple[int, int, int],
        rgb_scale: float,
        state_dim: int,
        out_dim: int,
        conv_channels: Sequence[int],
        hidden: int,
    ) -> None:
        super().__init__()
        h, w, c = rgb_shape
        oh, ow = conv_output_hw(h, w)
        if oh < 1 or ow < 1:
            raise ConfigError(
                f"cnn policy: images of {h}x{w} pixels are too small for the Nature-CNN stack "
                f"(8x8/4, 4x4/2, 3x3/1 needs at least 36x36); render larger images or use kind='vla' "
                f"with a small patch_size."
            )
        self.rgb_scale = rgb_scale
        layers: list[nn.Module] = []
        in_ch = c
        for (k, s), ch in zip(_NATURE_CNN, conv_channels, strict=True):
            layers += [_layer_init(nn.Conv2d(in_ch, ch, k, s), math.sqrt(2)), nn.ReLU()]
            in_ch = ch
        self.conv = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Sequential(_layer_init(nn.Linear(in_ch * oh * ow + state_dim, hidden), math.sqrt(2)), nn.ReLU())
        self.use_state = state_dim > 0
        self.actor = _layer_init(nn.Linear(hidden, out_dim), 0.01)
        self.critic = _layer_init(nn.Linear(hidden, 1), 1.0)

    def forward(self, obs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``obs["rgb"] [B, H, W, C]`` (and ``obs["state"]``) -> (action parameters, values ``[B]``)."""
        img = obs["rgb"].permute(0, 3, 1, 2).float() * self.rgb_scale
        x = self.conv(img)
        if self.use_state:
            x = torch.cat([x, obs["state"]], dim=-1)
        x = self.fc(x)
        return self.actor(x), self.critic(x).squeeze(-1)


class VLATrunk(nn.Module):
    """Small vision-language-action transformer: ``[pool, state?, instruction, patches, action queries]``.

    Args:
        cfg: the policy config (``d_model``, ``num_layers``, ``num_heads``, ``patch_size``, ``vocab_size``,
            ``max_instruction_tokens``, ``instruction``).
        rgb_shape: ``(H, W, C)``, or None: no image tokens (then ``state_dim`` must be positive).
        rgb_scale: factor applied to pixels (1/255 for uint8).
        state_dim: flattened state length given one token (0 for none).
        num_dims: action dimensions ``D`` (one query token each).
        num_classes: logits per action token ``K``.
    """

    instruction: Tensor

    def __init__(
        self,
        cfg: PolicyConfig,
        rgb_shape: tuple[int, int, int] | None,
        rgb_scale: float,
        state_dim: int,
        num_dims: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        p, d = cfg.patch_size, cfg.d_model
        self.rgb_scale = rgb_scale
        self.num_dims = num_dims
        self.max_tokens = cfg.max_instruction_tokens
        self.patch: nn.Conv2d | None = None
        self.pos_patch: nn.Parameter | None = None
        if rgb_shape is not None:
            h, w, c = rgb_shape
            if p > h or p > w:
                raise ConfigError(
                    f"vla policy: patch_size={p} is larger than the {h}x{w} image; use patch_size <= {min(h, w)} "
                    f"(e.g. {max(1, min(h, w) // 8)} for an 8x8 grid of patches)."
                )
            self.patch = nn.Conv2d(c, d, kernel_size=p, stride=p)  # one linear map per non-overlapping patch
            self.pos_patch = nn.Parameter(torch.randn(1, (h // p) * (w // p), d) * 0.02)
        self.token = nn.Embedding(cfg.vocab_size, d, padding_idx=PAD_TOKEN)
        self.state_proj: nn.Linear | None = nn.Linear(state_dim, d) if state_dim > 0 else None
        self.pool = nn.Parameter(torch.zeros(1, 1, d))
        self.queries = nn.Parameter(torch.randn(1, num_dims, d) * 0.02)
        self.pos_text = nn.Parameter(torch.randn(1, cfg.max_instruction_tokens, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, cfg.num_heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.action_out = _layer_init(nn.Linear(d, num_classes), 0.01)
        self.value_out = _layer_init(nn.Linear(d, 1), 1.0)
        # Not saved with the weights: the instruction belongs to the config, so one set of weights can
        # be loaded under another instruction.
        self.register_buffer("instruction", tokenize_instruction(cfg.instruction, self.max_tokens), persistent=False)

    def forward(self, obs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``obs["rgb"]`` and/or ``obs["state"]``, optional ``obs["instruction"] [B, L]`` -> (logits
        ``[B, D, K]``, values ``[B]``)."""
        patches: list[Tensor] = []
        if self.patch is not None and self.pos_patch is not None:
            img = obs["rgb"].permute(0, 3, 1, 2).float() * self.rgb_scale
            patches.append(self.patch(img).flatten(2).transpose(1, 2) + self.pos_patch)
        b = (patches[0] if patches else obs["state"]).shape[0]
        ids = obs.get("instruction")
        if ids is None:
            ids = self.instruction.expand(b, -1)
        text = self.token(ids) + self.pos_text[:, : ids.shape[1]]
        parts = [self.pool.expand(b, -1, -1)]
        if self.state_proj is not None:
            parts.append(self.state_proj(obs["state"])[:, None])
        head = len(parts)
        parts += [text, *patches, self.queries.expand(b, -1, -1)]
        x = torch.cat(parts, dim=1)
        pad = ids == PAD_TOKEN
        mask = None
        if bool(pad.any()):
            mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
            mask[:, head : head + ids.shape[1]] = pad
        hidden = self.norm(self.encoder(x, src_key_padding_mask=mask))
        return self.action_out(hidden[:, -self.num_dims :]), self.value_out(hidden[:, 0]).squeeze(-1)


Trunk: TypeAlias = MLPTrunk | CNNTrunk | VLATrunk


# ------------------------------------------------------------------------------------- policy


class Policy(nn.Module):
    """An actor-critic over one env's observation and action spaces; build it with ``build_policy``.

    Args:
        cfg: the config it was built from.
        observation_space: the observation space of one env.
        action_space: the action space of one env.
        layout: what the trunk reads from observations.
        trunk: observations -> (action parameters ``[B, P]``, values ``[B]``).
        head: action parameters -> distribution over the env's actions.
    """

    def __init__(
        self,
        cfg: PolicyConfig,
        observation_space: gym.Space[Any],
        action_space: gym.Space[Any],
        layout: ObsLayout,
        trunk: Trunk,
        head: ActionHead,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.observation_space = observation_space
        self.action_space = action_space
        self.layout = layout
        self.trunk = trunk
        self.head = head

    @property
    def device(self) -> torch.device:
        """Where the weights are (inputs are moved here)."""
        return next(self.parameters()).device

    def forward(self, obs: ObsInput, actions: Tensor | np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """Same as ``evaluate``, so that ``DistributedDataParallel(policy)(obs, actions)`` syncs gradients."""
        params, values = self.action_params(obs)
        acts = self._actions(actions, params.shape[0])
        logp, entropy = self.head.log_prob_and_entropy(params, acts)
        return logp, entropy, values

    @torch.no_grad()
    def act(self, obs: ObsInput, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Samples actions (no gradients).

        Args:
            obs: ``[B, ...]`` tensor/array, or a dict of them.
            deterministic: take the mode (most likely bin or class; ``squash(mean)`` for Gaussians).

        Returns:
            actions (see the module docstring), logprobs ``float32 [B]``, values ``float32 [B]``.
        """
        params, values = self.action_params(obs)
        actions = self.head.sample(params, deterministic)
        return actions, self.head.log_prob(params, actions), values

    def evaluate(self, obs: ObsInput, actions: Tensor | np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """Log-probs and entropies of given actions, with gradients.

        Args:
            obs: ``[B, ...]`` tensor/array, or a dict of them.
            actions: ``[B, *action_space.shape]``, e.g. as returned by ``act``.

        Returns:
            logprobs ``[B]``, entropy ``[B]``, values ``[B]``.
        """
        return self(obs, actions)

    def value(self, obs: ObsInput) -> Tensor:
        """State values ``float32 [B]`` (with gradients)."""
        return self.action_params(obs)[1]

    def action_params(self, obs: ObsInput) -> tuple[Tensor, Tensor]:
        """Distribution parameters (Gaussian means ``[B, A]`` or logits ``[B, D, K]``) and values ``[B]``."""
        params, values = self.trunk(self._prepare(obs))
        return params.reshape(params.shape[0], *self.head.param_shape), values

    def _actions(self, actions: Tensor | np.ndarray, batch: int) -> Tensor:
        acts = _as_tensor(actions, self.device, "Policy.evaluate(actions)")
        expected = (batch, *self.head.action_shape)
        if tuple(acts.shape) != expected:
            raise ValueError(
                f"Policy.evaluate: actions have shape {tuple(acts.shape)}; expected {expected} "
                f"(batch first, then the action space's shape {self.head.action_shape}) for {self.action_space}."
            )
        return acts

    def _prepare(self, obs: ObsInput) -> dict[str, Tensor]:
        device = self.device
        lay = self.layout
        if lay.is_dict:
            if not isinstance(obs, Mapping):
                raise TypeError(
                    f"Policy: observation space is {self.observation_space}, so obs must be a dict with keys "
                    f"{self._wanted_keys()}; got {type(obs).__name__}."
                )
            raw = {k: obs[k] for k in _OBS_KEYS if k in obs}
        elif isinstance(obs, Mapping):
            raise TypeError(f"Policy: observation space is {self.observation_space}; pass one array, not a dict.")
        else:
            raw = {"rgb" if lay.rgb_shape is not None else "state": obs}
        out: dict[str, Tensor] = {}
        batch: int | None = None
        for key in self._wanted_keys():
            if key not in raw:
                raise KeyError(f"Policy: obs has no {key!r} entry; the policy reads {self._wanted_keys()}.")
            x = _as_tensor(raw[key], device, f"Policy obs[{key!r}]")
            if key == "state" and lay.state_shape is not None:
                x = self._check_shape(x, lay.state_shape, key).reshape(x.shape[0], -1).float()
            elif key == "rgb" and lay.rgb_shape is not None:
                x = self._check_shape(x, lay.rgb_shape, key)
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"Policy: obs[{key!r}] has batch {x.shape[0]}, other entries {batch}.")
            batch = x.shape[0]
            out[key] = x
        if "instruction" in raw:
            ids = _as_tensor(raw["instruction"], device, "Policy obs['instruction']").long()
            if ids.ndim != 2 or ids.shape[0] != batch or ids.shape[1] > self.cfg.max_instruction_tokens:
                raise ValueError(
                    f"Policy: obs['instruction'] has shape {tuple(ids.shape)}; expected [{batch}, L] token ids with "
                    f"L <= {self.cfg.max_instruction_tokens}, e.g. from tokenize_instructions(texts, "
                    f"{self.cfg.max_instruction_tokens})."
                )
            out["instruction"] = ids
        return out

    def _wanted_keys(self) -> list[str]:
        keys = []
        if self.layout.state_shape is not None and (self.cfg.kind == "mlp" or self.cfg.use_state):
            keys.append("state")
        if self.layout.rgb_shape is not None and self.cfg.kind != "mlp":
            keys.append("rgb")
        return keys

    def _check_shape(self, x: Tensor, shape: tuple[int, ...], key: str) -> Tensor:
        if tuple(x.shape[1:]) != tuple(shape):
            hint = " Add a batch dimension (x[None])." if tuple(x.shape) == tuple(shape) else ""
            raise ValueError(
                f"Policy: obs[{key!r}] has shape {tuple(x.shape)}; expected [B, {', '.join(map(str, shape))}] "
                f"for {self.observation_space}.{hint}"
            )
        return x


def build_policy(cfg: PolicyConfig, observation_space: gym.Space[Any], action_space: gym.Space[Any]) -> Policy:
    """A policy of ``cfg.kind`` for one env's spaces (see the module docstring for what each reads).

    Args:
        cfg: the policy config.
        observation_space: ``Box`` state, ``Box`` uint8 ``[H, W, C]`` image, or ``Dict`` with ``state``/``rgb``.
        action_space: ``Discrete``, ``MultiDiscrete`` or ``Box``.
    """
    import gymnasium as gym

    layout = ObsLayout.from_space(observation_space)
    head: ActionHead
    if isinstance(action_space, gym.spaces.Box) and cfg.bins is None:
        head = GaussianHead(action_space, cfg.init_log_std)
    elif isinstance(action_space, gym.spaces.Box | gym.spaces.Discrete | gym.spaces.MultiDiscrete):
        head = CategoricalHead(action_space, cfg.bins)
    else:
        raise ConfigError(
            f"{cfg.kind} policy: action space {action_space} is not supported; use Box, Discrete or MultiDiscrete."
        )
    out_dim = int(np.prod(head.param_shape))
    state_dim = layout.state_dim if cfg.use_state else 0
    trunk: Trunk
    if cfg.kind == "mlp":
        if layout.rgb_shape is not None:
            raise ConfigError(
                f"mlp policy: observation space {observation_space} holds images; use kind='cnn' or kind='vla', "
                f"or observe states only (ManiSkill obs_mode='state')."
            )
        trunk = MLPTrunk(layout.state_dim, out_dim, cfg.hidden_sizes, cfg.activation)
    elif cfg.kind == "cnn":
        if layout.rgb_shape is None:
            raise ConfigError(
                f"cnn policy: observation space {observation_space} has no image; use kind='mlp' (or 'vla') "
                f"for state vectors, or observe images (ManiSkill obs_mode='rgb')."
            )
        trunk = CNNTrunk(layout.rgb_shape, layout.rgb_scale, state_dim, out_dim, cfg.conv_channels, cfg.cnn_hidden)
    else:
        if layout.rgb_shape is None and state_dim == 0:
            raise ConfigError(
                f"vla policy: observation space {observation_space} has no image"
                + (" and use_state=false drops its state" if layout.state_dim else " and no state")
                + "; set use_state=true to read the state, or observe images (ManiSkill obs_mode='rgb')."
            )
        if not isinstance(head, CategoricalHead):  # unreachable: cfg.bins is never None for the VLA
            raise ConfigError("vla policy: needs categorical actions; set action_bins >= 2.")
        trunk = VLATrunk(cfg, layout.rgb_shape, layout.rgb_scale, state_dim, head.num_dims, head.num_classes)
    return Policy(cfg, observation_space, action_space, layout, trunk, head)
