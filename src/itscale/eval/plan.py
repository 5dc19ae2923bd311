"""What an evaluation runs: the grid (algorithms × budgets × seeds × problems) and the units
of work it splits into, plus the backend every worker opens for itself.

A *unit* is one search run that yields one or more records. Algorithms that pick from
independent rollouts (`Search.reuses_samples`: self-consistency, best-of-N, ...) get one unit
per (problem, seed) run at the largest budget still missing; every smaller missing budget b
is then evaluated with `pick(particles[:b])`. Those whose rollouts are the same
(`Search.rollout_signature`: same step settings and seed give the same steps) share that
one run, each picking with its own rule, as search-and-learn evaluates its samplers. An
algorithm that ignores the budget (`Search.uses_budget` false: greedy) gets one unit per
(problem, seed) recorded at every missing budget. Other algorithms get one unit per budget.

Units run problem by problem (every algorithm and budget of a problem before the next
problem): a study stopped part way, or resumed across sessions, always has the whole grid
on its first k problems, so every cell of its report is over the same problems.

The *identity* of a plan is what a record's meaning depends on (dataset, model, reward,
search settings, algorithm options); an output directory refuses a plan with another
identity. The grid is not part of it: budgets, seeds, algorithms and --limit may grow
between runs over the same directory, and only the missing records are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from itscale.errors import UsageError
from itscale.eval.datasets import Dataset, Problem
from itscale.eval.store import Key
from itscale.search import algorithm_names, make_algorithm
from itscale.search.settings import SearchSettings


@dataclass(frozen=True)
class Backend:
    """How to open the generator (and a judge): picklable, so each Ray worker opens its own."""

    model: str
    backend_url: str | None = None
    backend_model: str | None = None
    backend_mode: str = "completions"
    chat_template: str | None = None
    judge_model: str | None = None
    n_ctx: int = 16384
    n_threads: int | None = None

    def open(self, **engine_options: Any):
        """The generator; `engine_options` go to the embedded engine (ignored for a server)."""
        from itscale.api import open_model

        engine = {} if self.backend_url else {"n_ctx": self.n_ctx, "n_threads": self.n_threads, **engine_options}
        return open_model(
            self.model,
            backend_url=self.backend_url,
            backend_model=self.backend_model,
            backend_mode=self.backend_mode,
            chat_template=self.chat_template,
            **engine,
        )

    def open_judge(self):
        from itscale.api import open_model

        return open_model(self.judge_model, n_threads=self.n_threads) if self.judge_model else None

    def identity(self) -> dict[str, Any]:
        if self.backend_url:
            where = {"backend_url": self.backend_url, "backend_model": self.backend_model, "mode": self.backend_mode}
        else:
            where = {"model": self.model}
        return {**where, "chat_template": self.chat_template, "judge_model": self.judge_model}


@dataclass(frozen=True)
class Unit:
    """One search run: `algorithm` on `problem` with `seed` at `run_budget` particles, giving
    records for `budgets` (just run_budget; with sample reuse, or for an algorithm that
    ignores the budget, every missing budget). `also`: other sample-reusing algorithms that
    pick from the same rollouts (equal `Search.rollout_signature`), each with its missing
    budgets; `algorithm` is then one that uses the reward, so the rollouts carry scores."""

    problem: Problem
    algorithm: str
    seed: int
    run_budget: int
    budgets: tuple[int, ...]
    reuse: bool
    also: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def picks(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Every (algorithm, budgets) this run records."""
        return ((self.algorithm, self.budgets), *self.also)


