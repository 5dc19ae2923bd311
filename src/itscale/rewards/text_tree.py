"""Branches of the embedded engine for steps that it did not generate.

A reward that runs on the embedded engine (the LLM judge, the learned probe) normally reads
the particle's own branch: its KV cells are there already. When the particle was generated
by another backend, or comes from a file, its text is evaluated on the engine instead, as a
tree of steps: the requests of one batch that share a prompt or leading steps evaluate them
once (scoring every prefix of a particle costs its tokens once, not once per prefix).
"""

from __future__ import annotations

from collections.abc import Sequence

from itscale.lm.llamacpp import LlamaBranch, LlamaCppModel
from itscale.rewards.base import ScoreRequest


class TextBranches:
    """Builds (and afterwards releases) branches holding the texts of score requests."""

    def __init__(self, model: LlamaCppModel):
        self.model = model
        self._nodes: dict[tuple, LlamaBranch] = {}
        self._tokens: dict[str, tuple[int, ...]] = {}
        self._made: list[LlamaBranch] = []

    def own_branch(self, r: ScoreRequest) -> LlamaBranch | None:
        """The request's own branch when it lives on this engine (its KV cells are there)."""
        b = r.branch
        if isinstance(b, LlamaBranch) and b.owner is self.model and not b.released:
            return b
        return None

    async def branch(self, r: ScoreRequest) -> LlamaBranch:
        """A branch of this engine holding the request's text, grown from the branches
        already made for this batch (a lazy fork evaluates only what is new).

        The text is tokenised whole, as the generator's tokens would be ("\\n\\n" followed by
        a word is not "\\n\\n" then the word); the tree's nodes are the step boundaries, cut
        back to the tokens the whole text shares with them, so requests for successive
        prefixes of one particle share every earlier step."""
        path = step_path(r)
        full = self._tokens_of("".join(path))
        node = self._nodes.get((r.prompt,))
        if node is None:
            node = self._nodes[(r.prompt,)] = await self.model.start(r.prompt)
            self._made.append(node)
        done = 0
        for k in range(1, len(path) + 1):
            tokens = full if k == len(path) else _common_prefix(self._tokens_of("".join(path[:k])), full)
            if len(tokens) <= done:
                continue
            key = (r.prompt, tokens)
            if key not in self._nodes:
                self._nodes[key] = self._continued(node, full[done : len(tokens)])
                self._made.append(self._nodes[key])
            node, done = self._nodes[key], len(tokens)
        return node

    def release(self) -> None:
        for b in self._made:
            self.model.release(b)
        self._made.clear()
        self._nodes.clear()

    def _tokens_of(self, text: str) -> tuple[int, ...]:
        if text not in self._tokens:
            self._tokens[text] = tuple(self.model.tokenize(text, special=False))
        return self._tokens[text]

    def _continued(self, parent: LlamaBranch, tokens: Sequence[int]) -> LlamaBranch:
        """A lazy fork of `parent` continued by `tokens`: the engine copies the parent's
        cells and evaluates the rest when it is first used."""
        child = self.model.fork(parent)
        child.tokens.extend(tokens)
        child.steps.append(self.model.detokenize(tokens))  # a step of its own, so forks of it keep it
        child.step_ends.append(len(child.tokens))
        return child


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def step_path(r: ScoreRequest) -> tuple[str, ...]:
    """The steps to evaluate: a prefix request's single joined step is split back into the
    generator's steps when its records spell it out, so it shares them with step requests."""
    if r.prefix and r.records and "".join(s.text for s in r.records) == r.steps[0]:
        return tuple(s.text for s in r.records)
    return r.steps
