"""rlinf.workers: the stock LLM workers.

``rollout.RolloutWorker`` (hf / vLLM sampling), ``reward.RewardWorker`` (rule-based verifiers),
``inference.InferenceWorker`` (reference log-probs), ``actor.ActorWorker`` (policy training), their
configs in ``config`` and weight sync helpers in ``weights``. Import the module you need; importing
this package loads no model code.
"""
