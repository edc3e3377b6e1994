"""MathQA: multiple-choice math word problems (a JSON array of rows).

Each row has Problem, Rationale, options, correct (a letter a-e), annotated_formula,
linear_formula and category. `options` is "a ) 38 , b ) 27.675 , ..." or, in some rows,
a list-like string "['a ) 38', 'b ) 27.675', ...]"; both are read (never evaluated).
The question shown to the model is the problem followed by the options, one per line;
the gold answer is the letter, and the verifier accepts the letter or the option text.

Trace styles:
  prose      the Rationale without its surrounding quotes, with its mojibake repaired
             ("ã —" -> "×", "â ˆ š" -> "√") and its own closing "answer : c" dropped,
             ending "The answer is (c) 450."
  equations  annotated_formula as a chain of equations, one operation per line, with
             the values worked out ("100 + 31.1 = 131.1"), ending the same way
Columns for reward functions: options (letter -> text), category, annotated_formula,
linear_formula.

Splits: train, dev, test, challenge_test. The original train.json is not distributed with
this project's data; a directory without it serves "train" from dev.json (logged), which
is the documented setup: train on dev (4,475 rows), evaluate on test (2,985).
task.path: such a directory, one .json file, or a hub id (default "allenai/math_qa",
whose splits are train / validation / test; "dev" maps to validation).
"""

from __future__ import annotations

import itertools
import math
import re

from meml.core.config import TaskConfig
from meml.core.errors import DataError
from meml.core.types import Example
from meml.tasks.base import Task
from meml.tasks.choices import CHOICE_FORMAT, parse_options, render_options
from meml.tasks.generic import collect, make_verify, open_split, text_field

HUB_ID = "allenai/math_qa"
LETTERS = "abcde"
SPLIT_FILES = {"train": ("train", "dev"), "validation": ("dev",)}
HUB_SPLITS = {"dev": "validation"}

# ----------------------------------------------------------------------------- rationale text

# The distributed text was UTF-8 read as cp1252, then lower-cased and split into tokens:
# "×" (C3 97) became "ã —". A run of such characters is turned back into bytes and decoded,
# trying the upper-case lead byte ("ã" was "Ã") and, for "š" "œ" "ž", the capital's byte.
_CONTINUATION = (
    "\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
    "\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122"
)
_MOJIBAKE_RE = re.compile(rf"[\u00c0-\u00ff](?: ?[{_CONTINUATION}]){{1,3}}")
_LEAD_ALTERNATIVES = {
    0xE2: (0xE2, 0xC2),
    0xE3: (0xC3, 0xE3),
    0xEF: (0xEF, 0xCF),
    0xE5: (0xC5, 0xE5),
    0xF0: (0xF0, 0xD0),
}
_CONT_ALTERNATIVES = {0x9A: (0x9A, 0x8A), 0x9C: (0x9C, 0x8C), 0x9E: (0x9E, 0x8E)}
_PLAIN = {"−": "-", "–": "-", "∗": "*", "⁄": "/", "\ufffd": ""}
_OWN_ANSWER_RE = re.compile(
    r"[\s.,;]*(?:(?:so|hence|therefore|thus)\s*,?\s*)?(?:the\s+)?(?:correct\s+)?(?:answer|ans|option|choice)\s*"
    r"(?:is|will\s+be|should\s+be|would\s+be)?\s*[:=]?\s*(?:option\s*)?\(?\s*[a-e]\s*\)?\s*\.?\s*$"
)


def _cp1252_byte(ch: str) -> int | None:
    try:
        return ch.encode("cp1252")[0]
    except UnicodeEncodeError:
        return ord(ch) if 0x80 <= ord(ch) <= 0xFF else None


def _decode_run(match: re.Match) -> str:
    chars = match.group(0).replace(" ", "")
    codes = [_cp1252_byte(c) for c in chars]
    if None in codes:
        return match.group(0)
    choices = [_LEAD_ALTERNATIVES.get(codes[0], (codes[0],))] + [_CONT_ALTERNATIVES.get(b, (b,)) for b in codes[1:]]
    for n in range(len(codes), 1, -1):  # the longest prefix that decodes wins
        for combo in itertools.product(*choices[:n]):
            try:
                decoded = bytes(combo).decode("utf-8")
            except UnicodeDecodeError:
                continue
            rest = chars[n:]
            return _PLAIN.get(decoded, decoded) + (f" {rest}" if rest else "")
    return match.group(0)


