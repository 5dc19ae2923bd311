"""`itscale view`, registered by cli.py through `add_commands`.

    itscale view run.json [--out run.html] [--llamppl run-llamppl.json]
    itscale view runs/gsm8k --problem ID --algorithm A --budget B [--seed S] [--out FILE.html]

Writes one self-contained HTML page (see itscale.viewer.render) and prints its path. Every
mistake (a missing file, a file that is not a trace or is too new, an evaluation directory
without that record, a record kept without its trace) is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from itscale.errors import UsageError

EPILOG = """\
examples:
  itscale solve "What is 3 + 4?" --algorithm particle-filter --budget 8 --trace run.json
  itscale view run.json                                  # writes run.html
  itscale eval --dataset gsm8k --limit 5 --algorithms particle-filter --budgets 8 --out runs/pf --trace
  itscale view runs/pf --problem gsm8k-0 --algorithm particle-filter --budget 8
  itscale view run.json --llamppl run-llamppl.json       # also LLaMPPL's SMC record, for its smc.html
"""


def add_commands(subparsers: Any) -> None:
    view = subparsers.add_parser(
        "view",
        help="write a self-contained HTML page showing a search trace (particles, weights, resampling, texts)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    view.add_argument(
        "source", metavar="FILE|EVAL_DIR", help="a trace file (solve --trace), or an eval --out directory"
    )
    view.add_argument("--out", metavar="FILE.html", help="the page to write (default: beside the input)")
    view.add_argument("--problem", help="eval directory: the problem id")
    view.add_argument("--algorithm", help="eval directory: the algorithm")
    view.add_argument("--budget", type=int, help="eval directory: the budget")
    view.add_argument("--seed", type=int, help="eval directory: the seed (default: the lowest recorded)")
    view.add_argument("--llamppl", metavar="OUT.json", help="also write the trace in LLaMPPL's SMC record format")
    view.set_defaults(handler=_view)


def _view(args: argparse.Namespace) -> int:
    from itscale.files import write_atomic
    from itscale.trace import to_llamppl
    from itscale.viewer.render import read_eval_record, read_trace, record_context, render_html

    source = Path(args.source)
    picks = {"--problem": args.problem, "--algorithm": args.algorithm, "--budget": args.budget}
    if source.is_dir():
        missing = [flag for flag, value in picks.items() if value is None]
        if missing:
            raise UsageError(f"{source} is a directory: to view a record of an evaluation give {', '.join(missing)}")
        record = read_eval_record(source, args.problem, args.algorithm, args.budget, args.seed)
        trace = record["trace"]
        page = render_html(trace, record_context(source, record), [p.get("answer") for p in record["particles"]])
        seed = f"-seed{record['seed']}" if record.get("seed") not in (None, 0) else ""
        name = f"view-{args.problem}-{args.algorithm}-{args.budget}{seed}"
        default_out = source / (re.sub(r"[^\w.+-]", "_", name) + ".html")
    else:
        given = [flag for flag, value in {**picks, "--seed": args.seed}.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} picks a record of an evaluation directory; {source} is not a directory")
        trace = read_trace(source)
        page = render_html(trace, {"source": str(source)})
        default_out = source.with_suffix(".html")
    out = Path(args.out) if args.out else default_out
    if out.resolve() == source.resolve():
        raise UsageError(f"the page would overwrite its input {source}: give --out FILE.html")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory: give a file name ending in .html")
    write_atomic(out, page)
    print(out)
    if args.llamppl:
        llamppl = Path(args.llamppl)
        write_atomic(llamppl, json.dumps(to_llamppl(trace)) + "\n")
        print(llamppl)
    return 0
