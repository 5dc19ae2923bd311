"""Particle filtering over reasoning steps (Puri et al., 2025), in two modes.

The trace is a state-space model: each step a state, the LLM the transition, the process
reward the (approximate) likelihood.

`mode="paper"` reproduces the paper: after every step each particle's weight is
softmax(logit(r_t) / temperature) over the whole pool, where r_t is the reward of its
current prefix, and the pool is resampled multinomially at every step. Finished particles
stay in the pool (they can be copied) and are never extended.

`mode="sound"` is a twisted sequential Monte Carlo sampler whose weights mean something:
the incremental log-weight of a particle that took a step is log r_t - log r_{t-1} (so the
product telescopes to the final reward), finished particles are absorbing (incremental
weight 1), resampling happens only when the effective sample size falls below
`ess_threshold * N`, with a low-variance scheme (systematic by default), and the log
normalising constant (log-evidence) is estimated along the way. Its final weighted
particles approximate p(x) r(x) / Z.

In both modes there is no resampling after the last step: it could only lose the best
particle. The answer is the particle with the highest weight, or with `final="vote"` the
answer with the largest total weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from itscale.errors import UsageError
from itscale.rewards.base import aggregate
from itscale.search.base import Pick, Search, vote
from itscale.search.population import Run
from itscale.search.resampling import (
    SCHEMES,
    effective_sample_size,
    logit,
    normalise_log_weights,
    resample,
)
from itscale.types import Particle, Result

Mode = Literal["paper", "sound"]


class ParticleFilter(Search):
    name = "particle-filter"

    def __init__(
        self,
        mode: Mode = "paper",
        temperature: float = 1.0,
        resampling: str | None = None,
        ess_threshold: float = 0.5,
        final: Literal["weight", "vote"] | None = None,
        aggregation: str = "model",
    ):
        super().__init__(aggregation)
        if mode not in ("paper", "sound"):
            raise UsageError(f"unknown particle-filter mode {mode!r}: use 'paper' or 'sound'")
        if temperature <= 0:
            raise UsageError(f"the resampling temperature must be positive, got {temperature}")
        if not 0 <= ess_threshold <= 1:
            raise UsageError(f"ess_threshold is a fraction of N in [0, 1], got {ess_threshold}")
        self.mode = mode
        self.temperature = temperature
        self.resampling = resampling or ("multinomial" if mode == "paper" else "systematic")
        if self.resampling not in SCHEMES:
            raise UsageError(f"unknown resampling scheme {self.resampling!r}: use one of {', '.join(SCHEMES)}")
        self.ess_threshold = ess_threshold
        self.final = final or ("weight" if mode == "paper" else "vote")
        if self.final not in ("weight", "vote"):
            raise UsageError(f"final must be 'weight' or 'vote', got {self.final!r}")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "mode": self.mode,
            "temperature": self.temperature,
            "resampling": self.resampling,
            "ess_threshold": self.ess_threshold,
            "final": self.final,
        }

    async def search(self, run: Run) -> Result:
        run.diagnostics.setdefault("resampled_steps", 0)
        run.diagnostics.setdefault("degenerate_weights", 0)
        if self.mode == "sound":
            run.diagnostics.setdefault("log_evidence", 0.0)
        return await super().search(run)

    # ------------------------------------------------------------------ weigh

    def weigh(self, run: Run) -> None:
        """Sets every particle's log-weight from the rewards of the step just taken."""
        for p in run.particles:
            if self.mode == "paper":
                p.log_weight = logit(p.score if p.score is not None else 0.5) / self.temperature
            elif len(p.steps) == run.step and p.steps[-1].score is not None:
                # Sound mode: the incremental weight r_t / r_{t-1} of the step just taken
                # (every particle extended this round has exactly run.step steps; one that
                # finished earlier has fewer and keeps its weight).
                p.log_weight += self.incremental_log_weight(p)

    def incremental_log_weight(self, p: Particle) -> float:
        current = self._prefix_reward(p, len(p.steps))
        previous = self._prefix_reward(p, len(p.steps) - 1)
        if current <= 0:
            return -math.inf
        if previous <= 0:
            # r_{t-1} = 0: either the weight is already -inf (adding anything finite keeps it
            # there), or every weight was -inf, the population was resampled uniformly with
            # weight 1, and the telescoping product starts again from this step, as from r_0 = 1.
            return math.log(current) / self.temperature
        return (math.log(current) - math.log(previous)) / self.temperature

    def _prefix_reward(self, p: Particle, k: int) -> float:
        """r_k: the aggregated reward of the first k steps (r_0 = 1)."""
        if k == 0:
            return 1.0
        return aggregate([s.score for s in p.steps[:k] if s.score is not None], self.aggregation)

    # ------------------------------------------------------------------ select

    async def select(self, run: Run) -> None:
        self.weigh(run)
        weights, degenerate = normalise_log_weights([p.log_weight for p in run.particles])
        if degenerate:
            run.diagnostics["degenerate_weights"] += 1
            run.diagnostics["degenerate_note"] = "all weights were -inf; resampled uniformly"
        ess = effective_sample_size(weights)
        run.ess = ess  # traced whether or not it resamples
        if not run.live():
            return  # nothing left to extend: resampling now could only lose particles
        if self.mode == "sound" and ess >= self.ess_threshold * len(run.particles) and not degenerate:
            return
        self.resample(run, weights, ess)

    def resample(self, run: Run, weights: np.ndarray, ess: float) -> None:
        """Draws the next population from `proposal(weights)`. In sound mode a proposal
        other than the weights themselves (an annealed one) is corrected for: each child
        carries w/q of its parent, so the weighted population stays properly weighted and
        the evidence estimate unbiased."""
        proposal = self.proposal(run, weights, ess)
        parents = self.draw_parents(run, proposal)
        if self.mode == "sound":
            run.diagnostics["log_evidence"] += _logmeanexp([p.log_weight for p in run.particles])
            corrections = [_log(weights[a]) - _log(proposal[a]) for a in parents]
        run.select(parents, ess=ess)
        if self.mode == "sound":
            for child, correction in zip(run.particles, corrections, strict=True):
                child.log_weight = correction
        run.diagnostics["resampled_steps"] += 1

    def proposal(self, run: Run, weights: np.ndarray, ess: float) -> np.ndarray:
        """The distribution parents are drawn from; the weights themselves by default."""
        return weights

    def draw_parents(self, run: Run, proposal: np.ndarray) -> list[int]:
        return resample(proposal, len(run.particles), run.rng, self.resampling)

    # ------------------------------------------------------------------ choose

    async def finalise(self, run: Run) -> None:
        # Every step was scored and weighed in `select`; what is left is the evidence.
        if self.mode == "sound":
            run.diagnostics["log_evidence"] += _logmeanexp([p.log_weight for p in run.particles])

    def pick(self, particles: Sequence[Particle]) -> Pick:
        weights, _ = normalise_log_weights([p.log_weight for p in particles])
        if self.final == "vote":
            return vote(particles, list(weights))
        best = max(range(len(particles)), key=lambda i: (weights[i], particles[i].score or 0.0))
        return Pick(best, particles[best].answer, list(weights))


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _logmeanexp(values: list[float]) -> float:
    finite = [v for v in values if v > -math.inf]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(v - top) for v in finite) / len(values))