def fix_mojibake(text: str) -> str:
    """Repair the cp1252-read UTF-8 in MathQA's text.

    >>> fix_mojibake("10 ã — 10 = 100 and â ˆ š 16 = 4")
    '10 × 10 = 100 and √ 16 = 4'
    """
    text = _MOJIBAKE_RE.sub(_decode_run, text)
    return re.sub(r"[\ue000-\uf8ff]", " ", text)  # symbol-font private-use characters


def clean_rationale(text: str) -> str:
    """The Rationale without its surrounding quotes, mojibake and closing answer letter."""
    text = text.strip()
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    text = fix_mojibake(text)
    text = _OWN_ANSWER_RE.sub("", text).strip()
    return " ".join(text.split())


# ----------------------------------------------------------------------------- formulas

# annotated_formula is nested calls over numbers and constants, e.g.
# "subtract(divide(multiply(add(const_100, 31.1), const_100), subtract(const_100, 5)), const_100)".
# It is parsed by hand (never evaluated as code) and written out one operation per line.
_TOKEN_RE = re.compile(r"\s*([A-Za-z_][\w.]*|-?\d+(?:\.\d+)?|[(),])")
_INFIX = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/", "power": "^"}
_FUNCTIONS = {  # only operations whose meaning is unambiguous are worked out
    "add": lambda a, b: a + b,
    "subtract": lambda a, b: a - b,
    "multiply": lambda a, b: a * b,
    "divide": lambda a, b: a / b,
    "power": lambda a, b: a**b if abs(b) <= 64 else None,
    "sqrt": lambda a: math.sqrt(a),
    "inverse": lambda a: 1 / a,
    "negate": lambda a: -a,
    "floor": lambda a: float(math.floor(a)),
    "reminder": lambda a, b: a % b,
    "factorial": lambda a: float(math.factorial(int(a))) if a == int(a) and 0 <= a <= 50 else None,
    "choose": lambda n, k: float(math.comb(int(n), int(k))),
    "permutation": lambda n, k: float(math.perm(int(n), int(k))),
    "gcd": lambda a, b: float(math.gcd(int(a), int(b))),
    "lcm": lambda a, b: float(math.lcm(int(a), int(b))),
    "max": max,
    "min": min,
    "negate_prob": lambda p: 1 - p,
    "speed": lambda d, t: d / t,
    "square_area": lambda a: a * a,
    "square_perimeter": lambda a: 4 * a,
    "square_edge_by_area": lambda a: math.sqrt(a),
    "rectangle_area": lambda a, b: a * b,
    "rectangle_perimeter": lambda a, b: 2 * (a + b),
    "circle_area": lambda r: math.pi * r * r,
    "circumface": lambda r: 2 * math.pi * r,
    "volume_cube": lambda a: a**3,
    "surface_cube": lambda a: 6 * a * a,
    "cube_edge_by_volume": lambda v: v ** (1 / 3),
    "volume_rectangular_prism": lambda a, b, c: a * b * c,
    "surface_sphere": lambda r: 4 * math.pi * r * r,
    "volume_sphere": lambda r: 4 / 3 * math.pi * r**3,
}


def _number_text(x: float) -> str | None:
    if not math.isfinite(x) or abs(x) >= 1e12:
        return None
    if abs(x - round(x)) < 1e-9 * max(1.0, abs(x)):
        return str(int(round(x)))
    return f"{x:.6g}" if abs(x) < 1e-3 else f"{x:.4f}".rstrip("0").rstrip(".")


def _constant(token: str) -> tuple[str, float] | None:
    if token == "const_pi":
        return "π", math.pi
    try:
        value = float(token.removeprefix("const_").replace("_", "."))
    except ValueError:
        return None
    return _number_text(value) or token, value


