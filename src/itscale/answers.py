"""Final answers: extract them from a solution and decide whether two are the same.

Extraction takes the last `\\boxed{...}` (braces may nest), else the last number in the text.
Equivalence tries, in order: plain numbers with a relative tolerance, normalised string
equality, then math-verify (symbolic, LaTeX-aware) under a timeout. math-verify's own
timeout uses SIGALRM, which only works in the main thread; elsewhere (a server's worker
threads) the check runs in a helper process that is killed when it overruns.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import re
import threading
from functools import lru_cache

DEFAULT_TIMEOUT_SECONDS = 5
RELATIVE_TOLERANCE = 1e-6

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# An explicit final answer: "#### 18", "(the) (final) answer is (:) $18", "Answer: 18".
_FINAL_LINE = re.compile(
    r"(?:####|\banswer\s*(?:is|:|=)|\banswer\s+is\s*:)\s*\**\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)",
    re.IGNORECASE,
)


def extract_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}`, or None."""
    result = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    result = text[start:i].strip()
                    break
    return result


def has_boxed_answer(text: str) -> bool:
    return extract_boxed(text) is not None


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The last `\\boxed{}` content, else (flexible, the default) the last number, or with
    `strict` only an explicit final-answer line ("The final answer is 18", "Answer: 18",
    "#### 18"); None when there is none. The two are lm-evaluation-harness's flexible-extract
    and strict-match: a last number is often a step's, not the answer the model gave."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed or None
    if strict:
        lines = _FINAL_LINE.findall(text)
        return _strip_number(lines[-1]) if lines else None
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return _strip_number(numbers[-1])


def _strip_number(token: str) -> str:
    token = token.replace(",", "")
    return token[:-1] if token.endswith(".") else token


def parse_number(text: str) -> float | None:
    """A plain number, tolerating `$`, thousands separators, `\\%`, `\\!` and a trailing
    unit word ("18 dollars"); None for anything else (fractions in LaTeX, expressions)."""
    cleaned = text.strip().replace("\\!", "").replace("\\,", "").replace("\\$", "").replace("$", "")
    cleaned = re.sub(r"\\(?:text|mathrm)\{[^{}]*\}", "", cleaned)
    cleaned = cleaned.replace("\\%", "").replace("%", "").strip()
    match = re.fullmatch(r"(-?[\d,]*\.?\d+)(?:/(\d+))?(?:\s*[a-zA-Z]+)?\.?", cleaned)
    if not match:
        return None
    try:
        value = float(match.group(1).replace(",", ""))
        if match.group(2):
            value /= float(match.group(2))
    except (ValueError, ZeroDivisionError):
        return None
    return value


def _normalise(text: str) -> str:
    text = text.strip().strip("$").strip()
    text = re.sub(r"\\(?:left|right|displaystyle)", "", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return re.sub(r"\s+", "", text).rstrip(".")


def is_equivalent(predicted: str | None, reference: str | None, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> bool:
    """Whether a predicted answer equals the reference. A missing answer is never right."""
    if predicted is None or reference is None or not predicted.strip():
        return False
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return abs(a - b) <= RELATIVE_TOLERANCE * max(1.0, abs(b))
    if _normalise(predicted) == _normalise(reference):
        return True
    return _math_verify(predicted, reference, timeout)


def _math_verify(predicted: str, reference: str, timeout: float) -> bool:
    if threading.current_thread() is threading.main_thread():
        return _math_verify_here(predicted, reference, max(1, round(timeout)))
    return _math_verify_in_helper(predicted, reference, timeout)


@lru_cache(maxsize=4096)
def _math_verify_here(predicted: str, reference: str, timeout_seconds: int | None) -> bool:
    from math_verify import parse, verify

    gold = parse(f"${reference}$", parsing_timeout=timeout_seconds)
    guess = parse(f"${predicted}$", parsing_timeout=timeout_seconds)
    if not gold or not guess:
        return False
    return bool(verify(gold, guess, timeout_seconds=timeout_seconds))


_helper: concurrent.futures.ProcessPoolExecutor | None = None
_helper_lock = threading.Lock()


def _math_verify_in_helper(predicted: str, reference: str, timeout: float) -> bool:
    """Runs math-verify in a helper process (its main thread has SIGALRM); a check that
    overruns counts as not equivalent and the helper is replaced."""
    global _helper
    with _helper_lock:
        if _helper is None:
            _helper = concurrent.futures.ProcessPoolExecutor(max_workers=1)
        helper = _helper
    future = helper.submit(_math_verify_here, predicted, reference, max(1, round(timeout)))
    try:
        return future.result(timeout=timeout + 10)
    except (concurrent.futures.TimeoutError, concurrent.futures.process.BrokenProcessPool):
        with _helper_lock:
            if _helper is helper:
                helper.shutdown(wait=False, cancel_futures=True)
                _helper = None
        return False


@atexit.register
def _close_helper() -> None:
    """Shut the helper down while the interpreter is whole: left to module teardown, its
    executor is collected after `multiprocessing` is gone and its callback prints an ignored
    AttributeError on exit."""
    global _helper
    with _helper_lock:
        helper, _helper = _helper, None
    if helper is not None:
        helper.shutdown(wait=True, cancel_futures=True)


def majority(answers: list[str | None], weights: list[float] | None = None) -> tuple[str | None, dict[str, float]]:
    """The answer with the largest total weight (count by default) and the totals per
    answer. Equivalent answers ("18", "18.0", "\\frac{1}{2}", "0.5") are pooled under the
    first spelling seen; a missing answer is no vote. Ties go to the first answer seen."""
    totals: dict[str, float] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        weight = 1.0 if weights is None else weights[i]
        key = next((k for k in totals if k == answer or is_equivalent(answer, k)), answer)
        totals[key] = totals.get(key, 0.0) + weight
    if not totals:
        return None, totals
    best = max(totals.values())
    return next(k for k, v in totals.items() if v == best), totals
