"""A process reward that checks the arithmetic a step states, exactly.

Small models make arithmetic slips ("48 / 2 = 26") that no amount of sampling fixes; a
step that states a false equation is wrong whatever else it says. This verifier finds the
equations in a step ("48 / 2 = 24", "3 x 4 = 12", "$5 + 7 = 12$", chained "a = b = c",
LaTeX `\\times`, `\\cdot`, `\\div`, `\\frac{a}{b}`, thousands separators, money "$1,200",
"20% of 50") and evaluates both sides with exact fractions:

- a step with a false equation scores `wrong` (0.05 by default),
- a step whose equations all hold scores `right` (0.95),
- a step without any checkable equation is neutral (0.5).

Scores stay inside (0, 1) so that the particle filter's logit weights stay finite.

What counts as an equation: a chain of arithmetic expressions joined by "=" in which at
least one side has an operator ("x = 5" and "200 = 20" from "10% of 200 = 20" are not
checked). Rounding is forgiven where the text shows it: a stated value with d decimals
may differ from the exact one by half a unit in its last place, and when an operand is a
decimal (possibly rounded before) by 1%. "≈" is checked with a 1% tolerance.

Pure Python, no model: tens of thousands of steps per second (see benchmarks/rewards.py).
"""

from __future__ import annotations

import ast
import asyncio
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from itscale.rewards.base import CachedReward, ScoreRequest, Scores

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
# The work per expression is bounded: no intermediate value (numerator or denominator) may
# grow past this many bits, and operators may not nest deeper than MAX_DEPTH, so a step such
# as "(((9^64)^64)^64)^64 = 1" is not checkable rather than minutes of big-integer powers.
MAX_BITS = 4096
MAX_DEPTH = 32

# LaTeX and unicode spellings of operators, rewritten before equations are looked for.
_LATEX = [
    (re.compile(r"\\(?:times|cdot|ast)\b"), "*"),
    (re.compile(r"\\div\b"), "/"),
    (re.compile(r"\\(?:left|right|displaystyle|[,!;: ])"), ""),
    (re.compile(r"\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}"), " "),
    (re.compile(r"\\approx\b"), "~="),
    (re.compile(r"\\\$"), " "),
    (re.compile(r"\{,\}"), ""),  # LaTeX thousands separator 1{,}000
    (re.compile(r"\\[\[\]()]"), " "),  # display and inline math delimiters
]
_UNICODE = [(re.compile(r"[×·∗]"), "*"), (re.compile(r"÷"), "/"), (re.compile(r"[−–]"), "-"), (re.compile(r"≈"), "~=")]
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TIMES_X = re.compile(r"(?<=[\d)])\s*[xX]\s*(?=[\d(])")
_PERCENT_OF = re.compile(r"(\d+(?:\.\d+)?)\s*\\?%\s*of\b")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*\\?%")
_IMPLICIT_PRODUCT = re.compile(r"(?<=[\d)])\s*(?=\()|(?<=\))\s*(?=\d)")
_BRACES = re.compile(r"[{}]")
# A run of characters that can form a chain of equations.
_RUN = re.compile(r"[\d.+\-*/^()~= \t]+")  # a line break ends a chain
_DECIMAL = re.compile(r"\d*\.\d+")
_STARTS_OPERAND = re.compile(r"[\d(]|\.\d|-[\d(]")


@dataclass(frozen=True)
class Equation:
    """Two sides of a stated equation, as written and evaluated."""

    left: str
    right: str
    left_value: Fraction
    right_value: Fraction
    approximate: bool

    @property
    def holds(self) -> bool:
        if self.left_value == self.right_value:
            return True
        tolerance = _tolerance(self.left, self.right, self.approximate)
        scale = max(abs(self.left_value), abs(self.right_value), Fraction(1))
        return abs(self.left_value - self.right_value) <= tolerance.absolute + tolerance.relative * scale


@dataclass(frozen=True)
class _Tolerance:
    absolute: Fraction
    relative: Fraction


def _tolerance(left: str, right: str, approximate: bool) -> _Tolerance:
    relative = Fraction(1, 100) if approximate else Fraction(0)
    absolute = Fraction(0)
    for side in (left, right):
        literal = side.strip()
        if _DECIMAL.fullmatch(literal):  # a stated (rounded) result: half a unit in its last place
            decimals = len(literal.split(".")[1])
            absolute = max(absolute, Fraction(1, 2 * 10**decimals))
    if _DECIMAL.search(left) and not _DECIMAL.fullmatch(left.strip()):
        relative = max(relative, Fraction(1, 100))  # a rounded operand
    return _Tolerance(absolute, relative)


def normalise(text: str) -> str:
    """The text with operators, fractions, percentages and number formats made plain.
    Each rewrite runs only when its trigger character is present (this is the hot path)."""
    if "\\" in text or "{" in text:
        for pattern, replacement in _LATEX:
            text = pattern.sub(replacement, text)
        for _ in range(4):  # nested \frac, innermost first
            text, n = _FRAC.subn(r"((\1)/(\2))", text)
            if not n:
                break
        text = _BRACES.sub(" ", text)
    if not text.isascii():
        for pattern, replacement in _UNICODE:
            text = pattern.sub(replacement, text)
    if "$" in text:
        text = text.replace("$", " ")  # money and math delimiters
    if "," in text:
        text = _THOUSANDS.sub("", text)
    if "x" in text or "X" in text:
        text = _TIMES_X.sub("*", text)
    if "%" in text:
        text = _PERCENT_OF.sub(r"(\1/100)*", text)
        text = _PERCENT.sub(r"(\1/100)", text)
    if "(" in text:
        text = _IMPLICIT_PRODUCT.sub("*", text)
    return text