ANNEALING_SCHEDULES = ("ess", "entropy", "linear")


def annealing_temperature(
    weights: np.ndarray, progress: float, schedule: str = "ess", initial_temperature: float = 2.0
) -> float:
    """The resampling temperature of entropic annealing for normalised `weights` at
    `progress` (fraction of the step budget used, in [0, 1]):

    - "ess":     T = max(1, (N / ESS) (1 - progress))          (Giannone et al., 2025)
    - "entropy": T = max(1, (1 - progress) / H_norm), H_norm = H(w) / log N, the normalised
                 entropy of the weights (1 for uniform weights, 0 for a single survivor)
    - "linear":  T = max(1, initial_temperature (1 - progress))
    """
    n = len(weights)
    remaining = max(0.0, 1.0 - progress)
    if schedule == "ess":
        return max(1.0, n / effective_sample_size(weights) * remaining)
    if schedule == "entropy":
        positive = weights[weights > 0]
        entropy = float(-(positive * np.log(positive)).sum())
        normalised = entropy / math.log(n) if n > 1 else 1.0
        return max(1.0, remaining / max(normalised, 1e-12))
    if schedule == "linear":
        return max(1.0, initial_temperature * remaining)
    raise UsageError(f"unknown annealing schedule {schedule!r}: use one of {', '.join(ANNEALING_SCHEDULES)}")


class EntropicParticleFilter(ParticleFilter):
    """Particle filtering with entropic annealing (Giannone et al., 2025, "Mitigating
    Premature Exploitation in Particle-based Monte Carlo for Inference-Time Scaling").

    Early in the run (progress = step / max_steps < `early_phase`), when the weights have
    collapsed (ESS / N < `ess_threshold`), parents are drawn from the flattened distribution
    q ∝ w^(1/T) with T from `annealing_temperature`, which keeps diverse hypotheses alive
    that an overconfident early reward would prune. Systematic resampling by default. In
    sound mode the children carry w/q, so the weights stay proper."""

    name = "entropic-particle-filter"

    def __init__(
        self,
        mode: Mode = "paper",
        annealing: str = "ess",
        early_phase: float = 0.5,
        ess_threshold: float = 0.5,
        initial_temperature: float = 2.0,
        temperature: float = 1.0,
        resampling: str = "systematic",
        final: Literal["weight", "vote"] | None = None,
        aggregation: str = "model",
    ):
        super().__init__(mode, temperature, resampling, ess_threshold, final, aggregation)
        if annealing not in ANNEALING_SCHEDULES:
            raise UsageError(f"unknown annealing schedule {annealing!r}: use one of {', '.join(ANNEALING_SCHEDULES)}")
        if not 0 <= early_phase <= 1:
            raise UsageError(f"early_phase is a fraction of max_steps in [0, 1], got {early_phase}")
        if initial_temperature < 1:
            raise UsageError(f"initial_temperature must be at least 1, got {initial_temperature}")
        self.annealing, self.early_phase, self.initial_temperature = annealing, early_phase, initial_temperature

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "annealing": self.annealing,
            "early_phase": self.early_phase,
            "initial_temperature": self.initial_temperature,
        }

    def proposal(self, run: Run, weights: np.ndarray, ess: float) -> np.ndarray:
        progress = run.step / run.settings.max_steps
        temperature = 1.0
        if progress < self.early_phase and ess < self.ess_threshold * len(weights):
            temperature = annealing_temperature(weights, progress, self.annealing, self.initial_temperature)
        run.diagnostics.setdefault("annealing_temperatures", []).append(round(temperature, 4))
        if temperature == 1.0:
            return weights
        flattened = np.where(weights > 0, np.power(weights, 1.0 / temperature), 0.0)
        return flattened / flattened.sum()
