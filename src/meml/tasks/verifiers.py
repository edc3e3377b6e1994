"""Verifiers: pure functions (completion, gold, finished, lenient) -> Verdict.

They never raise on model text and never evaluate it as code: answers are read with
regular expressions and compared as exact fractions, option letters or yes/no words.

Where the answer is read (all verifiers, strict mode, the default):
  1. The answer span follows the LAST answer marker: "answer is" (also "was", "would
     be", "will be", "should be"), "answer:", "answer =", "final answer", "####", or is
     the content of the last `\\boxed{...}` when that comes after the last marker.
     Markdown bold (`**`) is ignored, so "**Answer:** 7" is read like "Answer: 7".
  2. The span runs from the marker to the end of its sentence or line (at most 200
     characters); leading spaces, newlines and colons are skipped first.
  3. No marker: score 0 (reason "no_marker"). A completion cut off at the length limit
     (finished=False): score 0 (reason "truncated"). A last-number fallback rewards long
     ramblings whose last number happens to match (docs/ALGORITHM.md, what we measured).
  4. lenient=True: when the marked span yields nothing, fall back to the last number /
     last clearly written option letter / last yes-no word anywhere in the completion.
  5. When the gold answer cannot be parsed the verifier abstains: score None, reason
     "gold_unparseable"; callers count and report abstentions.

Numbers (verify_numeric): the span's number after its last "=" if it has one ("48 + 24 =
72"), else its first number. Numbers may carry a sign, a currency sign ($ € £ ¥ ₹), an
exponent ("1e3" is 1000, exponents up to 999),
thousands separators ("1,234", LaTeX "1{,}234"), decimals, a trailing "%" or unit word,
or be fractions ("3/4", "\\frac{3}{4}"); they compare exactly as fractions, so "0.50" ==
"1/2" == "\\frac{1}{2}". "50%" reads as 50 (the percent sign is dropped, not divided).
A digit inside a word ("x2", "v3") is not a number.

Expressions (math-verify, where the plain-number reading does not fit): tasks/expressions.py.

Options (verify_choice): tasks/choices.py.

Yes/no (verify_yes_no): the first "yes", "no", "true" or "false" in the span as a whole
word; "not true" reads as no and "not false" as yes; "yes or no" is ambiguous (score 0).
"""

from __future__ import annotations

import re
from fractions import Fraction

from meml.core.types import Verdict
from meml.tasks.expressions import LATEX_MARKUP_RE, latex_equivalent, latex_parses

ANSWER_MARKER_RE = re.compile(
    r"(?:\bfinal\s+answer|\banswer)\s*(?:(?:is|was|would\s+be|will\s+be|should\s+be)\b|:|=)|\bfinal\s+answer\b|####",
    re.IGNORECASE,
)
_BOXED = "\\boxed{"
_BOLD_RE = re.compile(r"(?<!\d)\*\*|\*\*(?!\d)")
# A sentence ends at a newline, at ! ? ; before a space, or at a full stop followed by the
# end, a newline or a capital ("rs. 500" and "B. 450" stay one sentence).
_SPAN_END_RE = re.compile(r"\n|[!?;](?=\s|$)|\.(?=\s*$|[ \t]+[A-Z(\[\"'])")
_CLAUSE_END_RE = re.compile(r",\s|\s(?:because|since|as|which|so)\s", re.IGNORECASE)
_CURRENCY = "$€£¥₹"
# A number: a minus sign only when it is not a binary minus ("10-3"), a currency sign,
# digits with optional thousands groups and decimals, an optional "/ denominator".
_NUMBER_RE = re.compile(
    rf"(?:(?<![\w)])-\s?)?(?:[{_CURRENCY}]\s?(?:-\s?)?)?(?<!\w)(?<!\d\.)"
    r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![A-Za-z])\.\d+)"
    r"(?:[eE][-+]?\d{1,3}(?![\w.]))?"  # scientific notation: 1e3, 2.5E-4 (exponents up to 999)
    r"(?:\s?/\s?\d+(?:\.\d+)?)?"
)
_PLAIN_NUMBER_RE = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d{1,3})?")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_TEXT_RE = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")