def find_equations(text: str) -> list[Equation]:
    """Every checkable equation the text states (consecutive sides of each chain)."""
    equations: list[Equation] = []
    if "=" not in text and "≈" not in text and "\\approx" not in text:
        return equations
    for run in _RUN.finditer(normalise(text)):
        if "=" not in run.group():
            continue
        sides = run.group().split("=")
        approximate = [side.endswith("~") for side in sides[:-1]]
        sides = [side.rstrip("~") for side in sides]
        values: list[tuple[str, Fraction] | None] = []
        for i, side in enumerate(sides):
            if i == 0:
                values.append(_longest_suffix(side))
            elif i == len(sides) - 1:
                values.append(_longest_prefix(side))
            else:
                values.append(_evaluated(side))
        chain = []
        for i in range(len(sides) - 1):
            a, b = values[i], values[i + 1]
            if a is not None and b is not None:
                chain.append(Equation(a[0], b[0], a[1], b[1], approximate[i]))
        # A chain in which no side computes anything ("x = 5", "200 = 20") is no equation.
        if any(_has_operator(e.left) or _has_operator(e.right) for e in chain):
            equations.extend(chain)
    return equations


def _has_operator(expression: str) -> bool:
    return bool(re.search(r"[\d)]\s*[-+*/^]", expression))


def _longest_suffix(side: str) -> tuple[str, Fraction] | None:
    """The longest tail of the text before the first "=" that is an expression: "Step 1.
    16 - 3" gives "16 - 3"."""
    side = side.rstrip()
    for start in range(len(side)):
        if start and not (side[start - 1].isspace() or side[start - 1] in "(+-*/"):
            continue
        if not _STARTS_OPERAND.match(side, start):  # "- 16 - 3" is a bullet, not minus 16
            continue
        found = _evaluated(side[start:])
        if found is not None:
            return found
    return None


def _longest_prefix(side: str) -> tuple[str, Fraction] | None:
    """The longest head of the text after the last "=" that is an expression: "24. Then"
    gives "24"."""
    side = side.lstrip()
    for end in range(len(side), 0, -1):
        found = _evaluated(side[:end])
        if found is not None:
            return found
    return None


def _evaluated(expression: str) -> tuple[str, Fraction] | None:
    return _evaluated_stripped(expression.strip().rstrip("."))


@lru_cache(maxsize=65536)
def _evaluated_stripped(expression: str) -> tuple[str, Fraction] | None:
    """Cached: the same expressions recur across the particles of one problem."""
    if not expression or len(expression) > MAX_EXPRESSION_CHARS or not any(c.isdigit() for c in expression):
        return None
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
        return expression, _value(tree.body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError):
        return None


def _value(node: ast.AST, depth: int = 0) -> Fraction:
    """Exact value of an arithmetic syntax tree; anything else, or anything too big to
    check quickly (see MAX_BITS, MAX_DEPTH), is a ValueError."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        value = Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        return _bounded(value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _value(node.operand, depth + 1)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _value(node.left, depth + 1), _value(node.right, depth + 1)
        if isinstance(node.op, ast.Add):
            return _bounded(left + right)
        if isinstance(node.op, ast.Sub):
            return _bounded(left - right)
        if isinstance(node.op, ast.Mult):
            return _bounded(left * right)
        if isinstance(node.op, ast.Div):
            return _bounded(left / right)
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1 or abs(right) > MAX_EXPONENT:
                raise ValueError("unsupported exponent")
            if _bits(left) * abs(int(right)) > MAX_BITS:  # decided before computing it
                raise ValueError("the power is too large to check")
            return left ** int(right)
    raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")


def _bits(value: Fraction) -> int:
    return max(value.numerator.bit_length(), value.denominator.bit_length())


def _bounded(value: Fraction) -> Fraction:
    if _bits(value) > MAX_BITS:
        raise ValueError("an intermediate value is too large to check")
    return value


class ArithmeticVerifier(CachedReward):
    """Process reward: are the equations this step states true? (no model, no tokens)."""

    name = "arithmetic"
    kind = "process"

    def __init__(self, right: float = 0.95, wrong: float = 0.05, neutral: float = 0.5):
        super().__init__()
        for label, value in (("right", right), ("wrong", wrong), ("neutral", neutral)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"the arithmetic verifier's {label} score must be in [0, 1], got {value}")
        self.right, self.wrong, self.neutral = right, wrong, neutral

    def check(self, text: str) -> float:
        equations = find_equations(text)
        if not equations:
            return self.neutral
        return self.right if all(e.holds for e in equations) else self.wrong

    async def _score(self, requests: list[ScoreRequest]) -> Scores:
        # A process request is about its last step; a prefix request about all of it. The
        # checks run in a worker thread: the event loop keeps serving, and the reward's
        # timeout can fire.
        texts = [r.steps[-1] for r in requests]
        return Scores(await asyncio.to_thread(lambda: [self.check(t) for t in texts]))
