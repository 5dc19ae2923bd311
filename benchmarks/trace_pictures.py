"""Pictures of one GSM8K problem searched by paper-mode and by sound-mode particle filtering,
drawn by the trace viewer in headless Chromium (docs/results/trace-paper-pf.png and
docs/results/trace-sound-pf.png).

    .venv/bin/python benchmarks/trace_pictures.py [--problem gsm8k-test-0] [--budget 16] [--seed 0] \
        [--out docs/results/traces] [--pictures docs/results]

For each mode it runs `itscale solve` on the problem with the embedded qwen2.5-coder-0.5b and
the default reward (`--budget 16 --max-tokens 512 --seed 0 --trace OUT/<mode>-pf.json`), then
`itscale view` (OUT/<mode>-pf.html), then takes a screenshot of the page with the chosen
particle selected (`--redraw` draws the traces already written again, without searching).
Needs Debian's Chromium and playwright (`apt-get install chromium;
pip install playwright`). Extra arguments go to both `itscale solve` runs (`--n-threads 1`).
Two searches at budget 16 take a few minutes each on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

from itscale.eval.datasets import load_dataset
from itscale.viewer.browser import screenshot

MODES = {"paper": "particle-filter", "sound": "particle-filter-sound"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="gsm8k-test-0", help="a problem id of the dataset")
    parser.add_argument("--dataset", default="gsm8k")
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--out", default="docs/results/traces", help="where the traces and pages go")
    parser.add_argument("--pictures", default="docs/results", help="where the PNG pictures go")
    parser.add_argument("--redraw", action="store_true", help="no search: draw the traces already in --out again")
    args, extra = parser.parse_known_args()
    problem = next((p for p in load_dataset(args.dataset).problems if p.id == args.problem), None)
    if problem is None:
        parser.error(f"no problem {args.problem!r} in {args.dataset}")
    out, pictures = Path(args.out), Path(args.pictures)
    out.mkdir(parents=True, exist_ok=True)
    for mode, algorithm in MODES.items():
        trace, page, png = out / f"{mode}-pf.json", out / f"{mode}-pf.html", pictures / f"trace-{mode}-pf.png"
        solve = [
            *("solve", problem.problem, "--algorithm", algorithm, "--reference", problem.answer),
            *("--budget", str(args.budget), "--max-tokens", str(args.max_tokens), "--seed", str(args.seed)),
            *("--trace", str(trace), *extra),
        ]
        if not args.redraw:
            print("$ itscale", " ".join(a if " " not in a else repr(a) for a in solve), file=sys.stderr)
            subprocess.run([sys.executable, "-m", "itscale.cli", *solve], check=True)
        subprocess.run([sys.executable, "-m", "itscale.cli", "view", str(trace), "--out", str(page)], check=True)
        asyncio.run(screenshot(page, png))
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
