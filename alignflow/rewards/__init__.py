"""Rewards for online RL: reward-model scorers and ensembles, rule / verifier functions, math answers, shaping.

Every reward is a callable ``reward(batch) -> (B,) tensor`` (:class:`RewardFn`); see ``docs/rewards.md``.
``alignflow.rewards.math`` needs sympy (``pip install 'alignflow[math]'``) and is imported on demand.
"""

from alignflow.rewards.base import CompositeReward, RewardFn, reward_name
from alignflow.rewards.model import CostModelScorer, RewardModelScorer, packed_sequences
from alignflow.rewards.rules import CallableReward, RewardError, RewardLoadError, load_callable
from alignflow.rewards.shaping import SHAPINGS, RunningNorm, apply_shaping, par

__all__ = [
    "CallableReward",
    "CompositeReward",
    "CostModelScorer",
    "RewardError",
    "RewardFn",
    "RewardLoadError",
    "RewardModelScorer",
    "RunningNorm",
    "SHAPINGS",
    "apply_shaping",
    "load_callable",
    "packed_sequences",
    "par",
    "reward_name",
]
