"""`itscale rewards`: the rewards a search can use, and how to name and combine them."""

from __future__ import annotations

import argparse
from typing import Any

SPEC_HELP = """\
A reward spec names a reward, with options in parentheses, or a product with exponents:
  --reward arithmetic
  --reward 'llm-judge(step_question="Is the last step correct? Answer with Yes or No.")'
  --reward 'arithmetic * llm-judge'
  --reward 'arithmetic^2 * self-certainty(variant=kl)'
Aggregations of step scores (algorithm option aggregation=...): last, min, prod, mean, model."""


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser("rewards", help="list the rewards and how to combine them")
    parser.set_defaults(handler=_list_rewards)


def _list_rewards(args: argparse.Namespace) -> int:
    from itscale.rewards.registry import DEFAULT_REWARD, REWARDS, _accepted_options

    width = max(len(name) for name in REWARDS)
    for name, entry in REWARDS.items():
        default = "  (default)" if name == DEFAULT_REWARD else ""
        print(f"{name:<{width}}  {entry.summary}{default}")
        options = sorted(_accepted_options(entry))
        if options:
            print(f"{'':<{width}}  options: {', '.join(options)}")
    if DEFAULT_REWARD not in REWARDS:
        print(f"default: {DEFAULT_REWARD}")
    print()
    print(SPEC_HELP)
    return 0
