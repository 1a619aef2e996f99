"""Router units: keys, top-k search, calibrated rule and threshold, strategy weights, worker updates, embedders."""

from __future__ import annotations

import logging
import math
import threading

import pytest
import torch

from loramux.adapters_store.registry import AdapterRecord
from loramux.adapters_store.synthetic import write_random_adapter
from loramux.config import RouterConfig
from loramux.router import ExpertIndex, Router, embed_card, key_of
from loramux.router.embedders import BaseModelEmbedder, SentenceEmbedder, minilm_path
from tests.conftest import make_engine


class TableEmbedder:
    """Maps each known text to a fixed vector (normalised), so similarities are chosen by the test; every
    other text (the bundled generic prompts) lies on an axis of its own, orthogonal to all of them."""

    name = "table"

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.threads: set[str] = set()  # the threads that embedded something

    def embed(self, texts):
        self.threads.add(threading.current_thread().name)
        rows = [[*self.table[t], 0.0] if t in self.table else [0.0] * len(next(iter(self.table.values()))) + [1.0]
                for t in texts]
        return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def record(name: str, description: str = "", examples: list[str] | None = None) -> AdapterRecord:
    return AdapterRecord(name=name, path="", base_model=None, rank=4, alpha=8.0, target_modules=["q_proj"],
                         size_bytes=0, checksum="", description=description, examples=examples or [])


def test_key_is_the_normalised_mean_of_normalised_card_embeddings():
    embedder = TableEmbedder({"e1": [3.0, 0.0, 0.0], "e2": [0.0, 0.5, 0.0], "desc": [0.0, 0.0, 2.0]})
    key = key_of(embed_card(embedder, "desc", ["e1", "e2"]))
    expected = torch.tensor([1.0, 1.0, 1.0, 0.0]) / math.sqrt(3)  # unit vectors averaged: lengths must not weigh in
    torch.testing.assert_close(key, expected)
    assert embed_card(embedder, "", []) is None
    assert embed_card(embedder, "desc", []) is not None  # a description alone still makes a key


def test_top_k_matches_a_brute_force_ranking_and_follows_updates():
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=-1)
    index = ExpertIndex()
    for i, key in enumerate(keys):
        index.put(f"e{i}", key)
    query = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    scores = [(float(keys[i] @ query), f"e{i}") for i in range(300)]
    expected = [name for _, name in sorted(scores, reverse=True)[:5]]
    assert [name for name, *_ in index.search(query, 5)] == expected
    index.remove(expected[0])
    assert [name for name, *_ in index.search(query, 4)] == expected[1:]
    index.put(expected[3], -query, card_margin=0.01)  # re-keying replaces, it does not duplicate
    assert len(index) == 299 and index.search(query, 300)[-1] == (expected[3], pytest.approx(-1.0), 0.01)
    assert index.search(query, 1000)[0][0] == expected[1]


@pytest.fixture
def three_experts():
    table = {"up": [1, 0, 0], "rev": [0, 1, 0], "sort": [0, 0, 1],
             "q-up": [0.9, 0.3, 0.1], "q-far": [-1, -1, -1], "q-mid": [0.6, 0.5, 0.1]}
    embedder = TableEmbedder(table)
    records = {"upper": record("upper", "up"), "reverse": record("reverse", "rev"), "sorter": record("sorter", "sort")}
    return embedder, records


def test_select_picks_the_nearest_expert_with_weight_one(three_experts):
    embedder, records = three_experts
    router = Router(embedder, RouterConfig(), records)
    decision = router.route("q-up", strategy="select")
    assert [(n, w) for n, w, _ in decision.experts] == [("upper", 1.0)]
    assert decision.experts[0][2] == pytest.approx(0.9 / math.sqrt(0.91))


def test_calibrated_rule_and_threshold_hand_the_request_to_the_base_model(three_experts):
    embedder, records = three_experts
    router = Router(embedder, RouterConfig(margin=0.5), records)
    far = router.route("q-far")  # similarity < 0 = its similarity to the generic prompts
    assert far.experts == [] and far.candidates and far.threshold is None and far.generic_similarity == 0.0
    assert far.to_json()["base_model"] and "calibrated margin is 0.500" in far.to_json()["reason"]
    assert router.route("q-up").experts[0][0] == "upper"  # 0.94 - 0 >= 0.5
    assert Router(embedder, RouterConfig(margin=0.95), records).route("q-up").experts == []
    assert router.route("q-up", threshold=0.99).experts == []  # per request
    assert Router(embedder, RouterConfig(threshold=0.99), records).route("q-up").experts == []  # per server


