"""Incremental detokenization with the bundled SmolLM2 (byte-level BPE) tokenizer: the streamed deltas
join to exactly the full decode, characters split over tokens are never sent half, stop strings across
token boundaries never leak, and each step decodes a short window only."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from loramux.engine.detokenizer import IncrementalDetokenizer

PIECES = ["hello", " world", "é", "ü", "ß", "中文", "日本語", "😀", "👩‍💻", "🇫🇷", " ", "\n", "Ω", "ก", "∑", "12", ".",
          "naïve", " café", "𝔘"]


@pytest.fixture(scope="module")
def tokenizer(smollm_tokenizer_dir):
    return AutoTokenizer.from_pretrained(smollm_tokenizer_dir)


def stream(tokenizer, ids: list[int], stop: list[str] = ()) -> tuple[list[str], bool]:
    """Feed ids one by one as the engine does -> (deltas, stopped)."""
    detok = IncrementalDetokenizer(tokenizer, list(stop))
    deltas = []
    for i, token in enumerate(ids):
        stopped = detok.add(token)
        deltas.append(detok.flush(final=stopped or i == len(ids) - 1))
        if stopped:
            return deltas, True
    return deltas, False


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(n))


@pytest.mark.parametrize("seed", range(30))
def test_stream_of_random_text_equals_full_decode_and_never_splits_a_character(tokenizer, seed):
    rng = random.Random(seed)
    ids = tokenizer.encode(random_text(rng, 40), add_special_tokens=False)
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)  # valid UTF-8 throughout: no half character is ever sent


@pytest.mark.parametrize("seed", range(30))
def test_stream_of_random_token_ids_equals_full_decode(tokenizer, seed):
    """Arbitrary ids (byte tokens, special tokens, invalid UTF-8 byte runs) included."""
    rng = random.Random(1000 + seed)
    byte_tokens = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.convert_ids_to_tokens(list(range(300)))]
    ids = [rng.choice(byte_tokens) if rng.random() < 0.6 else rng.randrange(len(tokenizer)) for _ in range(60)]
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("seed", range(30))
def test_stop_string_across_token_boundaries_cuts_before_it_and_never_leaks(tokenizer, seed):
    rng = random.Random(2000 + seed)
    ids = tokenizer.encode(random_text(rng, 40), add_special_tokens=False)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    start = rng.randrange(len(full) // 4, len(full) - 6)
    stop = full[start:start + rng.randint(2, 6)]
    decoded_before = [tokenizer.decode(ids[:i], skip_special_tokens=True) for i in range(len(ids) + 1)]
    deltas, stopped = stream(tokenizer, ids, [stop, "never-in-the-text"])
    assert stopped
    assert "".join(deltas) == full[:full.find(stop)]
    # It stops at the first token whose text completes the stop string (and not later).
    assert len(deltas) == next(i for i, text in enumerate(decoded_before) if stop in text)


def test_stop_string_spanning_tokens_is_detected(tokenizer):
    ids = tokenizer.encode("The answer is forty-two. Then more text follows here.", add_special_tokens=False)
    stop = "two. Th"
    pieces = [tokenizer.decode([i]) for i in ids]
    assert stop not in pieces and not any(stop in p for p in pieces)  # it really crosses token boundaries
    deltas, stopped = stream(tokenizer, ids, [stop])
    assert stopped and "".join(deltas) == "The answer is forty-"
    assert all("two" not in d for d in deltas)


def test_multibyte_stop_string_and_a_character_split_over_tokens(tokenizer):
    ids = tokenizer.encode("ab😀cd🇫🇷ef", add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the emoji's bytes are spread over tokens
    deltas, stopped = stream(tokenizer, ids, ["🇫🇷"])
    assert stopped and "".join(deltas) == "ab😀cd"


def test_incomplete_character_at_the_end_shows_as_the_full_decode_does(tokenizer):
    ids = tokenizer.encode("x😀", add_special_tokens=False)[:-1]  # cut inside the emoji's bytes
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert full.endswith("\ufffd")
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == full and "\ufffd" not in "".join(deltas[:-1])


class WindowRecorder:
    """The real tokenizer, recording how many tokens each decode call is given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.window_lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.window_lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_each_step_decodes_a_short_window_only(tokenizer):
    rng = random.Random(5)
    ids = tokenizer.encode(random_text(rng, 1500), add_special_tokens=False)
    assert len(ids) > 2000
    recorder = WindowRecorder(tokenizer)
    deltas, _ = stream(recorder, ids, ["never-in-the-text"])
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(recorder.window_lengths) <= 8  # O(new tokens) per step, however long the output
