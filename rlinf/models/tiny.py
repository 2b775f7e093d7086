"""Randomly initialised tiny Qwen2 / Llama causal LMs with the local tokenizer, for tests and benchmarks.

``build_tiny_model(dir)`` writes a normal Hugging Face checkpoint (config, safetensors weights,
generation config, tokenizer with chat template) that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load offline. Building is idempotent and atomic: a directory that
already holds the same model is reused, and readers never see a half-written one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, Qwen2Config, Qwen2ForCausalLM

from rlinf.models.tokenizer import DEFAULT_VOCAB_SIZE, MODEL_MAX_LENGTH, train_tokenizer

Arch = Literal["qwen2", "llama"]
ARCHS: tuple[str, ...] = ("qwen2", "llama")
MANIFEST = "rlinf_model.json"
_MANIFEST_VERSION = 1


@dataclass(frozen=True)
class TinySize:
    """Shape of one tiny preset; ``approx_params`` is the total with the default tokenizer."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    approx_params: int


TINY_SIZES: dict[str, TinySize] = {
    "nano": TinySize(64, 2, 4, 2, 256, approx_params=150_000),
    "tiny": TinySize(128, 4, 4, 2, 512, approx_params=1_050_000),
    "small": TinySize(256, 10, 8, 4, 1024, approx_params=10_000_000),
    "medium": TinySize(512, 12, 8, 4, 2048, approx_params=47_500_000),
}


def tiny_config(arch: str, size: str, vocab_size: int, special_ids: dict[str, int]) -> PretrainedConfig:
    """The model config of one preset.

    Args:
        arch: ``qwen2`` or ``llama``.
        size: a key of ``TINY_SIZES``.
        vocab_size: rows of the (tied) embedding.
        special_ids: ``bos_token_id``, ``eos_token_id`` and ``pad_token_id``.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not one of {list(ARCHS)}; use arch='qwen2'.")
    if size not in TINY_SIZES:
        raise ValueError(f"size={size!r} is not one of {list(TINY_SIZES)}; use size='tiny' (about 1M params).")
    s = TINY_SIZES[size]
    shape: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        intermediate_size=s.intermediate_size,
        max_position_embeddings=MODEL_MAX_LENGTH,
        tie_word_embeddings=True,
        **special_ids,
    )
    return Qwen2Config(**shape) if arch == "qwen2" else LlamaConfig(**shape)


def build_tiny_model(
    directory: str | Path,
    arch: str = "qwen2",
    size: str = "tiny",
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> Path:
    """Builds (or reuses) a random tiny causal LM and its tokenizer in ``directory``.

    Args:
        directory: target directory; created if missing, reused if it holds the same model.
        arch: ``qwen2`` or ``llama``.
        size: a key of ``TINY_SIZES`` (``nano`` ~0.15M, ``tiny`` ~1M, ``small`` ~10M, ``medium`` ~48M).
        seed: fixes the initial weights.
        vocab_size: tokenizer vocabulary budget (see ``train_tokenizer``).

    Returns:
        The directory, ready for ``from_pretrained``.
    """
    tiny_config(arch, size, vocab_size, {})  # validate before touching the file system
    manifest = {
        "kind": "tiny",
        "arch": arch,
        "size": size,
        "seed": seed,
        "vocab_size": vocab_size,
        "shape": asdict(TINY_SIZES[size]),
    }

    def build(staging: Path) -> None:
        tokenizer = train_tokenizer(vocab_size)
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        config = tiny_config(arch, size, len(tokenizer), ids)
        model_cls = Qwen2ForCausalLM if arch == "qwen2" else LlamaForCausalLM
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(config)
        model.generation_config.bos_token_id = ids["bos_token_id"]
        model.generation_config.eos_token_id = ids["eos_token_id"]
        model.generation_config.pad_token_id = ids["pad_token_id"]
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))

    return build_once(directory, manifest, build)


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest rlinf wrote into a model directory, or None if there is none."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def build_once(directory: str | Path, manifest: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Runs ``build(staging_dir)`` unless ``directory`` already holds a model with this manifest.

    The build writes into a temporary sibling directory that is renamed into place when complete,
    under a file lock, so concurrent callers (several workers starting at once) build it once and
    nobody reads a partial directory. A directory rlinf did not build is never overwritten.
    """
    final = Path(directory).expanduser().absolute()
    wanted = {**manifest, "version": _MANIFEST_VERSION}
    if read_manifest(final) == wanted:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if read_manifest(final) == wanted:  # another process finished it while we waited
            return final
        if final.exists() and (not final.is_dir() or (any(final.iterdir()) and read_manifest(final) is None)):
            raise FileExistsError(
                f"{final} exists and was not written by rlinf (no {MANIFEST} in it), so it is not "
                f"overwritten; pass a new or empty directory, or delete this one."
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
        try:
            build(staging)
            (staging / MANIFEST).write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
            staging.chmod(0o755)
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                final.rename(old)
                staging.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return final
