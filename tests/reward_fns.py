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


def sleeps_on_odd(prompts, completions, **columns):
    """Hangs (two minutes) on any odd-length completion, else 1.0: a timeout on some completions."""
    import time

    if any(len(c) % 2 for c in completions):
        time.sleep(120)
    return [1.0] * len(completions)


def sleeps_forever(prompts, completions, **columns):
    import time

    time.sleep(3600)
    return [1.0] * len(completions)


def one_short(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


def numpy_scalars(prompts, completions, **columns):
    import numpy as np

    return [np.float32(0.5), np.int64(1), True][: len(completions)]


def calls_sys_exit(prompts, completions, **columns):
    """Ends "the program" on every call: inside a reward function that is only a failure."""
    import sys

    sys.exit(0)


def raises_keyboard_interrupt(prompts, completions, **columns):
    raise KeyboardInterrupt


def raises_generator_exit(prompts, completions, **columns):
    raise GeneratorExit("closed")
