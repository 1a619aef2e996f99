"""Incremental detokenization with stop strings that never leak into the stream.

Each step decodes only a short window of tokens, as vLLM does: the window
starts at `prefix_offset` (tokens already turned into text, kept as context
so that decoders which drop a leading space see the same neighbours) and the
text of the tokens from `read_offset` on is the part of the window beyond
the decode of tokens[prefix_offset:read_offset]. While that new text ends in
an incomplete UTF-8 character (U+FFFD from the decoder) the offsets stay, so
the window grows by a token or two until the character is complete.
Cost per step: O(window + longest stop string), not O(output length).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"  # what the decoder shows for bytes of a character still incomplete


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text deltas.

    `unsent` holds the decoded text of tokens[:read_offset] not yet emitted
    (cut before the first stop string once one is found); `pending` the text
    of the tokens after, whose last character is still incomplete. The last
    (longest stop string - 1) characters stay unsent until the end, since
    they could still become the start of a stop string; so stop strings are
    searched in `unsent` and `pending` alone, and no text is kept once sent.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.unsent = ""
        self.pending = ""
        self.stopped = False

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=True)

    def add(self, token_id: int) -> bool:
        """Add a token; returns True when the text now contains a stop string (text cut before it)."""
        self.token_ids.append(token_id)
        known = self._decode(self.prefix_offset, self.read_offset)
        new = self._decode(self.prefix_offset, len(self.token_ids))[len(known):]
        search_from = max(0, len(self.unsent) - self.holdback)
        if new.endswith(REPLACEMENT):
            self.pending = new
        else:
            self.unsent += new
            self.pending = ""
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        # A stop string may end inside the pending text, before its incomplete character.
        tail = self.unsent[search_from:] + self.pending.rstrip(REPLACEMENT)
        hits = [at for s in self.stop if (at := tail.find(s)) != -1]
        if hits:
            self.unsent = (self.unsent + self.pending)[:search_from + min(hits)]
            self.pending = ""
            self.stopped = True
        return self.stopped

    def flush(self, final: bool) -> str:
        """The text not yet emitted that is safe to emit now (all of it when final)."""
        if final:
            # The full decode shows a character left incomplete at the end as U+FFFD: so does the stream.
            self.unsent += self.pending
            self.pending = ""
        end = len(self.unsent) if final else max(0, len(self.unsent) - self.holdback)
        delta, self.unsent = self.unsent[:end], self.unsent[end:]
        return delta
