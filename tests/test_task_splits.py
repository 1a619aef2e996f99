"""The demo tasks' phrasing splits: disjoint, and evaluation splits never draw the wider training inputs."""

from __future__ import annotations

import random
import re

import pytest

from loramux.experts.tasks import SPLITS, TASKS, TASKS_BY_NAME


@pytest.mark.parametrize("task", TASKS, ids=lambda task: task.name)
def test_no_phrasing_is_in_two_splits(task):
    splits = [set(task.phrasings(split)) for split in SPLITS]
    for i, first in enumerate(splits):
        assert first, f"{task.name} has no {SPLITS[i]} phrasings"
        for second in splits[i + 1:]:
            assert not first & second


@pytest.mark.parametrize("split", ["heldout", "check"])
def test_an_evaluation_prompt_uses_its_own_split_and_the_narrow_inputs(split):
    task = TASKS_BY_NAME["uppercase"]
    rng = random.Random(3)
    for _ in range(200):
        prompt, answer = task.sample(rng, split)
        inputs = [match.group(1) for phrasing in task.phrasings(split)
                  if (match := re.fullmatch(re.escape(phrasing).replace(re.escape("{x}"), "(.+)"), prompt, re.S))]
        assert inputs and inputs[0].upper() == answer
        # narrow inputs: 3-7 words, no digits or punctuation added
        assert 3 <= len(answer.split()) <= 7 and not any(ch.isdigit() for ch in answer)


def test_training_draws_wider_inputs_too():
    task = TASKS_BY_NAME["uppercase"]
    rng = random.Random(3)
    lengths = {len(task.sample(rng, "train")[1].split()) for _ in range(400)}
    assert min(lengths) == 2 and max(lengths) > 7


def test_an_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        TASKS[0].sample(random.Random(0), "test")


def _wide_training_inputs(name: str, count: int = 600) -> list[str]:
    """The inputs of `count` training samples drawn from the wider range."""
    task = TASKS_BY_NAME[name]
    rng = random.Random(5)
    return [task.make_input(rng, True)[0] for _ in range(count)]


def test_wide_number_to_words_inputs_are_a_third_two_digit_numbers():
    # uniform draws over 0-999 made two-digit numbers a tenth of the data; the expert spelled them as hundreds
    two_digit = sum(10 <= int(text) <= 99 for text in _wide_training_inputs("number_to_words")) / 600
    assert 0.25 < two_digit < 0.42


def test_wide_add_numbers_inputs_carry_out_of_the_units_half_the_time_or_more():
    # the expert dropped the units carry ("66 and 44" -> 100); training must show it often
    pairs = [tuple(map(int, text.split(" and "))) for text in _wide_training_inputs("add_numbers")]
    carries = sum(a % 10 + b % 10 >= 10 for a, b in pairs) / len(pairs)
    assert carries > 0.55
    assert any(a < 10 for a, _ in pairs) and any(a > 99 for a, _ in pairs)
