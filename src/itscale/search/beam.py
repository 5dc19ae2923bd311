"""Beam search and DVTS with search-and-learn's semantics (Hugging Face, Beeching et al.).

Beam search: N particles, beam width M. After every step the live particles are ranked by
their aggregated step reward, the top N/M kept and each expanded M times (its copies take
different samples next step). A finished particle leaves the beam and joins the completed
set; duplicate completed particles (the same text) are removed before selection, and the
search ends when N particles have completed or none is live. The answer is the completed
particle with the best reward. A budget below the beam width narrows the beam to N (budget 1
keeps and extends one particle): a run never holds more than N particles, so budgets 1 and 2
cost what they say. With `lookahead=k`, each live particle is ranked by the
reward of a greedy k-step continuation of a fork (its tokens count; the continuation is
discarded).

DVTS (diverse verifier tree search): the N particles form N/M independent subtrees of M.
Each subtree keeps only its best new particle and expands it M times; a subtree whose best
particle has finished is done. The answer is the best of the subtrees' final particles.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from itscale.errors import UsageError
from itscale.search.core import Run, Search
from itscale.types import Particle


class BeamSearch(Search):
    name = "beam-search"

    def __init__(self, beam_width: int = 4, lookahead: int = 0, aggregation: str = "last"):
        super().__init__(aggregation)
        if not isinstance(beam_width, int) or beam_width < 1:
            raise UsageError(f"beam_width must be a positive integer, got {beam_width!r}")
        if not isinstance(lookahead, int) or lookahead < 0:
            raise UsageError(f"lookahead must be a non-negative integer, got {lookahead!r}")
        self.beam_width, self.lookahead = beam_width, lookahead

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "beam_width": self.beam_width, "lookahead": self.lookahead}

    async def select(self, run: Run) -> None:
        completed = self.completed(run)
        budget = run.settings.budget
        live = [i for i, p in enumerate(run.particles) if not p.finished]
        if not live or len(completed) >= budget:
            run.select(completed)  # done: the distinct completed particles, live ones dropped
            return
        ranking = await self.ranking_scores(run, live)
        width = self.width(budget)
        kept = sorted(live, key=lambda i: -ranking[i])[: budget // width]
        run.select(completed + [i for i in kept for _ in range(width)])

    def width(self, budget: int) -> int:
        """The beam width at this budget: never more particles than the budget."""
        return min(self.beam_width, budget)

    def completed(self, run: Run) -> list[int]:
        """Indices of finished particles, one per distinct text (the best-scored copy)."""
        best: dict[str, int] = {}
        for i, p in enumerate(run.particles):
            if p.finished and (p.text not in best or _score(p) > _score(run.particles[best[p.text]])):
                best[p.text] = i
        return sorted(best.values())

    async def ranking_scores(self, run: Run, indices: list[int]) -> dict[int, float]:
        if not self.lookahead:
            return {i: _score(run.particles[i]) for i in indices}
        probes = []
        for i in indices:
            p = run.particles[i]
            probe = p.copy(run.new_id())
            probe.branch = run.lm.fork(p.branch)
            probes.append(probe)
        greedy = replace(run.step_settings, temperature=0.0)
        try:
            for _ in range(self.lookahead):
                await run.extend([q for q in probes if not q.finished], greedy)
            await run.score(probes, all_steps=True)
        finally:
            for probe in probes:
                run.release(probe)
        run.diagnostics["lookahead_steps"] = run.diagnostics.get("lookahead_steps", 0) + self.lookahead * len(probes)
        return {i: _score(q) for i, q in zip(indices, probes, strict=True)}


class DVTS(BeamSearch):
    name = "dvts"

    async def select(self, run: Run) -> None:
        width = self.width(run.settings.budget)
        subtrees: dict[int, list[int]] = {}
        for i, p in enumerate(run.particles):
            if p.tag is None:
                p.tag = i // width  # first step: N/M subtrees of M particles each
            subtrees.setdefault(p.tag, []).append(i)
        live = [i for i, p in enumerate(run.particles) if not p.finished]
        ranking = await self.ranking_scores(run, live)
        parents = []
        for members in subtrees.values():
            best = max(members, key=lambda i: ranking.get(i, _score(run.particles[i])))
            if run.particles[best].finished:
                parents.append(best)  # the subtree is done: its best particle has finished
            else:
                parents += [best] * width
        run.select(parents)


def _score(p: Particle) -> float:
    return p.score if p.score is not None else 0.0
