"""The two-task evaluation prompts: fixed by their seed, and each answer is the second task applied to the first's."""

from __future__ import annotations

import json
import random

from loadtest.two_task_prompts import TWO_TASK_KINDS, two_task_set
from loramux.experts.tasks import COUNTRY_CAPITALS, number_in_words


def test_the_set_is_fixed_by_its_seed_and_covers_every_kind():
    items = two_task_set(3, seed=7)
    assert items == two_task_set(3, seed=7) and items != two_task_set(3, seed=8)
    assert [kind for kind, _, _ in items] == [kind.name for kind in TWO_TASK_KINDS for _ in range(3)]


def test_answers_apply_both_tasks_in_order():
    rng = random.Random(0)
    for kind in TWO_TASK_KINDS:
        for _ in range(5):
            prompt, answer = kind.sample(rng)
            if kind.name == "uppercase+reverse_words":
                words = prompt.split(": ", 1)[1].split()
                assert answer == " ".join(reversed(words)).upper()
            elif kind.name == "add_numbers+number_to_words":
                a, b = (int(t) for t in prompt.replace(",", " ").split() if t.isdigit())
                assert answer == number_in_words(a + b)
            elif kind.name == "capital+uppercase":
                assert answer in {c.upper() for c in COUNTRY_CAPITALS.values()} and answer.isupper()
            elif kind.name == "json_extract+uppercase":
                record = json.loads(prompt[prompt.index("{"):prompt.index("}") + 1])
                assert answer == record[prompt.rsplit("Field: ", 1)[1]].upper()
            else:
                assert answer in ("POSITIVE", "NEGATIVE")
