"""Rewards: process and outcome scores in [0, 1] behind one protocol."""

from itscale.rewards.base import (
    AGGREGATIONS,
    CachedReward,
    ProductReward,
    Reward,
    RewardGuard,
    ScoreRequest,
    Scores,
    aggregate,
)

__all__ = [
    "AGGREGATIONS",
    "CachedReward",
    "ProductReward",
    "Reward",
    "RewardGuard",
    "ScoreRequest",
    "Scores",
    "aggregate",
]
