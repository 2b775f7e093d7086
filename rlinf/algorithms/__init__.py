"""RL algorithm math: advantages, losses, KL estimators and masked reductions, as pure tensor functions.

Workflows import these directly; shapes are in each docstring (``B`` sequences, ``G`` samples per
prompt, ``T`` tokens or time steps, ``N`` envs).
"""

from rlinf.algorithms.advantages import (
    gae,
    group_advantage,
    reinforce_pp_advantage,
    returns_to_go,
    rloo_advantage,
    shaped_token_rewards,
    token_gae,
)
from rlinf.algorithms.aggregation import AGGREGATIONS, Aggregation, aggregate_loss
from rlinf.algorithms.kl import KL_ESTIMATORS, KLEstimator, kl_k1, kl_k2, kl_k3, token_kl
from rlinf.algorithms.losses import (
    decoupled_ppo_loss,
    dpo_loss,
    ipo_loss,
    policy_gradient_loss,
    ppo_clip_loss,
    value_loss,
)
from rlinf.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten, zero_invalid

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "Aggregation",
    "KLEstimator",
    "aggregate_loss",
    "decoupled_ppo_loss",
    "dpo_loss",
    "gae",
    "group_advantage",
    "ipo_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_gradient_loss",
    "ppo_clip_loss",
    "reinforce_pp_advantage",
    "returns_to_go",
    "rloo_advantage",
    "shaped_token_rewards",
    "token_gae",
    "token_kl",
    "value_loss",
    "zero_invalid",
]
