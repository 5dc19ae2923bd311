"""Beam search and DVTS with search-and-learn's semantics (Hugging Face, Beeching et al.).

Beam search: N particles, beam width M. Every iteration N beams are active: each takes a
step; beams that finished join the completed set (absorbing: kept, never extended); among
the live ones, duplicates (the same text) are dropped, the top N/M by aggregated step reward
are kept, and the N active beams of the next iteration are refilled from them round-robin
(their copies take different samples next step). The search runs until no beam is active
(all finished, or the step cap), then keeps the N completed beams with the best reward; the
answer is the best of them. A budget below the beam width narrows the beam to N (budget 1
keeps and extends one particle): a run never has more than N active beams, so every budget
costs what it says. With `lookahead=k`, each live beam is ranked by the reward of a greedy
k-step continuation of a fork (its tokens count; the continuation is discarded).

Deliberate differences from search-and-learn's `beam_search.py`, each for a reason:
- the top N/M are chosen among the live beams *after* duplicates are dropped (the reference
  computes the top indices over the list before filtering, so a kept index can point at
  another beam than the one ranked);
- completed beams with the same text count once (the best-scored copy): N copies of one
  answer would crowd the final N and pick nothing new;
- with fewer than N completed beams at the end the result holds fewer particles (the
  reference duplicates completed beams up to N, which changes nothing but the vote).

DVTS (diverse verifier tree search): the N particles form ceil(N/M) independent subtrees, of
M particles each (the last one narrower when M does not divide N, so a run never holds more
than N). Each subtree keeps only its best new particle and expands it back to its width; a
subtree whose best particle has finished is done. The answer is the best of the subtrees'
final particles.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from itscale.errors import UsageError
from itscale.search.base import Search
from itscale.search.population import Run
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
        budget = run.settings.budget
        completed = self.completed(run)
        live = self.distinct([i for i, p in enumerate(run.particles) if not p.finished], run.particles)
        if not live:  # no beam active: keep the best N completed
            best = sorted(completed, key=lambda i: -_score(run.particles[i]))[:budget]
            run.select(sorted(best))
            return
        ranking = await self.ranking_scores(run, live)
        kept = sorted(live, key=lambda i: -ranking[i])[: max(1, budget // self.width(budget))]
        run.select(completed + [kept[k % len(kept)] for k in range(budget)])

    @staticmethod
    def distinct(indices: list[int], particles: list[Particle]) -> list[int]:
        """The first of every group of particles with the same text."""
        seen: dict[str, int] = {}
        for i in indices:
            seen.setdefault(particles[i].text, i)
        return list(seen.values())

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
        budget = run.settings.budget
        width = self.width(budget)
        subtrees: dict[int, list[int]] = {}
        for i, p in enumerate(run.particles):
            if p.tag is None:  # first step: ceil(N/M) subtrees of M, the last one narrower
                p.tag = (i // width, min(width, budget - (i // width) * width))
            subtrees.setdefault(p.tag, []).append(i)
        live = [i for i, p in enumerate(run.particles) if not p.finished]
        ranking = await self.ranking_scores(run, live)
        parents = []
        for (_, size), members in subtrees.items():
            best = max(members, key=lambda i: ranking.get(i, _score(run.particles[i])))
            if run.particles[best].finished:
                parents.append(best)  # the subtree is done: its best particle has finished
            else:
                parents += [best] * size
        run.select(parents)


def _score(p: Particle) -> float:
    return p.score if p.score is not None else 0.0
