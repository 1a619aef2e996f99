"""The cluster ingress's routing state (no Ray cluster: the router it keeps, fed replica records)."""

from __future__ import annotations

import torch

from loramux.cluster.ingress import ClusterIngress
from loramux.config import ClusterConfig, RouterConfig
from loramux.router import Router
from tests.test_router import TableEmbedder, record


def similarity(router: Router, text: str, name: str) -> float:
    query = router.embedder.embed([text])[0]
    return {n: sim for n, sim, _ in router.index.search(query, 8)}[name]


def test_a_card_only_replace_re_keys_the_ingress_router():
    ingress = ClusterIngress(None, RouterConfig(), ClusterConfig(), shared_store=True)
    ingress.router = Router(TableEmbedder({"adds numbers": [1.0, 0.0], "writes poems": [0.0, 1.0]}),
                            RouterConfig(), {})
    ingress._update_router({"x": record("x", "adds numbers")})
    assert similarity(ingress.router, "adds numbers", "x") > 0.99
    ingress._update_router({"x": record("x", "writes poems")})  # same weights (checksum), a new card
    assert similarity(ingress.router, "writes poems", "x") > 0.99
    assert abs(similarity(ingress.router, "adds numbers", "x")) < 1e-6
    ingress._update_router({})
    assert len(ingress.router.index.search(torch.tensor([1.0, 0.0, 0.0]), 8)) == 0
