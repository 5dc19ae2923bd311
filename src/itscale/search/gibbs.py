"""Particle Gibbs and parallel tempering: particle filters that remember a trajectory.

Particle Gibbs (Andrieu, Doucet and Holenstein, 2010) runs K sweeps of conditional SMC.
After a sweep, a reference trajectory is drawn by final weight; in the next sweep it is
particle 0: its steps are replayed, not generated, it always survives resampling, and the
other particles may be copied from it (forking its KV state at the current step). With
proper (sound-mode) weights, the reference trajectories form a Markov chain that leaves
p(x) r(x)^(1/T) / Z invariant. Budget N × K: each sweep has N = budget // K particles.

Parallel tempering runs M particle-Gibbs chains at resampling temperatures
1 = T_1 < … < T_M, targets π_k ∝ p(x) r(x)^(1/T_k), stepped together (one batched call for
all chains every step). After each sweep, neighbouring chains swap reference trajectories
with probability min(1, π_k(x_{k+1}) π_{k+1}(x_k) / (π_k(x_k) π_{k+1}(x_{k+1}))), which for
these targets is min(1, (r(x_{k+1}) / r(x_k))^(1/T_k − 1/T_{k+1})). Hot chains explore, the
cold chain (T = 1) gives the answer. Budget M × N × K.

A budget is a promise: neither ever starts more particles than it. Conditional SMC needs two
particles a sweep (the reference and one new), so particle Gibbs at a budget below
2 × sweeps runs as many sweeps as it can afford (one sweep of N particles is a particle
filter; budget 1 is a single sample), and parallel tempering at a budget below
2 × sweeps × chains runs its cold chain alone, as particle Gibbs. Either says so in
`Result.diagnostics["budget_note"]`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from itscale.errors import UsageError
from itscale.search.base import Search
from itscale.search.particle_filter import ParticleFilter
from itscale.search.population import Replay, Run, lockstep
from itscale.search.resampling import normalise_log_weights, resample
from itscale.types import Particle, Result


class ParticleGibbs(ParticleFilter):
    name = "particle-gibbs"
    keeps_finished_branches = True

    def __init__(
        self,
        sweeps: int = 2,
        temperature: float = 1.0,
        resampling: str = "multinomial",
        final: Literal["weight", "vote"] = "vote",
        aggregation: str = "model",
    ):
        # Conditional SMC resamples at every step (ess_threshold 1) with proper weights.
        super().__init__("sound", temperature, resampling, 1.0, final, aggregation)
        if not isinstance(sweeps, int) or sweeps < 1:
            raise UsageError(f"sweeps must be a positive integer, got {sweeps!r}")
        self.sweeps = sweeps

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "sweeps": self.sweeps}

    def plan(self, budget: int) -> tuple[int, int]:
        """(particles a sweep, sweeps) within the budget: as many sweeps as asked while
        each has two particles, and at least one sweep."""
        sweeps = max(1, min(self.sweeps, budget // 2))
        return budget // sweeps, sweeps

    def population_size(self, budget: int) -> int:
        return self.plan(budget)[0]

    async def search(self, run: Run) -> Result:
        n, sweeps = self.plan(run.settings.budget)
        note = budget_note(self.name, run.settings.budget, n, sweeps, self.sweeps, 1)
        if note:
            run.diagnostics["budget_note"] = note
        reference: Particle | None = None
        references = []
        for sweep in range(sweeps):
            await self.start_sweep(run, n, sweep, reference)
            await lockstep([run])
            reference = self.end_sweep(run, reference)
            references.append(reference)
        if reference.branch is not None:
            run.lm.release(reference.branch)
        run.diagnostics["references"] = describe_references(references)
        return self.choose(run)

    async def start_sweep(self, run: Run, n: int, sweep: int, reference: Particle | None) -> None:
        """A fresh population for one sweep; the reference (if any) is particle 0."""
        run.sweep = sweep
        run.diagnostics.setdefault("resampled_steps", 0)
        run.diagnostics.setdefault("degenerate_weights", 0)
        run.diagnostics["log_evidence"] = 0.0  # of this sweep's conditional SMC
        fresh = await run.start(n - 1 if reference is not None else n)
        if reference is not None:
            retained = Particle(id=run.new_id(), replay=Replay(reference.steps, reference.end, reference.branch))
            fresh.insert(0, retained)
        run.particles = fresh

    def end_sweep(self, run: Run, previous: Particle | None) -> Particle:
        """Draws the next reference by final weight and frees every other KV state."""
        weights, _ = normalise_log_weights([p.log_weight for p in run.particles])
        index = resample(weights, 1, run.rng, "multinomial")[0]
        chosen = run.particles[index]
        reference = chosen.copy(chosen.id)
        reference.branch = chosen.branch
        chosen.branch = None  # the reference owns it now
        for p in run.particles:
            run.release(p)
        if previous is not None and previous.branch is not None:
            run.lm.release(previous.branch)
            previous.branch = None
        return reference

    def draw_parents(self, run: Run, proposal: np.ndarray) -> list[int]:
        """Conditional resampling: the replayed reference (particle 0) always survives in
        place; the other N − 1 parents are drawn from the whole pool, reference included."""
        retained = run.particles[0].replay is not None if run.particles else False
        if not retained:
            return super().draw_parents(run, proposal)
        return [0, *resample(proposal, len(run.particles) - 1, run.rng, self.resampling)]

    def resample(self, run: Run, weights: np.ndarray, ess: float) -> None:
        replay = run.particles[0].replay if run.particles else None
        super().resample(run, weights, ess)
        if replay is not None:
            run.particles[0].replay = replay  # the copy in place of the reference replays on


class ParallelTempering(Search):
    name = "parallel-tempering"

    def __init__(
        self,
        chains: int = 2,
        max_temperature: float = 4.0,
        temperatures: Sequence[float] | None = None,
        sweeps: int = 2,
        resampling: str = "multinomial",
        final: Literal["weight", "vote"] = "vote",
        aggregation: str = "model",
    ):
        super().__init__(aggregation)
        if temperatures is None:
            if not isinstance(chains, int) or chains < 1:
                raise UsageError(f"chains must be a positive integer, got {chains!r}")
            if max_temperature < 1:
                raise UsageError(f"max_temperature must be at least 1, got {max_temperature}")
            # Geometric ladder from 1 to max_temperature.
            temperatures = [max_temperature ** (k / max(1, chains - 1)) for k in range(chains)]
        temperatures = [float(t) for t in temperatures]
        if temperatures[0] != 1.0 or any(b <= a for a, b in itertools.pairwise(temperatures)):
            raise UsageError(f"temperatures must start at 1 and increase, got {temperatures}")
        self.temperatures = temperatures
        self.chains = [ParticleGibbs(sweeps, t, resampling, final, aggregation) for t in temperatures]
        self.sweeps = sweeps

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "temperatures": self.temperatures, "sweeps": self.sweeps}

    def population_size(self, budget: int) -> int:
        return budget // (len(self.chains) * self.sweeps)

    async def search(self, run: Run) -> Result:
        budget = run.settings.budget
        n = self.population_size(budget)
        if n < 2:  # cannot afford every chain: the cold chain alone, as particle Gibbs
            cold = self.chains[0]
            result = await cold.search(run.spawn(cold, key=1))
            result.algorithm = self.name
            result.settings.update(self.describe())
            per_sweep, sweeps = cold.plan(budget)
            result.diagnostics["budget_note"] = budget_note(
                self.name, budget, per_sweep, sweeps, self.sweeps, len(self.chains), cold_only=True
            )
            return result
        chains = [run.spawn(chain, key=k + 1) for k, chain in enumerate(self.chains)]
        references: list[Particle | None] = [None] * len(chains)
        swaps = {"attempted": 0, "accepted": 0}
        cold_references: list[Particle] = []
        for sweep in range(self.sweeps):
            for gibbs, chain, reference in zip(self.chains, chains, references, strict=True):
                await gibbs.start_sweep(chain, n, sweep, reference)
            await lockstep(chains)  # every chain's particles in one batched call per step
            references = [g.end_sweep(c, r) for g, c, r in zip(self.chains, chains, references, strict=True)]
            cold_references.append(references[0])
            if sweep < self.sweeps - 1:
                self.swap(run, references, swaps)
        for reference in references:
            if reference.branch is not None:
                run.lm.release(reference.branch)
        cold = chains[0]
        run.particles, run.genealogy = cold.particles, cold.genealogy
        run.chain, run.step, run.sweep = cold.chain, cold.step, cold.sweep  # the answer is the cold chain's
        run.diagnostics.update(cold.diagnostics)
        run.diagnostics["swaps"] = swaps
        run.diagnostics["chain_answers"] = [r.answer for r in references]
        run.diagnostics["references"] = describe_references(cold_references)
        run.budget_limited = any(c.budget_limited for c in chains)
        return self.chains[0].choose(run)

    def swap(self, run: Run, references: list[Particle], swaps: dict[str, int]) -> None:
        for k in range(len(references) - 1):
            swaps["attempted"] += 1
            a = self.swap_probability(
                references[k].score, references[k + 1].score, self.temperatures[k], self.temperatures[k + 1]
            )
            if run.rng.random() < a:
                references[k], references[k + 1] = references[k + 1], references[k]
                swaps["accepted"] += 1

    @staticmethod
    def swap_probability(r_cold: float | None, r_hot: float | None, t_cold: float, t_hot: float) -> float:
        """min(1, (r(x_hot) / r(x_cold))^(1/T_cold − 1/T_hot)) for the targets p r^(1/T)."""
        r_cold, r_hot = r_cold or 0.0, r_hot or 0.0
        if r_cold == r_hot:
            return 1.0
        if r_hot == 0:
            return 0.0
        if r_cold == 0:
            return 1.0
        exponent = (1 / t_cold - 1 / t_hot) * (math.log(r_hot) - math.log(r_cold))
        return 1.0 if exponent >= 0 else math.exp(exponent)


def budget_note(
    name: str, budget: int, n: int, sweeps: int, wanted_sweeps: int, chains: int, cold_only: bool = False
) -> str | None:
    """What a budget too small for the algorithm's settings made it run instead, or None."""
    needed = 2 * wanted_sweeps * chains
    if not cold_only and sweeps == wanted_sweeps and n * sweeps == budget:
        return None
    ran = "a single sample" if n == 1 else f"{sweeps} sweep(s) of {n} particles"
    if cold_only:
        ran = f"its cold chain alone, as particle Gibbs: {ran}"
    unused = budget - n * sweeps
    spare = f"; {unused} of the budget unused (it does not divide evenly)" if unused else ""
    if budget >= needed and not cold_only:
        return f"{name} ran {ran}{spare}"
    return (
        f"{name} with {chains} chain(s) x {wanted_sweeps} sweeps needs a budget of at least {needed} "
        f"(2 particles a sweep); at budget {budget} it ran {ran}{spare}"
    )


def describe_references(references: Sequence[Particle]) -> list[dict[str, Any]]:
    """The reference trajectory of every sweep (of the cold chain), for diagnostics."""
    return [{"answer": r.answer, "score": r.score, "text": r.text} for r in references]