def test_mixture_weights_are_a_softmax_over_similarities(three_experts):
    embedder, records = three_experts
    router = Router(embedder, RouterConfig(temperature=0.2), records)
    decision = router.route("q-mid", strategy="mixture", top_k=3, threshold=-1)
    sims = torch.tensor([s for _, _, s in decision.experts])
    expected = torch.softmax(sims / 0.2, dim=0)
    torch.testing.assert_close(torch.tensor([w for _, w, _ in decision.experts]), expected)
    assert sum(w for _, w, _ in decision.experts) == pytest.approx(1.0)
    assert [n for n, _, _ in decision.experts] == ["upper", "reverse", "sorter"]
    # Experts under the threshold are dropped before the softmax.
    kept = router.route("q-mid", strategy="mixture", top_k=3, threshold=0.5)
    assert [n for n, _, _ in kept.experts] == ["upper", "reverse"]
    assert sum(w for _, w, _ in kept.experts) == pytest.approx(1.0)


def test_fusion_weights_are_rounded_so_fusions_can_be_reused(three_experts):
    embedder, records = three_experts
    router = Router(embedder, RouterConfig(temperature=0.2), records)
    weights = [w for _, w, _ in router.route("q-mid", strategy="fusion", top_k=2).experts]
    assert sum(weights) == pytest.approx(1.0)
    assert all(abs(w / 0.05 - round(w / 0.05)) < 1e-6 for w in weights)


def test_index_follows_store_registrations_replacements_and_deletions(tiny_llama_dir, tmp_path, caplog):
    engine = make_engine(tiny_llama_dir)
    shape = engine.shape
    folder = write_random_adapter(tmp_path / "a", shape.lora_target_shapes(), shape.num_layers, rank=4, seed=0,
                                  targets=("q_proj",))
    embedder = TableEmbedder({"up": [1, 0, 0], "rev": [0, 1, 0], "q": [0.1, 1, 0]})
    router = Router(embedder, RouterConfig(), engine.store.records)
    engine.store.change_listeners.append(router.queue_update)
    engine.add_adapter("a", str(folder), {"description": "up", "examples": []})
    engine.add_adapter("b", str(folder), {"description": "", "examples": ["rev"]})
    assert router.route("q").experts[0][0] == "b"  # a route waits for the updates submitted before it
    engine.add_adapter("b", str(folder), {"description": "up", "examples": []}, replace=True)
    assert router.wait_for_updates()
    assert router.index.search(embedder.embed(["q"])[0], 1)[0][1] == pytest.approx(0.1 / math.sqrt(1.01))
    engine.remove_adapter("b")
    assert router.wait_for_updates() and router.index.names == ["a"]
    embedder.threads.clear()
    with caplog.at_level(logging.WARNING, logger="loramux.router.router"):
        engine.add_adapter("c", str(folder), {"description": "rev", "examples": []})
        engine.add_adapter("blank", str(folder), {"description": "", "examples": []})
        assert router.wait_for_updates()
    assert "blank" not in router.index and "blank" in caplog.text
    assert embedder.threads == {"router-updates"}  # cards are embedded off the registering (engine) thread
    name = engine.store.fuse(["a"], [1.0])
    assert name in engine.store and name not in router.index  # fusions are never routed to


def test_embedders_give_unit_vectors_and_rank_paraphrases_above_unrelated_text(tiny_llama_dir):
    texts = ["Sort these numbers: 5, 2, 9", "Order the list 8, 1, 4 from small to large",
             "What is the capital of France?"]
    engine = make_engine(tiny_llama_dir)
    base = BaseModelEmbedder(engine.model, engine.tokenizer, engine.model_lock)
    tiny_out = base.embed(texts)
    assert tiny_out.shape == (3, engine.shape.hidden_size)
    torch.testing.assert_close(tiny_out.norm(dim=-1), torch.ones(3))
    minilm = SentenceEmbedder(minilm_path())
    vectors = minilm.embed(texts)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2]) + 0.05


