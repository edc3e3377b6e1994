"""Verifiers: pure functions (completion, gold) -> Verdict. They never raise on model text
and never evaluate it as code.

Numeric extraction rules (strict, the default):
  1. The answer is the first number after the LAST answer marker: "answer is", "answer:",
     "final answer", "####", or the content of the last `\\boxed{...}`.
  2. A completion with no marker scores 0 (reason "no_marker"); a completion cut off at
     the length limit scores 0 (reason "truncated"): a last-number fallback rewards long
     ramblings whose last number happens to match (measured in docs/ALGORITHM.md).
  3. Numbers may carry a sign, currency signs, thousands separators ("1,234"), decimals,
     a trailing "%" or unit word, or be fractions ("3/4", "\\frac{3}{4}"); they compare
     exactly as fractions.
With lenient=True, a completion without a marker falls back to its last number.
When the gold answer cannot be parsed the verifier abstains (score None).
"""

from __future__ import annotations

import re
from fractions import Fraction

from meml.types import Verdict

_NUMBER = r"[-+−]?\s*[$€£]?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|[-+−]?\s*\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?[\d.,]+)\s*\}\s*\{\s*([-+]?[\d.,]+)\s*\}")
_MARKER_RE = re.compile(r"answer\s*(?:is|:|=)|final answer|####", re.IGNORECASE)
_BOXED = "\\boxed{"


def parse_number(text: str) -> Fraction | None:
    """Parse one number written the usual ways; None when it is not a number.

    >>> parse_number("$1,234.50"), parse_number("-3/4"), parse_number("\\\\frac{1}{2}")
    (Fraction(2469, 2), Fraction(-3, 4), Fraction(1, 2))
    """
    text = text.strip()
    frac = _FRAC_RE.search(text)
    if frac:
        num, den = parse_number(frac.group(1)), parse_number(frac.group(2))
        return num / den if num is not None and den else None
    text = text.replace("−", "-").replace(" ", "")
    text = re.sub(r"[$€£]", "", text).rstrip("%").rstrip(".")
    if not text:
        return None
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            den_value = Fraction(den.replace(",", ""))
            return Fraction(num.replace(",", "")) / den_value if den_value else None
        if "," in text and not re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", text):
            return None
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _boxed_content(text: str) -> str | None:
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    i, depth = start + len(_BOXED), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _first_number(text: str) -> str | None:
    frac = _FRAC_RE.search(text)
    match = _NUMBER_RE.search(text)
    if frac and (not match or frac.start() <= match.start()):
        return frac.group(0)
    return match.group(0) if match else None


def extract_number(completion: str, lenient: bool = False) -> tuple[str | None, str]:
    """The answer string a completion commits to, and how it was found."""
    boxed = _boxed_content(completion)
    markers = list(_MARKER_RE.finditer(completion))
    boxed_at = completion.rfind(_BOXED)
    if boxed is not None and (not markers or boxed_at > markers[-1].start()):
        number = _first_number(boxed)
        if number is not None:
            return number, "boxed"
    if markers:
        tail = completion[markers[-1].end() :]
        number = _first_number(tail[:80])  # the number must follow the marker closely
        if number is not None:
            return number, "marker"
        return None, "marker_without_number"
    if lenient:
        numbers = _NUMBER_RE.findall(completion)
        if numbers:
            return numbers[-1], "last_number"
    return None, "no_marker"


def verify_numeric(completion: str, gold: str, finished: bool = True, lenient: bool = False) -> Verdict:
    """Score 1 when the marked answer equals the gold number.

    >>> verify_numeric("3 + 4 = 7. The answer is 7.", "7").score
    1.0
    >>> verify_numeric("The answer is 8", "7").score
    0.0
    """
    gold_value = parse_number(gold)
    if gold_value is None:
        return Verdict(None, None, {"reason": "gold_unparseable", "gold": gold})
    if not finished:
        return Verdict(0.0, None, {"reason": "truncated", "correct": 0.0})
    extracted, how = extract_number(completion, lenient=lenient)
    if extracted is None:
        return Verdict(0.0, None, {"reason": how, "correct": 0.0})
    value = parse_number(extracted)
    correct = float(value is not None and value == gold_value)
    return Verdict(correct, extracted, {"reason": how, "correct": correct})
