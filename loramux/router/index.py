"""The experts' keys: one unit vector per routable adapter or composite, searched with one matrix product.

Each key carries its expert's card margin (calibration.py): the lowest
leave-one-out margin of its card texts, which caps the margin it needs, and
its kind: `adapter` for a plain LoRA, or the composite's type (mole, mor,
more), so a search can keep to one kind.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Collection

import torch

from loramux.router.embedders import Embedder

logger = logging.getLogger(__name__)

ADAPTER = "adapter"  # the kind of a plain LoRA expert's key; a composite's kind is its type


def card_texts(description: str, examples: list[str]) -> list[str]:
    """What an expert's key is built from: its example inputs and its description."""
    return [text for text in [*examples, description] if text.strip()]


def embed_card(embedder: Embedder, description: str, examples: list[str]) -> torch.Tensor | None:
    """The card's texts embedded: [n, D] unit rows; None without any text."""
    texts = card_texts(description, examples)
    return embedder.embed(texts) if texts else None


def key_of(card: torch.Tensor) -> torch.Tensor:
    """Mean of the card's unit embeddings [n, D], renormalised: [D]."""
    return torch.nn.functional.normalize(card.mean(0), dim=0)


class ExpertIndex:
    """name -> (key, card margin, kind), keys kept as one [E, D] matrix. Safe to search while another thread
    updates it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._names: list[str] = []
        self._keys: torch.Tensor | None = None  # [E, D]
        self._card_margins: dict[str, float] = {}
        self._kinds: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def kind(self, name: str) -> str | None:
        return self._kinds.get(name)

    def put(self, name: str, key: torch.Tensor, card_margin: float = math.inf, kind: str = ADAPTER) -> None:
        with self._lock:
            names, keys = self._without(name)
            self._names = names + [name]
            self._keys = key[None] if keys is None else torch.cat([keys, key[None]])
            self._card_margins = {**self._card_margins, name: card_margin}
            self._kinds = {**self._kinds, name: kind}

    def remove(self, name: str) -> None:
        with self._lock:
            self._names, self._keys = self._without(name)
            self._card_margins = {n: m for n, m in self._card_margins.items() if n != name}
            self._kinds = {n: k for n, k in self._kinds.items() if n != name}

    def _without(self, name: str) -> tuple[list[str], torch.Tensor | None]:
        if name not in self._names:
            return list(self._names), self._keys
        i = self._names.index(name)
        names = self._names[:i] + self._names[i + 1:]
        keys = torch.cat([self._keys[:i], self._keys[i + 1:]]) if names else None
        return names, keys

    def search(self, query: torch.Tensor, k: int, kinds: Collection[str] | None = None,
               names: Collection[str] | None = None) -> list[tuple[str, float, float]]:
        """The k keys most similar to `query` [D], best first: (name, cosine, card margin); only keys of the
        given `kinds` and `names` when those are set."""
        with self._lock:
            all_names, keys, card_margins, key_kinds = self._names, self._keys, self._card_margins, self._kinds
        if keys is None:
            return []
        sims = keys @ query
        if kinds is not None or names is not None:
            allowed = [(kinds is None or key_kinds[n] in kinds) and (names is None or n in names) for n in all_names]
            sims = sims.masked_fill(~torch.tensor(allowed), -math.inf)
            k = min(k, sum(allowed))
        top = torch.topk(sims, min(k, len(all_names)))
        return [(all_names[i], float(s), card_margins[all_names[i]])
                for s, i in zip(top.values.tolist(), top.indices.tolist())]