def test_base_model_hidden_states_match_transformers(tiny_llama_dir, tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    for model_dir in (tiny_llama_dir, tiny_qwen2_dir):
        engine = make_engine(model_dir)
        ids = engine.tokenizer.encode("Routing embeds prompts with the base model", add_special_tokens=False)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = hf.model(torch.tensor([ids])).last_hidden_state[0]
        torch.testing.assert_close(engine.model.final_hidden_states(torch.tensor(ids)), expected,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argv, bundled", [([], True), (["--no-experts"], False), (["--model", "/m"], False)])
def test_serve_registers_the_bundled_experts_only_for_the_default_model(argv, bundled):
    from loramux.cli import build_parser, engine_config_from_args
    from loramux.experts import BUNDLED_COMPOSITES_DIR, BUNDLED_EXPERTS_DIR

    config = engine_config_from_args(build_parser().parse_args(["serve", *argv, "--adapter-dir", "/extra"]))
    assert (str(BUNDLED_EXPERTS_DIR) in config.store.adapter_dirs) == bundled
    assert (str(BUNDLED_COMPOSITES_DIR) in config.store.adapter_dirs) == bundled
    assert "/extra" in config.store.adapter_dirs


def test_bundled_composites_are_left_out_when_the_member_limit_is_below_theirs():
    from loramux.cli import build_parser, engine_config_from_args
    from loramux.experts import BUNDLED_COMPOSITES_DIR, BUNDLED_EXPERTS_DIR, bundled_composite_needs

    gated, members = bundled_composite_needs()
    assert (gated, members) == (2, 9)  # mole_demo and mor_demo gate over the nine demo tasks
    config = engine_config_from_args(build_parser().parse_args(["serve", "--max-composite-members", "8"]))
    assert str(BUNDLED_EXPERTS_DIR) in config.store.adapter_dirs
    assert str(BUNDLED_COMPOSITES_DIR) not in config.store.adapter_dirs


def test_router_flags_reach_the_config_and_bad_values_are_refused():
    from loramux.cli import build_parser, engine_config_from_args

    args = build_parser().parse_args(["serve", "--router-strategy", "fusion", "--router-top-k", "3",
                                      "--router-threshold", "0.4", "--router-temperature", "0.2",
                                      "--router-margin", "0.05", "--router-embedder-dtype", "bfloat16"])
    router = engine_config_from_args(args).router
    assert (router.strategy, router.top_k, router.threshold, router.temperature) == ("fusion", 3, 0.4, 0.2)
    assert router.margin == 0.05 and router.embedder_dtype == "bfloat16"
    assert engine_config_from_args(build_parser().parse_args(["serve", "--router-strategy", "more"])).router.strategy \
        == "more"
    assert engine_config_from_args(build_parser().parse_args(["serve"])).router.threshold is None
    with pytest.raises(ValueError, match="router-margin"):
        RouterConfig(margin=2.0)
    with pytest.raises(ValueError, match="router-embedder-dtype"):
        RouterConfig(embedder_dtype="float16")
    with pytest.raises(ValueError, match="router-temperature"):
        RouterConfig(temperature=0)
    with pytest.raises(ValueError, match="router-threshold"):
        RouterConfig(threshold=1.5)


def test_decisions_become_mixes_and_only_multi_expert_fusions_are_built(three_experts):
    embedder, records = three_experts
    router = Router(embedder, RouterConfig(temperature=0.2), records)
    built = []

    class Store:
        def fuse(self, names, weights):
            built.append((names, weights))
            return "fusion-x"

    select = router.route("q-mid", strategy="select").lora_mix(Store())
    assert select == (("upper", 1.0, 0, None),)
    mixture = router.route("q-mid", strategy="mixture", top_k=2).lora_mix(Store())
    assert [name for name, *_ in mixture] == ["upper", "reverse"] and not built
    assert router.route("q-mid", strategy="fusion", top_k=2, threshold=0.7).lora_mix(Store())[0][0] == "upper"
    assert not built  # one expert left above the threshold: it serves alone
    decision = router.route("q-mid", strategy="fusion", top_k=2)
    assert decision.lora_mix(Store()) == (("fusion-x", 1.0, 0, None),) and decision.adapter == "fusion-x"
    assert built[0][0] == ["upper", "reverse"] and sum(built[0][1]) == pytest.approx(1.0)


def test_update_worker_runs_jobs_in_order_and_survives_a_failing_one(caplog):
    from loramux.router.worker import UpdateWorker

    worker, done, release = UpdateWorker("test-updates"), [], threading.Event()
    worker.submit(release.wait)  # holds the worker until the test lets it go
    worker.submit(lambda: done.append(1))
    worker.submit(lambda: 1 / 0)
    worker.submit(lambda: done.append(2))
    assert not worker.wait(timeout=0.2) and worker.pending == 4 and done == []
    release.set()
    with caplog.at_level(logging.ERROR, logger="loramux.router.worker"):
        assert worker.wait(timeout=10)
    assert done == [1, 2] and worker.pending == 0 and "router update failed" in caplog.text