def formula_steps(formula: str) -> list[str]:
    """One line per operation of an annotated_formula; [] when it cannot be read.

    >>> formula_steps("divide(multiply(add(const_100, 31.1), const_100), const_2)")
    ['100 + 31.1 = 131.1', '131.1 * 100 = 13110', '13110 / 2 = 6555']
    """
    tokens = _TOKEN_RE.findall(formula)
    if not tokens or "".join(tokens) != re.sub(r"\s+", "", formula):
        return []
    steps: list[str] = []
    pos = 0

    def node() -> tuple[str, float | None]:  # (text to write, value or None)
        nonlocal pos
        token = tokens[pos]
        pos += 1
        if pos < len(tokens) and tokens[pos] == "(":
            pos += 1
            args = [node()]
            while tokens[pos] == ",":
                pos += 1
                args.append(node())
            if tokens[pos] != ")":
                raise ValueError(formula)
            pos += 1
            return _operation(token, args, steps)
        if token.startswith("const_"):
            constant = _constant(token)
            if constant is None:
                raise ValueError(token)
            return constant
        return token, float(token)

    try:
        node()
    except (ValueError, IndexError):
        return []
    return steps if pos == len(tokens) else []


def _operation(name: str, args: list[tuple[str, float | None]], steps: list[str]) -> tuple[str, float | None]:
    texts = [t for t, _ in args]
    expr = f" {_INFIX[name]} ".join(texts) if name in _INFIX and len(args) == 2 else f"{name}({', '.join(texts)})"
    value = None
    fn = _FUNCTIONS.get(name)
    if fn is not None and all(v is not None for _, v in args):
        try:
            value = fn(*[v for _, v in args])
        except (ArithmeticError, ValueError, TypeError):  # 1/0, sqrt(-1), wrong arity
            value = None
    text = _number_text(value) if isinstance(value, float | int) else None
    if text is None:
        label = f"r{len(steps) + 1}"
        steps.append(f"{label} = {expr}")
        return label, None
    steps.append(f"{expr} = {text}")
    return text, float(text)  # carry the written value on, so every line checks by hand


# ----------------------------------------------------------------------------- rows


def parse_row(row: dict, where: str, split: str, index: int) -> Example:
    problem = text_field(row, "Problem", where)
    options_text = text_field(row, "options", where)
    correct = text_field(row, "correct", where).lower().strip("() .")
    if correct not in LETTERS or len(correct) != 1:
        raise DataError(f"{where}: field 'correct' is '{row.get('correct')}', not a letter a-e")
    options = parse_options(options_text)  # {} leaves the gold unparseable: the verifier abstains
    ending = f"The answer is ({correct}) {options[correct]}." if options.get(correct) else f"The answer is ({correct})."
    rationales = {}
    rationale = row.get("Rationale")
    if isinstance(rationale, str) and clean_rationale(rationale):
        rationales["prose"] = f"{clean_rationale(rationale)}\n{ending}"
    steps = formula_steps(str(row.get("annotated_formula") or ""))
    if steps:
        rationales["equations"] = "\n".join(steps) + f"\n{ending}"
    columns = {
        "options": options,
        "category": row.get("category"),
        "annotated_formula": row.get("annotated_formula"),
        "linear_formula": row.get("linear_formula"),
    }
    question = render_options(" ".join(problem.split()), options) if options else f"{problem}\nOptions: {options_text}"
    return Example(
        id=f"mathqa-{split}-{index}", question=question, answer=correct, rationales=rationales, columns=columns
    )


def build(cfg: TaskConfig, lenient: bool) -> Task:
    if cfg.options:
        raise DataError(f"task.options: mathqa takes no options (got {sorted(cfg.options)})")
    skipped: dict[str, int] = {}

    def load(split: str) -> list[Example]:
        rows, where, name = open_split(
            cfg.path or HUB_ID, split, SPLIT_FILES, fmt="json" if cfg.path else None, hub_splits=HUB_SPLITS
        )
        examples, skipped[split] = collect(rows, lambda r, w, i: parse_row(r, w, name, i), cfg.skip_invalid, where)
        return examples

    return Task(
        "mathqa", load, make_verify("choice", lenient), CHOICE_FORMAT, styles=("prose", "equations"), skipped=skipped
    )
