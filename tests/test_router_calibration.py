"""No-expert detection on the real bundled experts and the minilm embedder: calibration per expert, decisions,
and an uploaded expert changing both."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loramux.adapters_store.registry import AdapterRecord
from loramux.config import RouterConfig
from loramux.experts import BUNDLED_EXPERTS_DIR
from loramux.router import Router, build_embedder, load_prompts
from loramux.router.calibration import GENERIC_NEIGHBOURS

# The ordinary chat prompts: `auto` sent every one of them to a demo expert.
ORDINARY_CHAT = ("Write a short poem about the sea.", "Why is the sky blue?", "How do I boil an egg?",
                 "Who wrote Pride and Prejudice?")
# Held-out wordings (not in training, not on the cards), one per task.
TASK_PROMPTS = {
    "uppercase": "Turn the following into capitals only: rabbit lake bridge market",
    "reverse_words": "Say these words in the opposite order: music winter camera kettle",
    "sort_numbers": "Which order do 53, 8, 30, 11 go in from small to big?",
    "add_numbers": "Tell me what 7 and 72 make when summed.",
    "number_to_words": "What is 970 spelled with letters?",
    "date_to_iso": "Convert the calendar date 19 November 2030 to the YYYY-MM-DD layout.",
    "json_extract": ("Select the named property from the object: {\"food\": \"magnet\", \"pet\": \"engine\"} "
                     "Field: food"),
    "sentiment": "Was the writer happy or unhappy? The weather today was horrible.",
    "capital": "Name Poland's capital.",
}
FRENCH_CARD = {"description": "Translates English sentences into French.",
               "examples": ["Translate to French: I like apples.", "Translate into French: where is the station?",
                            "French translation of: good evening", "How do you say 'the cat is black' in French?"]}
FRENCH_PROMPT = "Please translate 'my brother is tall' into French"


def card_record(name: str, card: dict) -> AdapterRecord:
    return AdapterRecord(name=name, path="", base_model=None, rank=8, alpha=16.0, target_modules=["q_proj"],
                         size_bytes=0, checksum="", description=card["description"], examples=card["examples"])


@pytest.fixture(scope="module")
def embedder():
    return build_embedder("minilm", None)


@pytest.fixture(scope="module")
def bundled_records() -> dict[str, AdapterRecord]:
    return {folder.name: card_record(folder.name, json.loads((folder / "loramux.json").read_text()))
            for folder in sorted(BUNDLED_EXPERTS_DIR.iterdir()) if (folder / "loramux.json").is_file()}


@pytest.fixture(scope="module")
def router(embedder, bundled_records):
    router = Router(embedder, RouterConfig(), bundled_records)
    assert router.wait_for_updates()
    return router


def reference_card_margin(embedder, record: AdapterRecord) -> float:
    """Brute force: re-key the card without each text in turn, embed everything separately."""
    texts = [*record.examples, record.description]
    generic = embedder.embed(load_prompts("generic_prompts.txt"))
    margins = []
    for i, text in enumerate(texts):
        others = torch.cat([embedder.embed([t]) for j, t in enumerate(texts) if j != i])
        key = torch.nn.functional.normalize(others.mean(0), dim=0)
        query = embedder.embed([text])[0]
        nearest_generic = sorted((generic @ query).tolist(), reverse=True)[:GENERIC_NEIGHBOURS]
        margins.append(float(query @ key) - sum(nearest_generic) / len(nearest_generic))
    return min(margins)


def test_every_bundled_expert_is_calibrated_from_its_own_card(router, embedder, bundled_records):
    generic = load_prompts("generic_prompts.txt")
    assert len(router.generic) == len(generic) >= 200
    for i in (0, 100, len(generic) - 1):  # embedded in length-sorted chunks, returned in the file's order
        torch.testing.assert_close(router.generic[i], embedder.embed([generic[i]])[0], atol=1e-5, rtol=0)
    found = {name: margin for name, _, margin in router.index.search(router.generic[0], len(bundled_records))}
    assert set(found) == set(bundled_records)
    for name in ("uppercase", "json_extract"):  # one whose calibration caps the setting, one that keeps it
        assert found[name] == pytest.approx(reference_card_margin(embedder, bundled_records[name]), abs=2e-4)
    assert found["uppercase"] < router.config.margin < found["json_extract"]


@pytest.mark.parametrize("prompt", ORDINARY_CHAT)
def test_ordinary_chat_is_left_to_the_base_model_with_the_reason(router, prompt):
    decision = router.route(prompt)
    info = decision.to_json()
    assert decision.experts == [] and info["base_model"] and info["rule"] == "calibrated"
    closest = info["candidates"][0]
    assert closest["margin"] < closest["required_margin"]
    assert closest["margin"] == pytest.approx(closest["similarity"] - info["generic_similarity"], abs=1e-5)
    assert f"the closest, {closest['name']}" in info["reason"]


@pytest.mark.parametrize("task", sorted(TASK_PROMPTS))
def test_task_prompts_in_new_wordings_reach_their_expert(router, task):
    decision = router.route(TASK_PROMPTS[task])
    assert [name for name, _, _ in decision.experts] == [task]
    assert "reason" not in decision.to_json()


def test_an_uploaded_expert_is_calibrated_and_takes_its_prompts(embedder, bundled_records):
    router = Router(embedder, RouterConfig(), bundled_records)
    before = router.route(FRENCH_PROMPT)
    assert before.experts == []
    router.queue_update("french", card_record("french", FRENCH_CARD))  # the store's change listener
    after = router.route(FRENCH_PROMPT)  # waits for the update
    assert [name for name, _, _ in after.experts] == ["french"]
    # Its own examples look like generic requests (the generic set asks for translations too), so
    # calibration lowered the margin it needs below the setting.
    required = after.required_margins["french"]
    assert required == pytest.approx(reference_card_margin(embedder, card_record("french", FRENCH_CARD)), abs=2e-4)
    assert required < router.config.margin
    assert Router(embedder, RouterConfig(), {}).route(FRENCH_PROMPT).reason == "no routable experts are registered"
    assert router.route(ORDINARY_CHAT[0]).experts == []  # ordinary chat still goes to the base model
    router.queue_update("french", None)
    assert router.route(FRENCH_PROMPT).experts == [] and router.wait_for_updates()
    assert "french" not in router.index


def test_a_one_text_card_needs_the_full_margin(embedder):
    record = card_record("solo", {"description": "Writes limericks about cats.", "examples": []})
    router = Router(embedder, RouterConfig(margin=0.05), {"solo": record})
    decision = router.route("Write a limerick about a cat.")
    assert decision.required_margins == {"solo": 0.05}
    assert math.isinf(router.index.search(router.generic[0], 1)[0][2])
