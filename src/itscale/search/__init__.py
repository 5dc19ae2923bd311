"""Search and sampling algorithms, each a short policy over the population loop in
`core.py`. `ALGORITHMS` maps the names the CLI and the server use to the classes."""

from __future__ import annotations

from typing import Any

from itscale.errors import UsageError
from itscale.search.base import Search
from itscale.search.beam import DVTS, BeamSearch
from itscale.search.gibbs import ParallelTempering, ParticleGibbs
from itscale.search.particle_filter import EntropicParticleFilter, ParticleFilter
from itscale.search.population import Run
from itscale.search.sampling import (
    AdaptiveSelfConsistency,
    BestOfMajority,
    BestOfN,
    ComputeOptimal,
    Greedy,
    SelfConsistency,
    WeightedBestOfN,
)
from itscale.search.settings import SearchSettings

ALGORITHMS: dict[str, type[Search]] = {
    cls.name: cls
    for cls in [
        Greedy,
        SelfConsistency,
        AdaptiveSelfConsistency,
        ComputeOptimal,
        BestOfN,
        WeightedBestOfN,
        BestOfMajority,
        BeamSearch,
        DVTS,
        ParticleFilter,
        EntropicParticleFilter,
        ParticleGibbs,
        ParallelTempering,
    ]
}


def make_algorithm(name: str, **options: Any) -> Search:
    """An algorithm by name with its own options (mode="sound", temperature=0.5, ...).
    "particle-filter-sound" is a shorthand for particle-filter with mode="sound"."""
    if name == "particle-filter-sound":
        name, options = "particle-filter", {"mode": "sound", **options}
    if name not in ALGORITHMS:
        raise UsageError(f"unknown algorithm {name!r}: use one of {', '.join(algorithm_names())}")
    try:
        return ALGORITHMS[name](**options)
    except TypeError as error:
        raise UsageError(f"bad option for algorithm {name!r}: {error}") from None


def algorithm_names() -> list[str]:
    return [*ALGORITHMS, "particle-filter-sound"]


def unused_reward_message(algorithm: str, reward: Any) -> str:
    """Why a reward given for an algorithm that uses none is refused rather than ignored: a
    user who named one believes it chose the answer."""
    users = [name for name in algorithm_names() if make_algorithm(name).uses_reward]
    shown = reward if isinstance(reward, str) else type(reward).__name__
    why = " (it weighs by its budget policy's learned head)" if algorithm == "compute-optimal" else ""
    return (
        f"{algorithm} uses no reward{why}, so the reward {shown!r} would be ignored: leave the reward "
        f"out, or choose an algorithm that uses one ({', '.join(users)})"
    )


__all__ = [
    "ALGORITHMS",
    "Run",
    "Search",
    "SearchSettings",
    "algorithm_names",
    "make_algorithm",
    "unused_reward_message",
]