# ----------------------------------------------------------------------------- spans


def strip_bold(text: str) -> str:
    """Drop Markdown bold markers, but not a power written "2**10"."""
    return _BOLD_RE.sub("", text)


def normalize(text: str) -> str:
    """Undo the usual typesetting so one set of rules reads plain and LaTeX answers."""
    text = strip_bold(text).replace("−", "-").replace("\\$", "$").replace("\\%", "%")
    text = text.replace("{,}", ",").replace("\\,", "").replace("\\!", "")
    text = text.replace("\\left", "").replace("\\right", "")
    text = _LATEX_TEXT_RE.sub(r"\1", text)
    return _LATEX_FRAC_RE.sub(r"\1/\2", text)


def _boxed_content(text: str) -> tuple[str, int] | None:
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
                return text[i:j], start
    return None


def answer_span(completion: str) -> tuple[str | None, str]:
    """(span, how): the text a completion commits to as its answer and where it was
    found, "boxed" or "marker"; (None, "no_marker") without either."""
    text = strip_bold(completion)
    markers = list(ANSWER_MARKER_RE.finditer(text))
    boxed = _boxed_content(text)
    if boxed is not None and (not markers or boxed[1] > markers[-1].start()):
        return boxed[0].strip(), "boxed"
    if not markers:
        return None, "no_marker"
    tail = text[markers[-1].end() :].lstrip(" \t\r\n:")[:200]
    end = _SPAN_END_RE.search(tail)
    return (tail[: end.start()] if end else tail).strip(), "marker"


def _no_answer(how: str) -> Verdict:
    return Verdict(0.0, None, {"reason": how, "correct": 0.0})


def _judge(extracted: str | None, correct: bool, how: str) -> Verdict:
    score = float(correct)
    return Verdict(score, extracted, {"reason": how, "correct": score})


# ----------------------------------------------------------------------------- numbers


def parse_number(text: str) -> Fraction | None:
    """Parse one number written the usual ways; None when it is not exactly a number.

    >>> parse_number("$1,234.50"), parse_number("-3/4"), parse_number("\\\\frac{1}{2}")
    (Fraction(2469, 2), Fraction(-3, 4), Fraction(1, 2))
    >>> parse_number("12 apples") is None
    True
    """
    text = normalize(str(text)).strip()
    text = re.sub(rf"[{_CURRENCY}\s]", "", text).rstrip(".").rstrip("%")
    parts = text.split("/")
    if len(parts) > 2 or not all(_PLAIN_NUMBER_RE.fullmatch(p) for p in parts):
        return None
    try:  # Python refuses to parse integers of more than 4,300 digits: not an answer
        values = [Fraction(p.replace(",", "")) for p in parts]
    except ValueError:
        return None
    if len(values) == 2:
        return values[0] / values[1] if values[1] else None
    return values[0]


def _number_in(span: str) -> str | None:
    """The number a span states: in its first clause, the number after the last "="
    when one follows ("48 + 24 = 72, so" -> 72), else the first number."""
    cut = _CLAUSE_END_RE.search(span)
    clause = span[: cut.start()] if cut else span
    if "=" in clause:
        after = _NUMBER_RE.search(clause.rsplit("=", 1)[1])
        if after:
            return after.group(0)
    first = _NUMBER_RE.search(span)
    return first.group(0) if first else None


def extract_number(completion: str, lenient: bool = False) -> tuple[str | None, str]:
    """The answer string a completion commits to, and how it was found."""
    span, how = answer_span(completion)
    number = _number_in(normalize(span)) if span is not None else None
    if number is None and how == "marker":
        how = "marker_without_number"
    if number is None and lenient:
        numbers = _NUMBER_RE.findall(normalize(completion))
        if numbers:
            return numbers[-1].strip(), "last_number"
    return (number.strip() if number else None), how


