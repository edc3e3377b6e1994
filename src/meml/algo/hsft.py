"""The hard-example SFT buffer (HSFT).

When an expert gets more than K of its G answers to a question wrong, the question's gold
solution, under that expert's prompt, is pushed with probability p (K/G by default, as in
the paper). When the buffer holds B items, the trainer adds an SFT term on them to that
step's loss and empties the buffer. The buffer is part of the checkpoint.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class HardExample:
    question_id: str
    expert: int
    prompt_ids: list[int]
    response_ids: list[int]  # the gold solution, ending with the end-of-turn token


def push_probability(max_wrong: int, group_size: int, push_prob: float | None) -> float:
    return max_wrong / group_size if push_prob is None else push_prob


def should_push(num_wrong: int, group_size: int, max_wrong: int, push_prob: float | None, rng: random.Random) -> bool:
    """Trigger on more than K wrong of G, then push with probability p.

    The RNG is drawn only when the trigger fires, so the sequence of draws (and thus a
    resumed run) depends only on which groups triggered.
    """
    if num_wrong <= max_wrong:
        return False
    return rng.random() < push_probability(max_wrong, group_size, push_prob)


class HardExampleBuffer:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: list[HardExample] = []
        self.flushes = 0

    def __len__(self) -> int:
        return len(self.items)

    def push(self, item: HardExample) -> None:
        self.items.append(item)

    def ready(self) -> bool:
        return len(self.items) >= self.capacity

    def flush(self) -> list[HardExample]:
        items, self.items = self.items, []
        self.flushes += 1
        return items

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "flushes": self.flushes, "items": [asdict(i) for i in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self.flushes = state["flushes"]
        self.items = [HardExample(**i) for i in state["items"]]
