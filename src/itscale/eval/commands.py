"""`itscale eval` and `itscale report`, registered by cli.py through `add_commands`.

Everything a user can get wrong (the dataset, a JSONL line, algorithm names and options,
budgets, seeds, the reward, the settings, an output directory of another configuration) is
checked before a model is opened; each is a one-line error with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from itscale.errors import Terminated, UsageError
from itscale.eval.datasets import load_dataset
from itscale.eval.plan import Plan, parse_algorithms, parse_budgets, parse_seeds, split_options

EPILOG = """\
examples:
  itscale eval --dataset gsm8k --limit 100 --algorithms greedy,best-of-n,particle-filter \\
      --budgets 1,2,4,8,16 --out runs/gsm8k
  itscale eval --dataset problems.jsonl --algorithms particle-filter,particle-filter-sound \\
      --option particle-filter-sound:resampling=stratified --backend-url http://127.0.0.1:8000 \\
      --judge-model qwen2.5-coder-0.5b --workers 8 --out runs/mine
  itscale report runs/gsm8k

--option NAME=VALUE applies to every algorithm; --option ALGORITHM:NAME=VALUE to one.
Run the same command again to resume: only missing records are computed.
"""


def add_commands(subparsers: Any) -> None:
    from itscale.cli import add_backend_arguments, add_settings_arguments
    from itscale.search import algorithm_names

    run = subparsers.add_parser(
        "eval",
        help="evaluate algorithms over budgets on a benchmark (resumable)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--dataset",
        required=True,
        help="a JSONL path, gsm8k/math500/aime24/amc23, or owner/name[:config][@split] on the Hugging Face hub",
    )
    run.add_argument(
        "--data-dir", help="where the named datasets live (default: $ITSCALE_DATA_DIR, else ../shared/data)"
    )
    run.add_argument(
        "--algorithms",
        help="comma-separated: " + ", ".join(algorithm_names()) + " (with --budget auto:B: compute-optimal)",
    )
    run.add_argument(
        "--budgets",
        default=DEFAULT_BUDGETS,
        help=f"comma-separated positive integers (default {DEFAULT_BUDGETS}); compute-optimal reads each as a mean",
    )
    run.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    run.add_argument("--limit", type=int, help="only the first N problems")
    run.add_argument("--out", required=True, help="output directory (created; an existing one is resumed)")
    run.add_argument("--option", action="append", default=[], metavar="[ALGORITHM:]NAME=VALUE")
    run.add_argument("--executor", choices=["local", "ray"], default="local")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="problems run at once, for a server backend (per Ray worker with --executor ray)",
    )
    run.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    run.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs per Ray worker (default 1)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--trace", action="store_true", help="keep every run's trace in its record (for `itscale view DIR ...`)"
    )
    add_backend_arguments(run)
    add_settings_arguments(run)
    run.set_defaults(handler=_eval, parser=run)

    report = subparsers.add_parser("report", help="accuracy table and scaling plots of an eval directory")
    report.add_argument("directory", help="the --out directory of `itscale eval`")
    report.add_argument(
        "--compare",
        type=_names,
        default=None,
        metavar="ALGORITHMS",
        help="algorithms set against every other, paired over problems (comma-separated; "
        "default: particle-filter when present; '' for none)",
    )
    report.add_argument(
        "--baseline",
        metavar="DIR",
        help="another eval directory over the same dataset (another reward, say): every cell both have is "
        "set against it, paired over problems",
    )
    report.add_argument(
        "--reference",
        type=_cell,
        metavar="ALGORITHM:BUDGET",
        help="one cell every other cell is set against, paired over problems (e.g. weighted-best-of-n:16: "
        "does a search at a smaller budget match it?)",
    )
    report.set_defaults(handler=_report)


def plan_from(args: argparse.Namespace) -> Plan:
    """The plan the arguments describe; raises UsageError for anything wrong in them."""
    from itscale.cli import backend_from, parse_options, settings_from
    from itscale.eval.runner import reward_factors
    from itscale.rewards.registry import default_reward_for, reward_names
    from itscale.search.allocation import check_policy_before_loading

    _resolve_auto_budget(args)
    if args.budget is not None or args.seed is not None:
        raise UsageError("itscale eval takes --budgets and --seeds (lists), not --budget or --seed")
    if args.algorithms is None:
        raise UsageError("itscale eval needs --algorithms (comma-separated), or --budget auto:B for compute-optimal")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be a positive integer, got {args.limit}")
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if args.ray_cpus <= 0:
        raise UsageError(f"--ray-cpus must be positive, got {args.ray_cpus}")
    algorithms = parse_algorithms(args.algorithms)
    budgets = parse_budgets(args.budgets)
    seeds = parse_seeds(args.seeds)
    options = split_options(args.option, algorithms, parse_options)
    backend = backend_from(args)
    reward = args.reward or default_reward_for(backend.judge_model if backend.backend_url else backend.model)
    unknown = [name for name in reward_factors(reward) if name not in reward_names()]
    if unknown:
        raise UsageError(f"unknown reward {unknown[0]!r} in --reward: use one of {', '.join(reward_names())}")
    if "compute-optimal" in algorithms and not backend.backend_url:
        check_policy_before_loading(backend.model, options.get("compute-optimal", {}).get("policy"), budgets)
    settings = settings_from(args)
    dataset = load_dataset(args.dataset, args.data_dir)
    return Plan(dataset, algorithms, budgets, seeds, settings, reward, backend, options, args.limit)


DEFAULT_BUDGETS = "1,2,4,8,16"


def _resolve_auto_budget(args: argparse.Namespace) -> None:
    """`--budget auto:B`, as in `itscale solve`: the compute-optimal algorithm at mean budget B
    (the same as `--algorithms compute-optimal --budgets B`)."""
    from itscale.search.allocation import resolve_budget

    if not isinstance(args.budget, str):
        return
    if args.budgets != DEFAULT_BUDGETS:
        raise UsageError(
            f"--budget {args.budget} is compute-optimal at one mean budget; with other budgets, name it in "
            "--algorithms and give its mean budgets in --budgets (--algorithms compute-optimal,... --budgets 4,...)"
        )
    algorithm, budget = resolve_budget(args.algorithms, args.budget, "compute-optimal")
    args.algorithms, args.budgets, args.budget = algorithm, str(budget), None


def command_line(args: argparse.Namespace, command: str = "eval") -> list[str]:
    """The command as typed, up to defaults: every argument that differs from its default."""
    words = ["itscale", command]
    for action in args.parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest == "help" or value == action.default:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:
            words.append(flag)
        else:
            for item in value if isinstance(value, list) else [value]:
                words += [flag, str(item)]
    return words


def _eval(args: argparse.Namespace) -> int:
    from itscale.eval.evaluate import evaluate

    plan = plan_from(args)
    if args.workers > 1 and not args.backend_url:
        # The engine batches concurrent runs together, and llama.cpp's arithmetic depends on
        # the batch: even greedy runs then change with scheduling.
        print(
            "itscale: note: --workers > 1 on the embedded engine batches runs together; results are then not "
            "reproducible run to run (use --workers 1 for that)",
            file=sys.stderr,
        )
    try:
        with _terminate_stops_like_ctrl_c():
            summary = evaluate(
                plan,
                args.out,
                executor=args.executor,
                workers=args.workers,
                progress=not args.no_progress,
                command=command_line(args),
                ray_address=args.ray_address,
                ray_cpus=args.ray_cpus,
                trace=args.trace,
            )
    except KeyboardInterrupt as stop:  # said here, in full: the generic "interrupted" would repeat it
        print(
            f"itscale: stopped; finished records are saved in {args.out}: run the same command to resume",
            file=sys.stderr,
        )
        return getattr(stop, "exit_code", 130)
    for warning in summary.warnings:
        print(f"itscale: warning: {warning}", file=sys.stderr)
    torn = "; dropped a torn last line left by a killed run" if summary.dropped_torn_line else ""
    print(
        f"{summary.written} new records ({summary.already_done} from earlier runs) in "
        f"{summary.out}/results.jsonl{torn}; `itscale report {summary.out}` makes the table and plots"
    )
    return 0


@contextlib.contextmanager
def _terminate_stops_like_ctrl_c() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`, a scheduler pre-empting the job) stops an evaluation the way
    Ctrl-C does: the run in progress is abandoned, every finished record stays, the same
    command resumes. Without this, Python dies at once on SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _cell(text: str) -> tuple[str, int]:
    algorithm, _, budget = text.rpartition(":")
    if not algorithm.strip() or not budget.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected ALGORITHM:BUDGET such as weighted-best-of-n:16, got {text!r}")
    return algorithm.strip(), int(budget)


def _report(args: argparse.Namespace) -> int:
    from itscale.eval.report import print_table, write_report

    rows, paths = write_report(args.directory, compare=args.compare, baseline=args.baseline, reference=args.reference)
    print_table(rows)
    for path in paths.values():
        print(path)
    return 0
