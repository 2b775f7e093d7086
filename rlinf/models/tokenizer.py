"""A small byte-level BPE tokenizer trained locally on text the project generates.

Digits are always split into single tokens, so the tokens of ``123`` are ``1 2 3`` and arithmetic
stays learnable for a tiny model. Training takes a fraction of a second and is deterministic; the
result saves as a Hugging Face tokenizer directory that ``AutoTokenizer.from_pretrained`` loads offline.

The pipeline (NFC, Qwen2's pre-tokenizer split, byte-level BPE) is the one transformers rebuilds
whenever it loads a tokenizer next to a Qwen2 config, so a tiny Qwen2 and a tiny Llama model load
the very same tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# Named as in Qwen2: its tokenizer class adds this token unless the vocabulary already holds it.
PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|bos|>"
IM_START = "<|im_start|>"
# The end of a chat turn doubles as end of sequence (as in SmolLM2), so the same stop token works
# for the tiny models and the pretrained one.
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, IM_START, EOS_TOKEN)

# ChatML without a default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_VOCAB_SIZE = 512
MODEL_MAX_LENGTH = 2048

_FILLER = (
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Think step by step and check your work.",
    "First add the ones, then carry the tens. Subtract the smaller number from the larger one.",
    "Multiply each digit, then add the partial products together.",
    "So the total is the sum of both parts, and the difference is what remains.",
    "Let me work this out carefully. The final answer is below.",
    "Hello! How can I help you today? Here is the solution to the problem.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 -1 -42 3,500 + - * / = ( ) [ ] { } < > ? ! . , ; :",
)


def default_corpus() -> list[str]:
    """The training text: math task prompts and answers in both formats, plus general filler."""
    from rlinf.envs.math_task import tokenizer_corpus  # the task generates the text the models see

    lines = list(_FILLER)
    for i, text in enumerate(tokenizer_corpus()):
        # Every other line in chat form, so role names become whole tokens.
        lines.append(f"system\nuser\n{text}\nassistant\n" if i % 2 else text)
    return lines


def train_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE, corpus: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """Trains the tokenizer in memory; the same arguments always give the same tokenizer.

    Args:
        vocab_size: total vocabulary including the 256 byte tokens and the special tokens.
        corpus: training lines; ``default_corpus()`` when None.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is below {minimum} (256 byte tokens plus {len(SPECIAL_TOKENS)} "
            f"special tokens); use vocab_size={DEFAULT_VOCAB_SIZE}."
        )
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    # The split isolates every digit (\p{N}) and keeps words with their leading space.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = list(default_corpus() if corpus is None else corpus)
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tokenizer(directory: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Trains the tokenizer and saves it to ``directory`` (overwriting tokenizer files there).

    Args:
        directory: where ``tokenizer.json``, ``tokenizer_config.json`` and the chat template go.
        vocab_size: see ``train_tokenizer``.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer(vocab_size).save_pretrained(str(path))
    return path
