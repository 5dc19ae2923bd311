"""`itscale`: solve a problem, list models (and, in later modules, evaluate, serve and view traces).

Every SearchSettings field is a flag of the same name (`max_steps` → `--max-steps`);
algorithm options are `--option name=value` with the names of the Python classes.
User mistakes print one line and exit with code 2; other errors exit with code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from itscale.errors import ItscaleError, UsageError
from itscale.lm.models import DEFAULT_MODEL, MODELS, model_status
from itscale.search import algorithm_names
from itscale.search.allocation import AUTO_BUDGET, resolve_budget
from itscale.search.population import Run
from itscale.search.settings import SearchSettings

SAMPLE_PROBLEM = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?"
)
SAMPLE_ANSWER = "72"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        raise UsageError(message)


def _delimiter(text: str) -> str | int:
    """A token count ("32") or a string with escapes ("\\n\\n")."""
    if text.isdigit():
        return int(text)
    return codecs.decode(text, "unicode_escape")


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none") else int(text)


def _budget(text: str) -> int | str:
    """A number of particles ("8"), or "auto:B": a mean budget of B per problem, spent by
    difficulty (the compute-optimal algorithm; `itscale solve` and `itscale demo`)."""
    mean = text[len(AUTO_BUDGET) :] if text.startswith(AUTO_BUDGET) else text
    if not mean.isdigit():  # zero is refused with the other settings
        raise argparse.ArgumentTypeError(
            f"takes a number of particles (8) or auto:B, a mean budget per problem (auto:4); got {text!r}"
        )
    return text if text.startswith(AUTO_BUDGET) else int(text)


def resolve_auto_budget(args: argparse.Namespace, default_algorithm: str) -> None:
    """`--budget auto:B` is the compute-optimal algorithm at mean budget B (`resolve_budget`)."""
    args.algorithm, args.budget = resolve_budget(args.algorithm, args.budget, default_algorithm)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per SearchSettings field, same name, same default."""
    converters: dict[str, Callable[[str], Any]] = {
        "delimiter": _delimiter,
        "budget": _budget,
        "token_budget": _optional_int,
        "stop": lambda text: (codecs.decode(text, "unicode_escape"),),
    }
    for f in dataclasses.fields(SearchSettings):
        default = f.default
        kind = converters.get(f.name) or (type(default) if default is not None else str)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=None,
            metavar=f.name.upper(),
            help=f"default: {default!r}",
        )


def settings_from(args: argparse.Namespace) -> SearchSettings:
    if isinstance(getattr(args, "budget", None), str):
        raise UsageError(
            f"--budget {args.budget} is for `itscale solve`, `eval` and `serve`; here name the algorithm "
            "compute-optimal and give its mean budget as the budget"
        )
    values = {f: getattr(args, f) for f in SearchSettings.field_names() if getattr(args, f, None) is not None}
    return SearchSettings(**values)


