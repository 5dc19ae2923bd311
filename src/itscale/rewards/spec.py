"""Reward specs: one string that names a reward, its options, or a product of rewards.

    arithmetic
    llm-judge(step_question="Is the last step right? Answer with Yes or No.")
    arithmetic * llm-judge
    arithmetic^2 * self-certainty(variant=kl, scale=8)

Grammar: factors joined by `*`; a factor is a reward name, optional options in
parentheses (`key=value` separated by commas; a value is a quoted string, or a bare word
read as JSON when it can be: numbers, true, false, null), and an optional exponent
`^number`. The CLI's `--reward` takes a spec, so options reach a reward from the command
line.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

from itscale.errors import UsageError

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<punct>[()*^,=])
      | (?P<word>[^\s()*^,="']+)
    )""",
    re.VERBOSE,
)


@dataclass
class Factor:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    exponent: float = 1.0


def parse_spec(spec: str) -> list[Factor]:
    """The factors of a reward spec; a UsageError that points at the problem otherwise."""
    tokens = _tokenize(spec)
    factors: list[Factor] = []
    i = 0

    def expect(kind: str, what: str) -> str:
        nonlocal i
        if i >= len(tokens) or tokens[i][0] != kind:
            found = repr(tokens[i][1]) if i < len(tokens) else "the end"
            raise UsageError(f"bad reward spec {spec!r}: expected {what}, found {found}")
        i += 1
        return tokens[i - 1][1]

    while True:
        factor = Factor(expect("word", "a reward name"))
        if i < len(tokens) and tokens[i] == ("punct", "("):
            i += 1
            while not (i < len(tokens) and tokens[i] == ("punct", ")")):
                key = expect("word", "an option name")
                if not (i < len(tokens) and tokens[i] == ("punct", "=")):
                    raise UsageError(f"bad reward spec {spec!r}: option {key!r} needs a value (key=value)")
                i += 1
                if i < len(tokens) and tokens[i][0] in ("string", "word"):
                    factor.options[key.replace("-", "_")] = _value(*tokens[i])
                    i += 1
                else:
                    raise UsageError(f"bad reward spec {spec!r}: option {key!r} needs a value")
                if i < len(tokens) and tokens[i] == ("punct", ","):
                    i += 1
                elif not (i < len(tokens) and tokens[i] == ("punct", ")")):
                    raise UsageError(f"bad reward spec {spec!r}: expected ',' or ')' after option {key!r}")
            i += 1
        if i < len(tokens) and tokens[i] == ("punct", "^"):
            i += 1
            text = expect("word", "an exponent after '^'")
            try:
                factor.exponent = float(text)
            except ValueError:
                raise UsageError(f"bad reward spec {spec!r}: the exponent {text!r} is not a number") from None
            if factor.exponent < 0:
                raise UsageError(f"bad reward spec {spec!r}: exponents must be non-negative")
        factors.append(factor)
        if i == len(tokens):
            return factors
        if tokens[i] != ("punct", "*"):
            raise UsageError(f"bad reward spec {spec!r}: expected '*' between rewards, found {tokens[i][1]!r}")
        i += 1


def _tokenize(spec: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    spec_stripped = spec.rstrip()
    while position < len(spec_stripped):
        match = _TOKEN.match(spec_stripped, position)
        if not match or match.end() == position:
            raise UsageError(f"bad reward spec {spec!r}: cannot read it from {spec_stripped[position:]!r}")
        kind = match.lastgroup or "word"
        tokens.append((kind, match.group(kind)))
        position = match.end()
    if not tokens:
        raise UsageError("the reward spec is empty: give a reward name (see `itscale rewards`)")
    return tokens


def _value(kind: str, text: str) -> Any:
    if kind == "string":
        return ast.literal_eval(text)  # a quoted string, escapes as in Python
    try:
        return json.loads(text)
    except ValueError:
        return text
