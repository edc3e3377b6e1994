"""Multiple-choice questions: lettered options read from the ways datasets write them, and
shown to the model under the question (MathQA and the generic loader share these)."""

from __future__ import annotations

import re

from meml.core.errors import DataError

CHOICE_FORMAT = 'End your reply with a sentence that starts with "The answer is" and gives the letter of the correct option.'


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
