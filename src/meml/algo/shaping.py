"""Reward shaping by length: DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476).

A completion of L tokens, with at most L_max and a buffer of B tokens before the limit:

    penalty(L) = 0                          L <= L_max - B
                 -(L - (L_max - B)) / B     L_max - B < L <= L_max   (a ramp to -1)
                 -1                         L > L_max (cannot happen here: generation stops at L_max)

times a scale, added to the reward. A completion cut at the limit already scores 0 under
the default verifiers; the ramp also tells a long, still-finished answer that it is close.
"""

from __future__ import annotations


def overlong_penalty(length: int, max_new_tokens: int, buffer: int, scale: float = 1.0) -> float:
    """The penalty of a completion of `length` tokens (0 when buffer is 0: off).

    >>> [overlong_penalty(n, 100, 20) for n in (50, 80, 90, 100)]
    [0.0, 0.0, -0.5, -1.0]
    """
    if buffer <= 0:
        return 0.0
    start = max_new_tokens - buffer
    if length <= start:
        return 0.0
    return -scale * min(1.0, (length - start) / buffer)
