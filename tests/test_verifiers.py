"""Verifier tables: hand-written completions, adversarial ones included, with the score
each must get. Strict mode unless a row says lenient."""

from __future__ import annotations

import doctest
import random
from fractions import Fraction

import pytest

from meml.tasks import verifiers
from meml.tasks.choices import option_value, verify_choice
from meml.tasks.verifiers import parse_number, parse_yes_no, verify_numeric, verify_text, verify_yes_no

# (completion, gold, expected score, expected extracted or None to skip the check)
NUMERIC = [
    # the plain forms
    ("The answer is 72.", "72", 1.0, "72"),
    ("So the answer is 72", "72", 1.0, "72"),
    ("Answer: 72", "72", 1.0, "72"),
    ("Final answer: 72 apples", "72", 1.0, "72"),
    ("The final answer is\n\n72", "72", 1.0, "72"),
    ("#### 72", "72", 1.0, "72"),
    ("**Answer:** 72", "72", 1.0, "72"),
    ("The answer is **72**.", "72", 1.0, "72"),
    ("The answer is 2**10.", "210", 0.0, None),  # a power, not bold text around "210"
    ("The answer would be 72.", "72", 1.0, "72"),
    # thousands separators, decimals, fractions, negatives
    ("The answer is 1,350.", "1350", 1.0, None),
    ("The answer is 1350.", "1,350", 1.0, None),
    ("The answer is 109,200,000 people.", "109200000", 1.0, None),
    ("The answer is 0.75.", "3/4", 1.0, None),
    ("The answer is 3/4 of the cake.", "0.75", 1.0, None),
    ("The answer is 3 / 4", "0.75", 1.0, None),
    ("The answer is 2.50", "2.5", 1.0, None),
    ("The answer is .5", "0.5", 1.0, None),
    ("The answer is -2.", "-2", 1.0, None),
    ("The answer is − 2", "-2", 1.0, None),
    ("The answer is -2", "2", 0.0, None),
    # units and currency signs
    ("The answer is $1,234.50.", "1234.5", 1.0, None),
    ("The answer is €15 per ticket.", "15", 1.0, None),
    ("The answer is -$5.", "-5", 1.0, None),
    ("The answer is $-5.", "-5", 1.0, None),
    ("The answer is 40%.", "40", 1.0, None),
    ("The answer is 3.5 hours.", "3.5", 1.0, None),
    ("answer: rs. 500", "500", 1.0, "500"),
    # LaTeX
    ("The area is \\boxed{72}.", "72", 1.0, "72"),
    ("So $\\boxed{\\frac{3}{4}}$", "0.75", 1.0, None),
    ("\\boxed{-\\frac{1}{2}}", "-1/2", 1.0, None),
    ("The answer is $\\boxed{1{,}000}$.", "1000", 1.0, None),
    ("\\boxed{\\$18}", "18", 1.0, None),
    ("\\boxed{12\\text{ apples}}", "12", 1.0, None),
    # several numbers: the last marker, then the number it states
    ("The answer is 48 + 24 = 72.", "72", 1.0, "72"),
    ("The answer is x = 5.", "5", 1.0, "5"),
    ("The answer is 12, since 3 + 9 = 12 and 2 = 2.", "12", 1.0, "12"),
    ("The answer is 7. Wait, the answer is 8.", "8", 1.0, "8"),
    ("The answer is 7. Wait, the answer is 8.", "7", 0.0, "8"),
    ("The answer is 8. The answer is 8.", "8", 1.0, "8"),
    ("Answer: 7\n\\boxed{9}", "9", 1.0, "9"),
    ("\\boxed{9}\nThe answer is 7.", "7", 1.0, "7"),
    ("10-3=7. The answer is 7", "7", 1.0, "7"),
    # trailing text after the answer
    ("The answer is 17. I hope this helps! Let me know if 18 was meant.", "17", 1.0, "17"),
    ("The answer is 17 pens, not 18.", "17", 1.0, "17"),
    # missing marker, a marker without a number, truncation
    ("3 + 4 = 7", "7", 0.0, None),
    ("I think it is 7.", "7", 0.0, None),
    ("The answer is seven.", "7", 0.0, None),
    ("The answer is x2.", "2", 0.0, None),
    ("The answer", "7", 0.0, None),
    ("", "7", 0.0, None),
    # a number inside a word or version is not one
    ("The answer is v3", "3", 0.0, None),
    ("The answer isn't 5.", "5", 0.0, None),
    ("The answered total was 5.", "5", 0.0, None),
]
NUMERIC_LENIENT = [
    ("3 + 4 = 7", "7", 1.0, "7"),
    ("I think it is 7.", "7", 1.0, None),
    ("No numbers at all", "7", 0.0, None),
    ("It could be 7 or 8", "7", 0.0, "8"),
    ("The answer is 6. Then 7", "7", 0.0, "6"),  # a marked answer wins over the fallback
]


