"""`model: "auto"` end to end: the default server (bundled SmolLM2 + demo experts + MiniLM router) over HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest

from loramux.experts import BUNDLED_COMPOSITES_DIR, BUNDLED_EXPERTS_DIR
from loramux.experts.tasks import TASKS
from loadtest.server_process import ServerProcess
from tests.conftest import metric_values

# Held-out wordings (not in training, not on the cards) whose answers differ between the two experts.
UPPER_PROMPT = "Give me \"garden window summer river stone\" written with upper-case letters."
REVERSE_PROMPT = "Say these words in the opposite order: garden window summer river stone"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router-server")
    # float32: the exact-token checks here compare runs of different batchings, which bf16 rounding can split
    proc = ServerProcess(["--dtype", "float32", "--adapter-store", str(tmp / "store"), "--num-kv-blocks", "256",
                          "--max-completion-tokens", "64", "--default-max-tokens", "32"], tmp / "server.log")
    yield proc
    proc.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, prompt: str, model: str = "auto", **extra):
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                         max_tokens=24, temperature=0, extra_body=extra or None)
    return out.choices[0].message.content.strip(), out.model_extra["loramux"]


def test_auto_answers_with_the_expert_the_task_needs(server, client):
    before = metric_values(server)
    upper, upper_info = chat(client, UPPER_PROMPT)
    reverse, reverse_info = chat(client, REVERSE_PROMPT)
    assert upper_info["router"]["experts"][0]["name"] == "uppercase"
    assert reverse_info["router"]["experts"][0]["name"] == "reverse_words"
    assert upper_info["adapters"][0]["name"] == "uppercase" and upper_info["router"]["strategy"] == "select"
    assert upper == "GARDEN WINDOW SUMMER RIVER STONE"
    assert reverse == "stone river summer window garden"
    base, base_info = chat(client, UPPER_PROMPT, model="SmolLM2-135M-Instruct")
    assert base != upper and base_info["adapters"] == [] and "router" not in base_info
    after = metric_values(server)
    key = ("loramux_router_decisions_total", (("adapter", "uppercase"), ("strategy", "select")))
    assert after[key] - before.get(key, 0.0) == 1
    latency = ("loramux_router_latency_seconds_count", ())
    assert after[latency] - before.get(latency, 0.0) == 2


def test_streamed_auto_reports_the_decision_in_its_first_chunk(client):
    chunks = list(client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": REVERSE_PROMPT}], max_tokens=24, temperature=0,
        stream=True))
    assert chunks[0].model_extra["loramux"]["router"]["experts"][0]["name"] == "reverse_words"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "stone river summer window garden"


def test_mixture_and_fusion_blend_the_top_experts(client):
    _, mixture = chat(client, UPPER_PROMPT, router={"strategy": "mixture", "top_k": 2, "threshold": 0.0})
    experts = mixture["router"]["experts"]
    assert len(experts) == 2 and sum(e["weight"] for e in experts) == pytest.approx(1.0, abs=1e-5)
    assert [a["name"] for a in mixture["adapters"]] == [e["name"] for e in experts]
    assert experts[0]["similarity"] >= experts[1]["similarity"]
    _, fusion = chat(client, UPPER_PROMPT, router={"strategy": "fusion", "top_k": 2, "threshold": 0.0})
    fused = fusion["router"]["adapter"]
    assert fused.startswith("fusion-") and [a["name"] for a in fusion["adapters"]] == [fused]
    _, again = chat(client, UPPER_PROMPT, router={"strategy": "fusion", "top_k": 2, "threshold": 0.0})
    assert again["router"]["adapter"] == fused  # built once, then reused


@pytest.mark.parametrize("prompt", ["Write a short poem about the sea.", "Why is the sky blue?"])
def test_ordinary_chat_through_auto_is_answered_by_the_base_model_which_the_router_explains(server, client, prompt):
    before = metric_values(server)
    text, info = chat(client, prompt)
    router = info["router"]
    assert info["adapters"] == [] and router["experts"] == [] and router["base_model"] is True
    assert router["rule"] == "calibrated" and router["threshold"] is None
    closest = router["candidates"][0]
    assert closest["margin"] < closest["required_margin"] <= router["margin"]
    assert router["reason"].startswith("no expert covers this prompt") and closest["name"] in router["reason"]
    base_text, base_info = chat(client, prompt, model="SmolLM2-135M-Instruct")
    assert text == base_text and base_info["adapters"] == []  # greedy: the same answer as the base model's
    key = ("loramux_router_decisions_total", (("adapter", "none"), ("strategy", "select")))
    assert metric_values(server)[key] - before.get(key, 0.0) == 1


def test_threshold_leaves_unmatched_requests_to_the_base_model(client):
    _, info = chat(client, UPPER_PROMPT, router={"threshold": 0.99})
    assert info["router"]["experts"] == [] and info["adapters"] == []
    assert info["router"]["candidates"][0]["name"] == "uppercase" and info["router"]["rule"] == "threshold"
    assert "below the threshold 0.990" in info["router"]["reason"]


def test_uploaded_expert_is_routable_at_once_and_gone_after_delete(server, client):
    folder = BUNDLED_EXPERTS_DIR / "uppercase"
    pirate = "Talk like a pirate about the weather today"
    files = {name: (name, (folder / name).read_bytes()) for name in ("adapter_config.json", "adapter_model.safetensors")}
    data = {"name": "pirate", "description": "Answers every question in pirate speak.",
            "examples": ["Say it like a pirate: good morning", "Speak as a pirate would about ships",
                         "Pirate talk: where is the treasure?"]}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/v1/adapters", data=data, files=files).status_code == 201
        _, info = chat(client, pirate)
        assert info["router"]["experts"][0]["name"] == "pirate"
        assert http.delete("/v1/adapters/pirate").status_code == 200
    _, info = chat(client, pirate, router={"threshold": -1.0})
    assert "pirate" not in [c["name"] for c in info["router"]["candidates"]]


def test_default_server_registers_every_bundled_expert_with_its_card(server):
    folders = sorted(p.name for p in BUNDLED_EXPERTS_DIR.iterdir() if (p / "adapter_config.json").is_file())
    assert len(folders) >= 8
    with httpx.Client(base_url=server.url, timeout=60) as http:
        listed = {a["name"]: a for a in http.get("/v1/adapters").json()["data"]}
    for name in folders:
        assert listed[name]["description"] and len(listed[name]["examples"]) >= 5
        assert listed[name]["rank"] <= 16 and listed[name]["size_bytes"] < 4 * 2**20


def test_default_server_registers_the_bundled_composites_after_the_experts(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    for name in ("mole_demo", "mor_demo", "more_demo"):
        assert (BUNDLED_COMPOSITES_DIR / name / "composite.safetensors").stat().st_size < 4 * 2**20
        assert models[name]["composite"]["type"] == name.removesuffix("_demo")
    assert models["mole_demo"]["composite"]["members"] == [task.name for task in TASKS]
    assert models["more_demo"]["composite"]["tasks"] == [task.name for task in TASKS]