def backend_from(args: argparse.Namespace):
    """The generator (and judge) that `add_backend_arguments` describes, to open."""
    from itscale.eval.plan import Backend

    return Backend(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Backend)})


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"named model or GGUF path (default {DEFAULT_MODEL})")
    parser.add_argument("--backend-url", help="an OpenAI-compatible server instead of the embedded engine")
    parser.add_argument("--backend-model", help="the model name on that server (default: its first)")
    parser.add_argument("--backend-mode", choices=["completions", "chat"], default="completions")
    parser.add_argument("--chat-template", help="chat template: chatml, a named model, a GGUF path or Jinja text")
    parser.add_argument("--n-ctx", type=int, default=16384, help="embedded engine: KV cells shared by all sequences")
    parser.add_argument("--n-threads", type=int, default=None, help="embedded engine: CPU threads")
    from itscale.rewards.registry import DEFAULT_REWARD

    parser.add_argument(
        "--reward",
        default=None,
        help=f"reward spec (default: the model's shipped probe head where its card makes it the default, "
        f"else {DEFAULT_REWARD!r}; see `itscale rewards`)",
    )
    parser.add_argument(
        "--judge-model", default=None, help="embedded model for judge rewards when the generator is a server"
    )


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """`name=value` pairs; values parse as JSON when they can (numbers, true, null)."""
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--option takes name=value, got {pair!r}")
        try:
            options[name.replace("-", "_")] = json.loads(value)
        except ValueError:
            options[name.replace("-", "_")] = value
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="itscale", description="Inference-time scaling: particle filtering and friends.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    solve = sub.add_parser("solve", help="solve one problem")
    solve.add_argument("problem", help="the problem text")
    solve.add_argument(
        "--algorithm",
        help=f"{', '.join(algorithm_names())} (default particle-filter; with --budget auto:B, compute-optimal)",
    )
    solve.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="algorithm option")
    solve.add_argument("--reference", help="the known answer: report whether the chosen one matches")
    solve.add_argument("--json", action="store_true", help="print the whole result as JSON")
    solve.add_argument(
        "--trace", metavar="FILE", help="write every step of every particle to FILE (view it: itscale view FILE)"
    )
    add_backend_arguments(solve)
    add_settings_arguments(solve)
    solve.set_defaults(handler=lambda args: asyncio.run(_solve(args)))

    demo = sub.add_parser("demo", help="particle filtering on a sample word problem with a known answer")
    demo.add_argument("--algorithm")
    demo.add_argument("--option", action="append", default=[], metavar="NAME=VALUE")
    demo.add_argument("--json", action="store_true")
    add_backend_arguments(demo)
    add_settings_arguments(demo)
    demo.set_defaults(handler=_demo)

    models = sub.add_parser("models", help="list the named models and whether they are installed")
    models.set_defaults(handler=lambda args: _models())

    from itscale.eval.commands import add_commands as eval_commands
    from itscale.rewards.commands import add_commands as reward_commands
    from itscale.server.commands import add_commands as server_commands
    from itscale.viewer.commands import add_commands as view_commands

    reward_commands(sub)
    eval_commands(sub)
    server_commands(sub)
    view_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except ItscaleError as error:
        print(f"itscale: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as stop:
        print("itscale: interrupted", file=sys.stderr)
        return getattr(stop, "exit_code", 130)
    except BrokenPipeError:  # `itscale report DIR | head`: the reader left, nothing to say
        sys.stderr.close()
        return 0


def _demo(args: argparse.Namespace) -> int:
    args.problem, args.reference = SAMPLE_PROBLEM, SAMPLE_ANSWER
    return asyncio.run(_solve(args))


def _models() -> int:
    for name, m in MODELS.items():
        status = model_status(name)
        print(f"{name:<20} {status:<10} {m.description}")
        if status != "ready":
            print(f"{'':<20} install:   {m.install_command}")
    print("Any local GGUF file works too: --model path/to/model.gguf")
    return 0


async def _solve(args: argparse.Namespace) -> int:
    from itscale.api import asolve
    from itscale.search import make_algorithm

    if not args.problem.strip():
        raise UsageError("the problem is empty: give the text of a problem to solve")
    # Everything a user can get wrong is checked before a model is loaded.
    resolve_auto_budget(args, "particle-filter")
    options = parse_options(args.option)
    make_algorithm(args.algorithm, **options)
    settings = settings_from(args)
    backend = backend_from(args)
    lm, judge = backend.open(), backend.open_judge()
    try:
        with _Progress(settings.budget) as progress:
            result = await asolve(
                args.problem,
                args.algorithm,
                lm=lm,
                reward=args.reward,  # None: the model's default (default_reward)
                judge_model=judge,
                settings=settings,
                algorithm_options=options,
                observer=progress.update,
            )
    finally:
        await lm.close()
        if judge is not None:
            await judge.close()
    if getattr(args, "trace", None):
        from pathlib import Path

        from itscale.files import write_json_atomic

        write_json_atomic(Path(args.trace), result.trace_dict())
    matches = None
    if args.reference is not None:
        from itscale.answers import is_equivalent

        matches = is_equivalent(result.answer, args.reference)
    if args.json:
        for warning in result.diagnostics.get("warnings", []):
            print(f"itscale: warning: {warning}", file=sys.stderr)
        out = result.to_dict()
        if matches is not None:
            out["reference"], out["matches"] = args.reference, matches
        print(json.dumps(out, indent=2))
    else:
        _print_result(result, args.reference, matches)
    return 0


class _Progress:
    """A one-line live status on stderr while a search runs."""

    def __init__(self, budget: int):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.budget = budget
        self.status = self.console.status("starting…")

    def __enter__(self) -> _Progress:
        self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.status.__exit__(*exc)

    def update(self, run: Run) -> None:
        live = len(run.live())
        tokens = run.usage.completion_tokens + run.usage.reward_tokens
        self.status.update(
            f"{run.algorithm.name}: step {run.step}, {live}/{len(run.particles)} particles live, "
            f"{tokens:,} tokens generated+scored, {run.usage.lm_seconds + run.usage.reward_seconds:.1f} s"
        )


def _print_result(result: Any, reference: str | None, matches: bool | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for warning in result.diagnostics.get("warnings", []):
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    console.print(f"[bold]answer:[/bold] {result.answer}")
    if reference is not None:
        verdict = "[green]matches[/green]" if matches else "[red]does not match[/red]"
        console.print(f"[bold]reference:[/bold] {reference} — {verdict}")
    if result.budget_limited:
        console.print("[yellow]the token budget ran out before every particle finished[/yellow]")
    table = Table("particle", "answer", "weight", "reward", "steps", "tokens", "end", title="final particles")
    order = sorted(range(len(result.particles)), key=lambda i: -result.weights[i])
    for i in order:
        p = result.particles[i]
        table.add_row(
            str(p.id),
            str(p.answer),
            f"{result.weights[i]:.3f}",
            "-" if p.score is None else f"{p.score:.3f}",
            str(len(p.steps)),
            str(p.tokens),
            str(p.end),
        )
    console.print(table)
    u = result.usage
    console.print(
        f"[bold]usage:[/bold] prompt {u.prompt_tokens:,} + completion {u.completion_tokens:,} + reward "
        f"{u.reward_tokens:,} = {u.total_tokens:,} tokens; {u.lm_calls} generation calls, "
        f"{u.reward_calls} reward calls; {u.seconds:.1f} s ({u.lm_seconds:.1f} s generating, "
        f"{u.reward_seconds:.1f} s scoring)"
    )
    if result.genealogy:
        console.print(f"resampled at {sum(1 for g in result.genealogy if g.resampled)} of the steps")


if __name__ == "__main__":
    sys.exit(main())
