"""Incremental detokenization with stop strings that never leak into the stream."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text deltas.

    Text that could still become the start of a stop string, or that ends in
    an incomplete UTF-8 character, is held back until it is certain.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Add a token; returns True when the text now contains a stop string (text cut before it)."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        search_from = max(0, len(self.text) - self.holdback)
        self.text = text
        hits = [at for s in self.stop if (at := text.find(s, search_from)) != -1]
        if hits:
            self.text = text[:min(hits)]
            self.stopped = True
        return self.stopped

    def flush(self, final: bool) -> str:
        """The text not yet emitted that is safe to emit now (all of it when final)."""
        end = len(self.text)
        if not final:
            end -= self.holdback
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
