"""Expressions (math-verify, where the plain-number reading does not fit): when the gold
answer is LaTeX that parse_number cannot read ("\\frac{\\sqrt{3}}{2}", "2^{10}"), or the
marked span holds LaTeX markup ("\\", "^", "{"), the span and the gold are compared by
math-verify: read by its LaTeX parser (never evaluated as Python), then symbolically or
numerically to 6 decimals. The marker and truncation rules of tasks/verifiers.py still
decide whether there is an answer at all.
"""

from __future__ import annotations

import logging
import re

LATEX_MARKUP_RE = re.compile(r"\\[a-zA-Z]|\^|\{")
MAX_EXPRESSION_CHARS = 120  # longer spans are not handed to the symbolic comparison


def _latex(text: str) -> list:
    """math-verify's reading of `text` as LaTeX ([] when it does not parse). Its LaTeX parser
    builds sympy expressions without evaluating text as Python; its other reader, which goes
    through sympy's parse_expr (eval), is never used on model output."""
    if len(text) > MAX_EXPRESSION_CHARS:
        return []
    try:
        from math_verify import LatexExtractionConfig, parse
    except ImportError:  # math-verify is a dependency; without it expressions are left out
        return []
    # our callers bound the input size instead of its signal-based timeouts, which only work
    # on the main thread; the notice that they are off is not news to the user
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        return parse(
            f"${text}$", extraction_config=[LatexExtractionConfig()], fallback_mode="no_fallback", parsing_timeout=None
        )
    except Exception:  # noqa: BLE001 - a verifier never raises on model text
        return []


def latex_parses(gold: str) -> bool:
    """A gold answer written in LaTeX that math-verify reads as a number or a closed
    expression ("\\frac{\\sqrt{3}}{2}", "2^{10}"); not words (they would read as symbols)."""
    if not LATEX_MARKUP_RE.search(gold):
        return False  # plain text that parse_number cannot read ("7 apples") stays unparseable
    parsed = _latex(gold)
    return bool(parsed) and not getattr(parsed[0], "free_symbols", {None})


def latex_equivalent(gold: str, answer: str) -> bool | None:
    r"""Whether two LaTeX answers are the same value or expression (math-verify: symbolic,
    then numeric to 6 decimals); None when either side does not parse.

    >>> latex_equivalent("2^{10}", "1024"), latex_equivalent(r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}")
    (True, False)
    """
    g, a = _latex(gold), _latex(answer)
    if not g or not a:
        return None
    try:
        from math_verify import verify

        return bool(verify(g, a, timeout_seconds=None))
    except Exception:  # noqa: BLE001
        return None
