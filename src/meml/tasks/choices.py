"""Multiple-choice questions: lettered options read from the ways datasets write them, shown
to the model under the question (MathQA and the generic loader share these), and the
verifier that reads which option an answer names.

Options (verify_choice): in the span, the first option letter written as "(b)", "[b]",
"b)", "b.", "b:", "option b" / "choice b", or the span being the bare letter ("b", "B.",
"b, because"). A letter inside a word never counts ("because", "e.g."). Without a
letter, the option text itself: the span equal to one option's text ("4 π"), else the
span's number equal to exactly one option's number ("12 rupees" names "rs . 12"), else
the longest option text the span starts with. Options written alike are ambiguous and
score 0.
"""

from __future__ import annotations

import re
from fractions import Fraction

from meml.core.errors import DataError
from meml.core.types import Verdict
from meml.tasks.verifiers import (
    _NUMBER_RE,
    _judge,
    _no_answer,
    _number_in,
    answer_span,
    normalize,
    parse_number,
    strip_bold,
)

CHOICE_FORMAT = (
    'End your reply with a sentence that starts with "The answer is" and gives the letter of the correct option.'
)


def parse_options(text: str) -> dict[str, str]:
    """Letter -> option text from MathQA's option string; {} when the letters a-e are not
    all found in order.

    >>> parse_options("a ) 38 , b ) 27.675 , c ) 30 , d ) a ) 4 , e ) none")
    {'a': '38', 'b': '27.675', 'c': '30', 'd': '4', 'e': 'none'}
    >>> parse_options("['a ) 4', 'b ) 4 π', 'c ) 16', 'd ) 8 π', 'e ) 16']")["b"]
    '4 π'
    """
    s = text.strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    marks, pos = [], 0
    for letter in "abcde":
        m = re.compile(rf"(?:^|,)\s*['\"]?\s*{letter}\s*\)\s*").search(s, pos)
        if m is None:
            return {}
        marks.append((letter, m.start(), m.end()))
        pos = m.end()
    options = {}
    for i, (letter, _, end) in enumerate(marks):
        stop = marks[i + 1][1] if i + 1 < len(marks) else len(s)
        value = s[end:stop].strip().strip("'\"").strip()
        options[letter] = re.sub(r"^[a-e]\s*\)\s*", "", value)  # some rows repeat the letter: "a ) a ) 3"
    return options


def choices_of(value, where: str, key: str) -> dict[str, str]:
    """Options as letter -> text from a mapping, a list or an "a ) x , b ) y" string."""
    if isinstance(value, dict):
        options = {str(k).strip().strip("()").lower(): str(v).strip() for k, v in value.items()}
    elif isinstance(value, (list, tuple)):
        options = {chr(ord("a") + i): str(v).strip() for i, v in enumerate(value)}
    elif isinstance(value, str):
        options = parse_options(value)
    else:
        options = {}
    if not options or not all(len(k) == 1 and k.isalpha() for k in options):
        raise DataError(f"{where}: field '{key}' is not a set of lettered options")
    return options


def render_options(question: str, options: dict[str, str]) -> str:
    lines = "\n".join(f"{k}) {v}" for k, v in options.items())
    return f"{question}\nOptions:\n{lines}"


def _letter_patterns(letters: str, written_only: bool = False) -> list[re.Pattern]:
    """How an option letter is written. `written_only`: the forms that cannot be an
    English word ("a" is an article), for the lenient search through a whole completion."""
    k = f"[{letters}]"
    forms = [
        rf"\(\s*({k})\s*\)|\[\s*({k})\s*\]",  # (b) [b]
        rf"(?<![\w'])({k})\s*\)",  # b)
        rf"\b(?:option|choice)\s*\(?\s*({k})\b",  # option b, choice (b
    ]
    if not written_only:
        forms += [
            rf"(?<![\w'])({k})\s*[.:](?![A-Za-z0-9])",  # b. b: (not "e.g.")
            rf"^\s*({k})\s*(?:$|,|;|\s+(?:because|since|as)\b)",  # the span is the letter
            rf"(?:^|\s)({k})\s*$",  # the span ends with the letter
        ]
    return [re.compile(f, re.IGNORECASE) for f in forms]


def find_letter(text: str, letters: str, last: bool = False, written_only: bool = False) -> str | None:
    """The first (or last) option letter written in one of the accepted forms."""
    hits = [
        (m.start(), next(g for g in m.groups() if g))
        for pattern in _letter_patterns(letters, written_only)
        for m in pattern.finditer(text)
    ]
    if not hits:
        return None
    return (max(hits) if last else min(hits))[1].lower()


def _squash(text: str) -> str:
    return re.sub(r"[\s'\"]+", "", normalize(text).lower()).rstrip(".")


def option_value(text: str) -> Fraction | None:
    """An option's number: the whole text, or one number with only a unit or currency
    word around it ("1.25 kg", "rs . 9000", "10 %"); None for "4 π", "2 : 3", "2 a + 5"."""
    value = parse_number(text)
    if value is not None:
        return value
    numbers = _NUMBER_RE.findall(normalize(text))
    if len(numbers) != 1:
        return None
    rest = normalize(text).replace(numbers[0], " ", 1)
    return parse_number(numbers[0]) if re.fullmatch(r"[A-Za-z.%\s]*", rest) else None


def option_from_text(span: str, options: dict[str, str]) -> tuple[str | None, str]:
    """The option a span names by its text or value: (letter or None, reason)."""
    squashed = _squash(span)
    equal = [k for k, text in options.items() if _squash(text) == squashed]
    if len(equal) == 1:
        return equal[0], "option_text"
    number = _number_in(normalize(span))
    value = parse_number(number) if number else None
    if value is not None:
        same = [k for k, text in options.items() if option_value(text) == value]
        if len(same) == 1:
            return same[0], "option_value"
        if len(same) > 1:
            return None, "ambiguous_option_text"
    starts = [(len(_squash(t)), k) for k, t in options.items() if _squash(t) and squashed.startswith(_squash(t))]
    if not starts:
        return None, "no_option"
    best = max(n for n, _ in starts)
    winners = [k for n, k in starts if n == best]
    return (winners[0], "option_text") if len(winners) == 1 else (None, "ambiguous_option_text")


def verify_choice(
    completion: str, gold: str, options: dict[str, str], finished: bool = True, lenient: bool = False
) -> Verdict:
    """Score 1 when the marked answer names the gold option, by letter or by its text.

    >>> opts = {"a": "12", "b": "15", "c": "none of these"}
    >>> verify_choice("15 fits. The answer is (b).", "b", opts).score
    1.0
    >>> verify_choice("The answer is 15", "b", opts).extracted
    'b'
    >>> verify_choice("The answer is because of (a)", "b", opts).score
    0.0
    """
    letters = "".join(sorted(k for k in options if len(k) == 1 and k.isalpha()))
    gold_letter = str(gold).strip().strip("().").lower()
    if gold_letter not in options or not letters:
        return Verdict(None, None, {"reason": "gold_unparseable", "gold": gold})
    if not finished:
        return _no_answer("truncated")
    span, how = answer_span(completion)
    letter = None
    if span is not None:
        letter = find_letter(span, letters)
        if letter is None:
            letter, reason = option_from_text(span, options)
            how = reason if letter is None else f"{how}_{reason}"
    if letter is None and lenient:
        letter = find_letter(strip_bold(completion), letters, last=True, written_only=True)
        how = "last_option" if letter else how
    if letter is None:
        return _no_answer(how)
    return _judge(letter, letter == gold_letter, how)