def verify_numeric(completion: str, gold: str, finished: bool = True, lenient: bool = False) -> Verdict:
    """Score 1 when the marked answer equals the gold number.

    >>> verify_numeric("3 + 4 = 7. The answer is 7.", "7").score
    1.0
    >>> verify_numeric("The answer is 8", "7").score
    0.0
    >>> verify_numeric("The answer is 7", "seven").breakdown["reason"]
    'gold_unparseable'
    """
    gold_value = parse_number(gold)
    if gold_value is None and not latex_parses(gold):
        return Verdict(None, None, {"reason": "gold_unparseable", "gold": gold})
    if not finished:
        return _no_answer("truncated")
    span, _ = answer_span(completion)
    if span is not None and (gold_value is None or LATEX_MARKUP_RE.search(span)):
        # an expression, not a plain number, on either side: math-verify compares them
        expression = span.rstrip(". ")
        same = latex_equivalent(gold, expression)
        if same is not None:
            return _judge(expression, same, "latex")
    if gold_value is None:
        return _no_answer("no_expression")
    extracted, how = extract_number(completion, lenient=lenient)
    if extracted is None:
        return _no_answer(how)
    return _judge(extracted, parse_number(extracted) == gold_value, how)


# ----------------------------------------------------------------------------- yes / no

_YES_NO_RE = re.compile(r"\b(not\s+)?(yes|no|true|false)\b", re.IGNORECASE)
_BOTH_RE = re.compile(r"\b(?:yes\s*(?:or|/)\s*no|no\s*(?:or|/)\s*yes|true\s*(?:or|/)\s*false)\b", re.IGNORECASE)


def parse_yes_no(value) -> str | None:
    """ "yes" / "no" from a bool or a yes/no/true/false word; None otherwise.

    >>> parse_yes_no(True), parse_yes_no(" No."), parse_yes_no("maybe")
    ('yes', 'no', None)
    """
    if isinstance(value, bool):
        return "yes" if value else "no"
    word = str(value).strip().strip(".!").lower()
    return {"yes": "yes", "true": "yes", "no": "no", "false": "no"}.get(word)


def _yes_no_word(match: re.Match) -> str:
    positive = match.group(2).lower() in ("yes", "true")
    return "yes" if positive != bool(match.group(1)) else "no"


def verify_yes_no(completion: str, gold, finished: bool = True, lenient: bool = False) -> Verdict:
    """Score 1 when the marked answer says the gold yes/no.

    >>> verify_yes_no("Sharks are fish. The answer is no.", False).score
    1.0
    >>> verify_yes_no("The answer is yes or no.", True).breakdown["reason"]
    'ambiguous'
    """
    gold_word = parse_yes_no(gold)
    if gold_word is None:
        return Verdict(None, None, {"reason": "gold_unparseable", "gold": gold})
    if not finished:
        return _no_answer("truncated")
    span, how = answer_span(completion)
    if span is not None and _BOTH_RE.search(span):
        return _no_answer("ambiguous")
    match = _YES_NO_RE.search(span) if span is not None else None
    if match is None and how == "marker":
        how = "marker_without_yes_no"
    if match is None and lenient:
        found = list(_YES_NO_RE.finditer(completion))
        match, how = (found[-1], "last_yes_no") if found else (None, how)
    if match is None:
        return _no_answer(how)
    word = _yes_no_word(match)
    return _judge(word, word == gold_word, how)


# ----------------------------------------------------------------------------- free text


def _text_key(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s%./-]", " ", normalize(text).lower()).split()).rstrip(".")


def verify_text(completion: str, gold: str, finished: bool = True, lenient: bool = False) -> Verdict:
    """Score 1 when the marked answer equals the gold text, ignoring case, punctuation
    around words and extra spaces. For users' data whose answers are words, not numbers.

    >>> verify_text("The answer is Paris.", "paris").score
    1.0
    """
    if not _text_key(str(gold)):
        return Verdict(None, None, {"reason": "gold_unparseable", "gold": gold})
    if not finished:
        return _no_answer("truncated")
    span, how = answer_span(completion)
    if not span and lenient:
        lines = [line for line in completion.strip().splitlines() if line.strip()]
        span, how = (lines[-1], "last_line") if lines else (None, how)
    if not span:
        return _no_answer(how if span is None else "marker_without_answer")
    return _judge(span, _text_key(span) == _text_key(str(gold)), how)
