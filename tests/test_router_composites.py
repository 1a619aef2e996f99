"""The router and composite experts on a real engine: `select` takes a composite whose card matches best,
`mole`/`more` strategies send a request to a composite (MoRE with its task), the no-expert rule still holds,
and the index follows composite registrations and deletions."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest
from transformers import AutoConfig

from loramux.adapters_store.synthetic import write_random_adapter
from loramux.config import RouterConfig
from loramux.composites.synthetic import write_random_mole, write_random_more
from loramux.engine import SamplingParams
from loramux.engine.model import ModelShape
from loramux.router import Router
from loadtest.server_process import ServerProcess
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


# Over HTTP: a tiny server with the MiniLM router, two experts with cards, a MoLE for both tasks at once and a
# MoRE whose tasks are named like the experts.
CARDS = {"upper": {"description": "Rewrites text in upper-case letters.",
                   "examples": ["Write this in capital letters: good morning", "Upper-case this: red car",
                                "Convert to uppercase: hello there"]},
         "reverse": {"description": "Reverses the order of the words in a text.",
                     "examples": ["Reverse the word order: one two three", "Say these words backwards: cat dog",
                                  "Put these words in the opposite order: sun moon star"]}}
MOLE_CARD = ("Upper-cases a text and then reverses the order of its words.",
             ["Write these words in capitals, then reverse their order: red green blue",
              "Upper-case this and reverse the word order: one two three",
              "Reverse the order of these words and put them in capital letters: cat dog bird"])
TWO_TASK_PROMPT = "Put these words in upper case, then reverse their order: apple river stone"
REVERSE_PROMPT = "Say these words in the opposite order: garden window summer"


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_llama_dir))
    root = tmp_path_factory.mktemp("router-composites")
    serving = root / "serving"
    for i, (name, card) in enumerate(CARDS.items()):
        folder = write_random_adapter(serving / name, shape.lora_target_shapes(), shape.num_layers, rank=4, seed=i,
                                      b_std=0.5)
        (folder / "loramux.json").write_text(json.dumps(card))
    set_card(write_random_mole(serving / "both", list(CARDS), shape.num_layers, shape.hidden_size, seed=3),
             *MOLE_CARD)
    set_card(write_random_more(serving / "more", shape.lora_target_shapes(), shape.num_layers, rank=8,
                               rank_choices=[2, 8], tasks=list(CARDS), seed=4, b_std=0.5),
             "One shared LoRA for upper-casing and reversing words.", [])
    proc = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--num-kv-blocks", "256",
                          "--adapter-dir", str(serving), "--max-composite-members", "4"], root / "server.log")
    yield proc
    proc.stop()


def chat(server, prompt: str, **extra):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    out = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=4,
                                         temperature=0, extra_body=extra or None)
    return out.model_extra["loramux"]


def test_auto_sends_a_two_task_prompt_to_the_composite_made_for_it(server):
    info = chat(server, TWO_TASK_PROMPT)
    assert info["router"]["composite"] == {"name": "both", "type": "mole"}, info["router"]
    assert info["router"]["experts"][0]["name"] == "both" and "matches best" in info["router"]["reason"]
    assert info["composite"]["name"] == "both" and sorted(info["composite"]["gates"]) == ["reverse", "upper"]
    assert chat(server, REVERSE_PROMPT)["router"]["experts"][0]["name"] == "reverse"  # one task: the expert


def test_composite_strategies_over_http(server):
    more = chat(server, REVERSE_PROMPT, router={"strategy": "more"})
    assert more["router"]["composite"] == {"name": "more", "type": "more", "task": "reverse"}
    assert more["composite"] == {"name": "more", "type": "more", "task": "reverse"}  # the engine ran that task
    mole = chat(server, REVERSE_PROMPT, router={"composite": "both"})
    assert mole["router"]["strategy"] == "mole" and mole["composite"]["name"] == "both"
    general = chat(server, "Why is the sky blue?", router={"strategy": "mole"})
    assert general["adapters"] == [] and general["router"]["base_model"] and "composite" not in general


@pytest.mark.parametrize("router, status, code", [({"composite": "nope"}, 404, "model_not_found"),
                                                   ({"composite": "both", "strategy": "more"}, 400, "invalid_value"),
                                                   ({"composite": "upper"}, 404, "model_not_found"),
                                                   ({"strategy": "moe"}, 400, None)])
def test_bad_composite_routing_is_refused(server, router, status, code):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "auto", "messages": [{"role": "user", "content": REVERSE_PROMPT}], "max_tokens": 2, "router": router})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"] and (code is None or r.json()["error"]["code"] == code)
