"""The experts' keys: one unit vector per routable adapter, searched with one matrix product.

Each key carries its expert's card margin (calibration.py): the lowest
leave-one-out margin of its card texts, which caps the margin it needs.
"""

from __future__ import annotations

import logging
import math
import threading

import torch

from loramux.router.embedders import Embedder

logger = logging.getLogger(__name__)


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
    """name -> (key, card margin), keys kept as one [E, D] matrix. Safe to search while another thread updates it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._names: list[str] = []
        self._keys: torch.Tensor | None = None  # [E, D]
        self._card_margins: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def put(self, name: str, key: torch.Tensor, card_margin: float = math.inf) -> None:
        with self._lock:
            names, keys = self._without(name)
            self._names = names + [name]
            self._keys = key[None] if keys is None else torch.cat([keys, key[None]])
            self._card_margins = {**self._card_margins, name: card_margin}

    def remove(self, name: str) -> None:
        with self._lock:
            self._names, self._keys = self._without(name)
            self._card_margins = {n: m for n, m in self._card_margins.items() if n != name}

    def _without(self, name: str) -> tuple[list[str], torch.Tensor | None]:
        if name not in self._names:
            return list(self._names), self._keys
        i = self._names.index(name)
        names = self._names[:i] + self._names[i + 1:]
        keys = torch.cat([self._keys[:i], self._keys[i + 1:]]) if names else None
        return names, keys

    def search(self, query: torch.Tensor, k: int) -> list[tuple[str, float, float]]:
        """The k keys most similar to `query` [D], best first: (name, cosine, card margin)."""
        with self._lock:
            names, keys, card_margins = self._names, self._keys, self._card_margins
        if keys is None:
            return []
        sims = keys @ query
        top = torch.topk(sims, min(k, len(names)))
        return [(names[i], float(s), card_margins[names[i]])
                for s, i in zip(top.values.tolist(), top.indices.tolist())]
