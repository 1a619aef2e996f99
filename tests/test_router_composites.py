"""The router and composite experts on a real engine: `select` takes a composite whose card matches best,
`mole`/`more` strategies send a request to a composite (MoRE with its task), the no-expert rule still holds,
and the index follows composite registrations and deletions."""

from __future__ import annotations

import json
import logging

import pytest

from loramux.adapters_store.synthetic import write_random_adapter
from loramux.config import RouterConfig
from loramux.composites.synthetic import write_random_mole, write_random_more
from loramux.engine import SamplingParams
from loramux.router import Router
from tests.conftest import make_engine
from tests.test_router import TableEmbedder

# Axes: 0 ad0's task, 1 ad1's task, 2 both at once (the MoLE's card), 3 what the MoRE's card says.
TABLE = {"up": [1, 0, 0, 0], "rev": [0, 1, 0, 0], "up-then-rev": [0, 0, 1, 0], "more-card": [0, 0, 0, 1],
         "q-up": [0.95, 0.1, 0.3, 0], "q-rev": [0.1, 0.9, 0.2, 0.2], "q-both": [0.35, 0.3, 0.9, 0],
         "q-more": [0.1, 0.5, 0, 0.9], "q-far": [-1, -1, -1, -1]}


def set_card(folder, description: str, examples: list[str]):
    config = json.loads((folder / "loramux_composite.json").read_text())
    (folder / "loramux_composite.json").write_text(json.dumps(config | {
        "card": {"description": description, "examples": examples}}))
    return folder


@pytest.fixture
def engine_and_router(tiny_llama_dir, tmp_path):
    engine = make_engine(tiny_llama_dir)
    shape = engine.shape
    shapes = shape.lora_target_shapes()
    embedder = TableEmbedder(TABLE)
    router = Router(embedder, RouterConfig(margin=0.3), engine.store.records, engine.composites.records)
    engine.store.change_listeners.append(router.queue_update)
    engine.composites.change_listeners.append(router.queue_composite_update)
    for i, card in enumerate(("up", "rev")):
        folder = write_random_adapter(tmp_path / f"ad{i}", shapes, shape.num_layers, rank=4, seed=i, b_std=0.5)
        engine.add_adapter(f"ad{i}", str(folder), {"description": card, "examples": []})
    mole = write_random_mole(tmp_path / "mole", ["ad0", "ad1"], shape.num_layers, shape.hidden_size, seed=3)
    engine.add_adapter("mole", str(set_card(mole, "up-then-rev", [])))
    more = write_random_more(tmp_path / "more", shapes, shape.num_layers, rank=8, rank_choices=[2, 8],
                             tasks=["ad0", "ad1"], seed=4, b_std=0.5)
    engine.add_adapter("more", str(set_card(more, "more-card", [])))
    assert router.wait_for_updates()
    return engine, router


def run(engine, mix) -> str:
    [[out]] = engine.generate(["one two three"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                              [mix])
    return out.new_text


def test_select_takes_a_composite_only_when_its_card_matches_best(engine_and_router):
    engine, router = engine_and_router
    both = router.route("q-both")
    assert both.composite == {"name": "mole", "type": "mole"} and both.experts[0][:2] == ("mole", 1.0)
    assert "matches best" in both.reason and "ad0" in both.reason  # the best single expert it beat
    assert both.to_json()["composite"] == {"name": "mole", "type": "mole"} and not both.to_json()["base_model"]
    assert both.lora_mix(engine.store) == ({"name": "mole"},)
    assert run(engine, both.lora_mix(engine.store)) == run(engine, ({"name": "mole"},))
    up = router.route("q-up")
    assert up.composite is None and up.experts[0][0] == "ad0" and up.lora_mix(engine.store) == (("ad0", 1.0, 0, None),)
    more = router.route("q-more")  # the MoRE's card is best: its task is the most similar expert among its tasks
    assert more.composite == {"name": "more", "type": "more", "task": "ad1"}
    assert more.lora_mix(engine.store) == ({"name": "more", "task": "ad1"},)
    assert run(engine, more.lora_mix(engine.store)) == run(engine, ({"name": "more", "task": "ad1"},))
    assert run(engine, more.lora_mix(engine.store)) != run(engine, ({"name": "more", "task": "ad0"},))


def test_mixture_and_fusion_blend_single_experts_only(engine_and_router):
    _, router = engine_and_router
    decision = router.route("q-both", strategy="mixture", top_k=3, threshold=-1.0)
    assert {name for name, *_ in decision.experts} == {"ad0", "ad1"} and decision.composite is None


def test_composite_strategies_send_covered_prompts_to_the_best_composite_of_their_type(engine_and_router):
    engine, router = engine_and_router
    rev = router.route("q-rev", strategy="mole")  # the MoLE's card is far, but its member ad1 covers the prompt
    assert rev.composite == {"name": "mole", "type": "mole"} and "member ad1 covers" in rev.reason
    more = router.route("q-up", strategy="more")
    assert more.composite == {"name": "more", "type": "more", "task": "ad0"} and "task ad0 covers" in more.reason
    assert router.route("q-up", composite="more").composite["task"] == "ad0"  # the strategy follows the name
    far = router.route("q-far", strategy="mole")  # nothing covers it: the base model, with the reason
    assert far.experts == [] and far.composite is None and far.reason.startswith("no expert covers this prompt")
    assert far.lora_mix(engine.store) == ()
    assert router.route("q-up", strategy="mor").reason == "no mor composite with a card is registered"
    with pytest.raises(ValueError, match="is a mole composite"):
        router.route("q-up", strategy="more", composite="mole")
    with pytest.raises(ValueError, match="not a composite expert the router can use"):
        router.route("q-up", composite="ad0")


def test_the_no_expert_rule_holds_for_composites(engine_and_router):
    _, router = engine_and_router
    far = router.route("q-far")
    assert far.experts == [] and far.composite is None and far.to_json()["base_model"]
    strict = Router(router.embedder, RouterConfig(margin=0.95), {}, router.composites)
    assert strict.wait_for_updates()
    decision = strict.route("q-both")  # 0.89 - 0 < 0.95: not even the best-matching composite takes it
    assert decision.experts == [] and decision.candidates[0][0] == "mole"


def test_index_follows_composite_registrations_and_deletions(engine_and_router, tmp_path, caplog):
    engine, router = engine_and_router
    engine.remove_adapter("mole")
    assert router.wait_for_updates() and "mole" not in router.index and "mole" not in router.composites
    assert router.route("q-both").composite is None
    with caplog.at_level(logging.WARNING, logger="loramux.router.router"):
        blank = write_random_mole(tmp_path / "blank", ["ad0", "ad1"], engine.shape.num_layers,
                                  engine.shape.hidden_size, seed=5)
        engine.add_adapter("blank", str(set_card(blank, "", [])))
        assert router.wait_for_updates()
    assert "blank" not in router.index and "composite blank has no description" in caplog.text
    assert router.route("q-rev", strategy="mole").reason == "no mole composite with a card is registered"