@pytest.mark.parametrize(("completion", "gold", "score", "extracted"), NUMERIC)
def test_numeric(completion, gold, score, extracted):
    verdict = verify_numeric(completion, gold)
    assert verdict.score == score, verdict
    if extracted is not None:
        assert verdict.extracted == extracted


@pytest.mark.parametrize(("completion", "gold", "score", "extracted"), NUMERIC_LENIENT)
def test_numeric_lenient(completion, gold, score, extracted):
    verdict = verify_numeric(completion, gold, lenient=True)
    assert verdict.score == score, verdict
    if extracted is not None:
        assert verdict.extracted == extracted


def test_numeric_truncated_scores_zero_even_when_right():
    verdict = verify_numeric("The answer is 7.", "7", finished=False)
    assert verdict.score == 0.0 and verdict.breakdown["reason"] == "truncated"


@pytest.mark.parametrize("gold", ["seven", "", "7 apples", "1/0", "N/A", "1,23"])
def test_numeric_abstains_on_unparseable_gold(gold):
    verdict = verify_numeric("The answer is 7.", gold)
    assert verdict.score is None and verdict.breakdown["reason"] == "gold_unparseable"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("72", 72),
        ("1,350", 1350),
        ("-2", -2),
        ("+3", 3),
        ("0.75", Fraction(3, 4)),
        ("3/4", Fraction(3, 4)),
        ("$5.", 5),
        ("40%", 40),
        ("\\frac{1}{2}", Fraction(1, 2)),
        ("− 4", -4),
        ("5 apples", None),
        ("1.2.3", None),
        ("9" * 5000, None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


OPTIONS = {"a": "38", "b": "27.675", "c": "30", "d": "data inadequate", "e": "none of these"}
UNITS = {"a": "rs . 10", "b": "rs . 12", "c": "4 π", "d": "4", "e": "2 : 3"}
CHOICE = [
    # the letter in its usual phrasings
    ("The answer is (b).", "b", OPTIONS, 1.0, "b"),
    ("The answer is b", "b", OPTIONS, 1.0, "b"),
    ("The answer is B.", "b", OPTIONS, 1.0, "b"),
    ("The answer is b)", "b", OPTIONS, 1.0, "b"),
    ("The answer is B) 27.675", "b", OPTIONS, 1.0, "b"),
    ("The answer is B. 27.675", "b", OPTIONS, 1.0, "b"),
    ("The answer is option b.", "b", OPTIONS, 1.0, "b"),
    ("The answer is choice (B)", "b", OPTIONS, 1.0, "b"),
    ("Answer: [b]", "b", OPTIONS, 1.0, "b"),
    ("Answer: b:", "b", OPTIONS, 1.0, "b"),
    ("The correct answer is (b) 27.675.", "b", OPTIONS, 1.0, "b"),
    ("The answer is: **B**", "b", OPTIONS, 1.0, "b"),
    ("\\boxed{B}", "b", OPTIONS, 1.0, "b"),
    ("The answer is b, because 27.675 fits.", "b", OPTIONS, 1.0, "b"),
    ("The answer is clearly b", "b", OPTIONS, 1.0, "b"),
    ("The answer is A.", "a", OPTIONS, 1.0, "a"),
    ("The answer is: a) 38", "a", OPTIONS, 1.0, "a"),
    ("The answer is (c).", "b", OPTIONS, 0.0, "c"),
    # the option text or value itself
    ("The answer is 27.675.", "b", OPTIONS, 1.0, "b"),
    ("The answer is 38 %.", "a", OPTIONS, 1.0, "a"),
    ("The answer is data inadequate.", "d", OPTIONS, 1.0, "d"),
    ("The answer is none of these", "e", OPTIONS, 1.0, "e"),
    ("The answer is 30", "b", OPTIONS, 0.0, "c"),
    ("The answer is 12 rupees", "b", UNITS, 1.0, "b"),
    ("The answer is rs. 10", "a", UNITS, 1.0, "a"),
    ("The answer is 4 π", "c", UNITS, 1.0, "c"),
    ("The answer is 2 : 3", "e", UNITS, 1.0, "e"),
    ("The answer is 4", "d", UNITS, 1.0, "d"),
    # several letters: the last marker, then the first letter after it
    ("I first thought (a). Final answer: (d)", "d", OPTIONS, 1.0, "d"),
    ("The answer is (b), not (c).", "b", OPTIONS, 1.0, "b"),
    ("The answer is 38 (a)", "a", OPTIONS, 1.0, "a"),
    ("The answer is (a). The answer is (a).", "a", OPTIONS, 1.0, "a"),
    # a letter inside a word, or an article, is not an answer
    ("The answer is because of the rule", "b", OPTIONS, 0.0, None),
    ("The answer is a lot of work", "a", OPTIONS, 0.0, None),
    ("The answer is decided e.g. by voting", "e", OPTIONS, 0.0, None),
    ("The answer is bad", "b", OPTIONS, 0.0, None),
    ("The answer is abcde", "a", OPTIONS, 0.0, None),
    # missing marker, trailing text, duplicated options
    ("(b) looks right", "b", OPTIONS, 0.0, None),
    ("B", "b", OPTIONS, 0.0, None),
    ("The answer is 16", "a", {"a": "16", "b": "4", "c": "16"}, 0.0, None),
    ("The answer is 99", "a", OPTIONS, 0.0, None),
    ("The answer is (f)", "a", OPTIONS, 0.0, None),
]
CHOICE_LENIENT = [
    ("(b) looks right", "b", 1.0, "b"),
    ("I choose option c, or maybe (b)", "b", 1.0, "b"),
    ("The best is b) because", "b", 1.0, "b"),
    ("a bad idea", "a", 0.0, None),  # a bare "a" is an article, not a written option
    ("The answer is (c). (b) was tempting", "c", 1.0, "c"),
]


@pytest.mark.parametrize(("completion", "gold", "options", "score", "extracted"), CHOICE)
def test_choice(completion, gold, options, score, extracted):
    verdict = verify_choice(completion, gold, options)
    assert verdict.score == score, verdict
    if extracted is not None:
        assert verdict.extracted == extracted


@pytest.mark.parametrize(("completion", "gold", "score", "extracted"), CHOICE_LENIENT)
def test_choice_lenient(completion, gold, score, extracted):
    verdict = verify_choice(completion, gold, OPTIONS, lenient=True)
    assert verdict.score == score, verdict
    if extracted is not None:
        assert verdict.extracted == extracted


@pytest.mark.parametrize(("gold", "options"), [("f", OPTIONS), ("", OPTIONS), ("a", {})])
def test_choice_abstains_on_unparseable_gold(gold, options):
    assert verify_choice("The answer is (a).", gold, options).score is None


def test_choice_truncated_and_gold_forms():
    assert verify_choice("The answer is (b).", "b", OPTIONS, finished=False).score == 0.0
    assert verify_choice("The answer is (b).", "(B)", OPTIONS).score == 1.0


@pytest.mark.parametrize(
    ("text", "value"),
    [("rs . 9000", 9000), ("1.25 kg", Fraction(5, 4)), ("10 %", 10), ("4 π", None), ("2 : 3", None), ("2 a + 5", None)],
)
def test_option_value(text, value):
    assert option_value(text) == value


YES_NO = [
    ("The answer is yes.", True, 1.0, "yes"),
    ("The answer is Yes", True, 1.0, "yes"),
    ("The answer is YES!", True, 1.0, "yes"),
    ("So the answer is no.", False, 1.0, "no"),
    ("Answer: no", False, 1.0, "no"),
    ("The answer is: No, because fish swim.", False, 1.0, "no"),
    ("The final answer is yes", "yes", 1.0, "yes"),
    ("The answer is true.", True, 1.0, "yes"),
    ("The answer is false.", False, 1.0, "no"),
    ("The answer is not true.", False, 1.0, "no"),
    ("The answer is not false.", True, 1.0, "yes"),
    ("**Answer:** Yes", True, 1.0, "yes"),
    ("\\boxed{no}", False, 1.0, "no"),
    ("The answer is 'yes'.", True, 1.0, "yes"),
    ("The answer is yes.", False, 0.0, "yes"),
    ("The answer is no.", True, 0.0, "no"),
    ("The answer is no.", "True", 0.0, "no"),
    ("The answer is yes.", "yes", 1.0, "yes"),
    ("The answer is no.", "No", 1.0, "no"),
    ("The answer is yes.", "true", 1.0, "yes"),
    # several answers: the last marker wins, then the first word after it
    ("At first the answer is yes. On reflection the answer is no.", False, 1.0, "no"),
    ("Yes, they can. The answer is no.", False, 1.0, "no"),
    ("The answer is no. Yes, I am sure.", False, 1.0, "no"),
    ("The answer is yes. The answer is yes.", True, 1.0, "yes"),
    ("The answer is yes, no doubt.", True, 1.0, "yes"),
    # copied placeholders and hedges
    ("The answer is yes or no.", True, 0.0, None),
    ("The answer is yes/no", False, 0.0, None),
    ("The answer is true or false", True, 0.0, None),
    # yes/no inside other words is not an answer
    ("The answer is nope.", False, 0.0, None),
    ("The answer is known.", False, 0.0, None),
    ("The answer is nothing here.", False, 0.0, None),
    ("The answer is yesterday's news.", True, 0.0, None),
    ("The answer is none of them", False, 0.0, None),
    ("The answer is unknowable", False, 0.0, None),
    # no marker
    ("Yes.", True, 0.0, None),
    ("No, it cannot.", False, 0.0, None),
    ("I would say yes", True, 0.0, None),
    ("", True, 0.0, None),
    # the yes/no must come in the answer's own sentence
    ("The answer is unclear. Yes, probably.", True, 0.0, None),
    ("The answer is obvious.\nNo.", False, 0.0, None),
]
YES_NO_LENIENT = [
    ("Yes.", True, 1.0, "yes"),
    ("No, it cannot. Ice floats.", False, 1.0, "no"),
    ("I thought no, but yes", True, 1.0, "yes"),
    ("It is not true", False, 1.0, "no"),
    ("Nothing to say", True, 0.0, None),
]


@pytest.mark.parametrize(("completion", "gold", "score", "extracted"), YES_NO)
def test_yes_no(completion, gold, score, extracted):
    verdict = verify_yes_no(completion, gold)
    assert verdict.score == score, verdict
    if extracted is not None:
        assert verdict.extracted == extracted


@pytest.mark.parametrize(("completion", "gold", "score", "extracted"), YES_NO_LENIENT)
def test_yes_no_lenient(completion, gold, score, extracted):
    verdict = verify_yes_no(completion, gold, lenient=True)
    assert verdict.score == score, verdict
    if extracted is not None:
        assert verdict.extracted == extracted


@pytest.mark.parametrize("gold", ["maybe", None, "", 1])
def test_yes_no_abstains_on_unparseable_gold(gold):
    assert verify_yes_no("The answer is yes.", gold).score is None


def test_yes_no_truncated_and_parse():
    assert verify_yes_no("The answer is yes.", True, finished=False).score == 0.0
    assert [parse_yes_no(v) for v in (True, False, "TRUE", "no.", "perhaps")] == ["yes", "no", "yes", "no", None]


TEXT = [
    ("The answer is Paris.", "Paris", 1.0),
    ("The answer is paris", "Paris", 1.0),
    ("Answer:   New   York", "new york", 1.0),
    ('The answer is "Paris".', "Paris", 1.0),
    ("The answer is Paris, France.", "Paris", 0.0),
    ("The answer is London.", "Paris", 0.0),
    ("Paris", "Paris", 0.0),
    ("The answer is", "Paris", 0.0),
    ("\\boxed{[1, 2, 3]}", "[1, 2, 3]", 1.0),
]


@pytest.mark.parametrize(("completion", "gold", "score"), TEXT)
def test_text(completion, gold, score):
    assert verify_text(completion, gold).score == score


def test_text_lenient_and_abstain():
    assert verify_text("Thinking...\nParis", "Paris", lenient=True).score == 1.0
    assert verify_text("The answer is Paris.", "  ").score is None


def test_doctests():
    result = doctest.testmod(verifiers)
    assert result.attempted > 5 and result.failed == 0


def test_verifiers_never_raise_on_random_text():
    rng = random.Random(0)
    alphabet = list("0123456789abcdexyz ,./-+=$%(){}[]\\#*:\n") + [
        "answer is",
        "\\boxed{",
        "\\frac{",
        "yes",
        "no",
        "option",
    ]
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        for lenient in (False, True):
            for verdict in (
                verify_numeric(text, "7", lenient=lenient),
                verify_choice(text, "b", OPTIONS, lenient=lenient),
                verify_yes_no(text, True, lenient=lenient),
                verify_text(text, "x", lenient=lenient),
            ):
                assert verdict.score in (0.0, 1.0)


# ----------------------------------------------------------------------------- scientific notation, expressions


@pytest.mark.parametrize(
    ("completion", "gold", "score"),
    [
        ("#### 1e3", "1", 0.0),  # read as 1000, not as 1
        ("#### 1e3", "1000", 1.0),
        ("The answer is 2.5E-3.", "0.0025", 1.0),
        ("The answer is 1e+2 apples.", "100", 1.0),
        ("The answer is 3eggs.", "3", 1.0),  # not an exponent: a letter follows
        ("The answer is 1e3.", "1e3", 1.0),  # a gold answer in scientific notation
    ],
)
def test_scientific_notation(completion, gold, score):
    assert verify_numeric(completion, gold).score == score


def test_parse_number_reads_exponents_but_not_huge_ones():
    assert parse_number("1e3") == 1000 and parse_number("-2.5e-1") == Fraction(-1, 4)
    assert parse_number("1e9999") is None  # exponents past 999 are not a number here (no 10^9999 integer is built)


@pytest.mark.parametrize(
    ("completion", "gold", "score"),
    [
        ("The answer is \\frac{\\sqrt{3}}{2}.", "\\frac{\\sqrt{3}}{2}", 1.0),  # a gold our number reader cannot read
        ("The answer is \\frac{\\sqrt{3}}{2}.", "\\frac{\\sqrt{2}}{2}", 0.0),
        ("The answer is 2^{10}.", "1024", 1.0),  # LaTeX in the answer: compared as a value
        ("The answer is 2^{10}.", "1000", 0.0),
        ("The answer is 0.866.", "\\frac{\\sqrt{3}}{2}", 0.0),  # 6 decimals are compared: 0.866 is not enough
        ("The answer is \\sqrt{2}", "\\sqrt{2}", 1.0),
    ],
)
def test_latex_answers_go_through_math_verify(completion, gold, score):
    assert verify_numeric(completion, gold).score == score


def test_latex_gold_still_needs_a_marker_and_a_finished_answer():
    assert verify_numeric("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}").score == 0.0  # no marker
    assert (
        verify_numeric("The answer is \\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", finished=False).breakdown["reason"]
        == "truncated"
    )


def test_model_text_is_never_evaluated(tmp_path):
    marker = tmp_path / "ran"
    hostile = f"The answer is __import__('pathlib').Path({str(marker)!r}).touch() \\frac{{1}}{{2}}."
    verify_numeric(hostile, "\\frac{1}{2}")
    verify_numeric(hostile, "0.5")
    assert not marker.exists()
