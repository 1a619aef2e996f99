"""When no expert applies: compare a prompt's best expert with the generic prompts the base model is for.

The router embeds a bundled set of generic instructions (chat, questions,
writing, code, arithmetic in words, other languages: `data/generic_prompts.txt`).
A prompt's *generic similarity* is the mean of its `GENERIC_NEIGHBOURS`
highest cosine similarities to that set; its *margin* for an expert is
similarity(prompt, expert key) - generic similarity. An expert takes the
prompt only when the margin reaches the expert's *required margin*:

    required_margin(e) = min(setting, lowest leave-one-out margin of e's own card texts)

so an expert whose own examples look like generic requests (a translation or
an SQL expert: the generic set asks for those too) is not locked out, and a
narrow expert keeps the full setting. docs/router.md has the measurements
that chose this rule over a per-expert cosine threshold, a single "base
model" key and a classifier.
"""

from __future__ import annotations

import functools
import math
from importlib import resources

import torch

GENERIC_PROMPTS_FILE = "generic_prompts.txt"
GENERIC_NEIGHBOURS = 3  # generic prompts averaged into a prompt's generic similarity


def load_prompts(filename: str) -> list[str]:
    """Prompts from a file in loramux/router/data: one per line, '#' lines are comments."""
    text = resources.files("loramux.router").joinpath("data", filename).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@functools.lru_cache(maxsize=4)
def embedded_generic_prompts(embedder) -> torch.Tensor:
    """The bundled generic prompts embedded by `embedder`: [G, D]; computed once per embedder."""
    return embedder.embed(load_prompts(GENERIC_PROMPTS_FILE))


def generic_similarity(queries: torch.Tensor, generic: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Mean of each query's GENERIC_NEIGHBOURS highest cosines to the generic set.

    queries [N, D], generic [G, D], both unit rows -> [N]. `exclude_self`: the
    queries are the generic set itself (leave-one-out).
    """
    sims = queries @ generic.T  # [N, G]
    if exclude_self:
        sims = sims - 4.0 * torch.eye(len(generic), dtype=sims.dtype)  # below any cosine: never a neighbour
    k = min(GENERIC_NEIGHBOURS, sims.shape[1] - int(exclude_self))
    return sims.topk(k, dim=1).values.mean(1)


def leave_one_out_similarities(card: torch.Tensor) -> torch.Tensor:
    """Each card text's cosine with the key built from the card's other texts: card [n, D] (n >= 2) -> [n]."""
    others = card.sum(0, keepdim=True) - card  # [n, D]: sum of the other rows
    return (card * torch.nn.functional.normalize(others, dim=-1)).sum(-1)


def card_margin(card: torch.Tensor, generic: torch.Tensor) -> float:
    """The lowest leave-one-out margin of an expert's card texts [n, D] against the generic set [G, D];
    an expert needs min(setting, this). With a single card text there is nothing to leave out: +inf."""
    if len(card) < 2:
        return math.inf
    own = leave_one_out_similarities(card) - generic_similarity(card, generic)
    return float(own.min())