@dataclass(frozen=True)
class Plan:
    dataset: Dataset
    algorithms: tuple[str, ...]
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]
    settings: SearchSettings
    reward: str
    backend: Backend
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    limit: int | None = None

    @property
    def problems(self) -> list[Problem]:
        return self.dataset.head(self.limit)

    def search(self, algorithm: str):
        return make_algorithm(algorithm, **self.options.get(algorithm, {}))

    def identity(self) -> dict[str, Any]:
        settings = self.settings.identity()
        identity = {
            "dataset": {"source": self.dataset.source, "fingerprint": self.dataset.fingerprint},
            "model": self.backend.identity(),
            "reward": self.reward,
            "settings": settings,
            "options": {a: self._identity_options(a) for a in self.algorithms},
        }
        heads = self._probe_heads()
        if heads:  # only then: the identities of studies without a learned head stay as they were
            identity["probe_heads"] = heads
        return identity

    def _identity_options(self, algorithm: str) -> dict[str, Any]:
        """An algorithm's options, and for compute-optimal the sha256 of the budget policy it
        reads (the option's file, else the one shipped for the model): a policy fitted again
        must not allocate into a study begun with the old one."""
        options = dict(self.options.get(algorithm, {}))
        if algorithm == "compute-optimal":
            from itscale.search.allocation import policy_digest, shipped_policy

            options["policy_sha256"] = policy_digest(options.get("policy") or shipped_policy(self._generator_name()))
        return options

    def _generator_name(self) -> str:
        """The name the generator goes by once open (what shipped policies are looked up by)."""
        from itscale.lm.models import model_name

        if self.backend.backend_url:
            return self.backend.backend_model or self.backend.backend_url
        return model_name(self.backend.model)

    def _embedded_name(self) -> str | None:
        """The name of the embedded engine a learned head reads (the judge beside a server)."""
        from itscale.lm.models import model_name

        embedded = self.backend.judge_model if self.backend.backend_url else self.backend.model
        return model_name(embedded) if embedded else None

    def _probe_heads(self) -> list[str | None]:
        """The weights' sha256 of every learned head the reward reads (the spec's path, else
        the head shipped for the embedded model): the spec "probe" names no file, and a head
        trained again must not score into a study begun with the old one."""
        from itscale.rewards.probe import head_digest, shipped_head
        from itscale.rewards.spec import parse_spec

        embedded = self._embedded_name()
        heads = []
        for factor in parse_spec(self.reward):
            if factor.name == "probe":
                path = factor.options.get("path") or (shipped_head(embedded) if embedded else None)
                heads.append(head_digest(path) if path else None)
        return heads

    def grid(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset.name,
            "algorithms": list(self.algorithms),
            "budgets": list(self.budgets),
            "seeds": list(self.seeds),
            "limit": self.limit,
            "problems": len(self.problems),
        }

    def keys(self) -> list[Key]:
        return [
            (p.id, a, b, s) for a in self.algorithms for b in self.budgets for s in self.seeds for p in self.problems
        ]

    def units(self, done: set[Key] | dict[Key, Any]) -> list[Unit]:
        """The runs still needed: seed by seed, problem by problem, and within a problem the
        cheapest budgets first, algorithm by algorithm. Sample-reusing algorithms with the
        same rollouts share one run per (problem, seed), at the largest budget any misses."""
        units = []
        sharing: dict[tuple, list[tuple[int, str, tuple[int, ...]]]] = {}
        for order, algorithm in enumerate(self.algorithms):
            search = self.search(algorithm)
            signature = search.rollout_signature(self.settings)
            for seed in self.seeds:
                for index, problem in enumerate(self.problems):
                    missing = tuple(b for b in self.budgets if (problem.id, algorithm, b, seed) not in done)
                    if not missing:
                        continue
                    if signature is not None:
                        sharing.setdefault((seed, index, signature), []).append((order, algorithm, missing))
                    elif search.reuses_samples or not search.uses_budget:  # one run for every missing budget
                        run_budget = max(missing) if search.reuses_samples else min(missing)
                        run = Unit(problem, algorithm, seed, run_budget, missing, search.reuses_samples)
                        units.append(((seed, index, run_budget, order), run))
                    else:
                        units += [
                            ((seed, index, b, order), Unit(problem, algorithm, seed, b, (b,), False)) for b in missing
                        ]
        for (seed, index, _), pickers in sharing.items():
            order, algorithm, missing = next((p for p in pickers if self.search(p[1]).uses_reward), pickers[0])
            run_budget = max(b for _, _, budgets in pickers for b in budgets)
            also = tuple((a, budgets) for _, a, budgets in pickers if a != algorithm)
            run = Unit(self.problems[index], algorithm, seed, run_budget, missing, True, also)
            units.append(((seed, index, run_budget, order), run))
        return [u for _, u in sorted(units, key=lambda pair: pair[0])]


# ------------------------------------------------------------------ parsing the command line


def parse_budgets(text: str) -> tuple[int, ...]:
    return _integers(text, "--budgets", minimum=1, what="positive integers")


def parse_seeds(text: str) -> tuple[int, ...]:
    return _integers(text, "--seeds", minimum=0, what="non-negative integers")


def _integers(text: str, flag: str, minimum: int, what: str) -> tuple[int, ...]:
    values = []
    for part in text.split(","):
        item = part.strip()
        try:
            value = int(item)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise UsageError(f"{flag} takes {what} separated by commas, got {item!r} in {text!r}")
        values.append(value)
    return tuple(sorted(set(values)))


def parse_algorithms(text: str) -> tuple[str, ...]:
    """Names from `itscale.search.algorithm_names()`, checked before anything runs."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UsageError(f"--algorithms needs at least one of {', '.join(algorithm_names())}")
    known = algorithm_names()
    for name in names:
        if name not in known:
            raise UsageError(f"unknown algorithm {name!r} in --algorithms: use {', '.join(known)}")
    return names


def split_options(pairs: list[str], algorithms: tuple[str, ...], parse) -> dict[str, dict[str, Any]]:
    """`--option NAME=VALUE` applies to every algorithm; `--option ALGORITHM:NAME=VALUE` to one.
    Each algorithm is built with its options here, so a bad option fails before any run."""
    shared, specific = [], {a: [] for a in algorithms}
    for pair in pairs:
        name = pair.partition("=")[0]
        target, colon, option = name.partition(":")
        if not colon:
            shared.append(pair)
        elif target not in specific:
            raise UsageError(f"--option {pair!r} names algorithm {target!r}, which is not in --algorithms")
        else:
            specific[target].append(option + pair[len(name) :])
    options = {a: {**parse(shared), **parse(specific[a])} for a in algorithms}
    for algorithm in algorithms:
        try:
            make_algorithm(algorithm, **options[algorithm])
        except UsageError as error:
            hint = "; give it to one algorithm with --option ALGORITHM:NAME=VALUE" if shared else ""
            raise UsageError(f"{error}{hint}") from None
    return options
