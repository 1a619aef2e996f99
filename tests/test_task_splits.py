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
