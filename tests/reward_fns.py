"""Reward functions used by tests through `reward.functions` import paths (TRL's contract)."""


def length_parity(prompts, completions, **columns):
    """1 for an even number of characters, else 0: a reward with spread on any model."""
    return [float(len(c) % 2 == 0) for c in completions]


def needs_answer_column(prompts, completions, answer, question_id, expert, **columns):
    return [0.5 if a else 0.0 for a in answer]


def raises_on_odd(prompts, completions, **columns):
    if any(len(c) % 2 for c in completions):
        raise RuntimeError("odd completion")
    return [1.0] * len(completions)


def sleeps(prompts, completions, **columns):
    import time

    time.sleep(5)
    return [1.0] * len(completions)


def returns_nan(prompts, completions, **columns):
    return [float("nan")] * len(completions)
