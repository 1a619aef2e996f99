"""Two-task prompts for the router evaluation: one instruction asks for two demo tasks in a row.

No single demo expert can be exact on them ("upper-case this, then reverse
the word order: ..." needs both), so they show what mixing or composing
experts buys. Inputs come from the tasks' own generators
(loramux/experts/tasks.py) and the second task is applied to the first one's
exact answer; with a fixed seed the set is always the same.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from loramux.experts.tasks import TASKS_BY_NAME, number_in_words


def _reverse(text: str) -> str:
    return " ".join(reversed(text.split()))


@dataclass(frozen=True)
class TwoTaskKind:
    """Task `first`, then `then` on its answer; phrasings are templates with an `{x}` for the first task's input."""

    first: str
    then: str
    follow: Callable[[str], str]  # the second task applied to the first one's answer
    phrasings: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.first}+{self.then}"

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """(prompt, exact answer)."""
        text, answer = TASKS_BY_NAME[self.first].make_input(rng)
        return rng.choice(self.phrasings).format(x=text), self.follow(answer)


TWO_TASK_KINDS: tuple[TwoTaskKind, ...] = (
    TwoTaskKind("uppercase", "reverse_words", _reverse, (
        "Upper-case this, then reverse the word order: {x}",
        "Write these words in capital letters and in the opposite order: {x}",
        "Put the following in upper case, then say the words backwards: {x}",
    )),
    TwoTaskKind("add_numbers", "number_to_words", lambda total: number_in_words(int(total)), (
        "Add {x}, then write the sum in words.",
        "What do {x} make together? Spell the answer out in letters.",
        "Sum {x} and give the result written as English words.",
    )),
    TwoTaskKind("capital", "uppercase", str.upper, (
        "What is the capital of {x}? Answer in capital letters only.",
        "Name the capital city of {x}, written in upper case.",
        "Give {x}'s capital in all caps.",
    )),
    TwoTaskKind("json_extract", "uppercase", str.upper, (
        "Take the named field from this object and write its value in upper case: {x}",
        "Read the field out of the JSON and answer in capital letters: {x}",
        "Extract the value of the field, then upper-case it: {x}",
    )),
    TwoTaskKind("sentiment", "uppercase", str.upper, (
        "Is this review positive or negative? Answer in capital letters: {x}",
        "Give the sentiment of the text in upper case: {x}",
        "Say whether the writer was positive or negative, in all caps: {x}",
    )),
)


def two_task_set(per_kind: int, seed: int) -> list[tuple[str, str, str]]:
    """(kind name, prompt, exact answer), `per_kind` of every kind, the same for the same seed."""
    rng = random.Random(seed)
    return [(kind.name, *kind.sample(rng)) for kind in TWO_TASK_KINDS for _ in range(per_kind)]
