"""The HTTP API against a real uvicorn process, through the official openai client and httpx."""

from __future__ import annotations

import asyncio
import json
import signal
import threading

import httpx
import openai
import pytest

from loramux.adapters_store.synthetic import write_random_adapter
from loadtest.server_process import ServerProcess
from tests.conftest import metric_values

API_KEY, ADMIN_KEY = "user-key", "admin-key"
NUM_ADAPTERS = 8


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    from loramux.engine.model import ModelShape
    from transformers import AutoConfig

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_llama_dir))
    root = tmp_path_factory.mktemp("server-adapters")
    for i in range(NUM_ADAPTERS + 2):  # two spare ones for uploads
        write_random_adapter(root / f"ad{i}", shape.lora_target_shapes(), shape.num_layers, rank=8, seed=100 + i,
                             b_std=0.5)
    return root


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapter_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    serving = tmp / "serving"
    serving.mkdir()
    for i in range(NUM_ADAPTERS):
        (serving / f"ad{i}").symlink_to(adapter_dir / f"ad{i}")
    # float32: concurrent streams are compared token for token with sequential ones
    proc = ServerProcess(["--model", str(tiny_llama_dir), "--dtype", "float32", "--served-model-name", "tiny",
                          "--num-kv-blocks", "512", "--max-num-seqs", "64",
                          "--max-num-batched-tokens", "512", "--adapter-dir", str(serving),
                          "--adapter-store", str(tmp / "store"), "--adapter-load-root", str(adapter_dir),
                          "--max-loras", "8", "--max-loras-per-batch", "8", "--api-key", API_KEY,
                          "--admin-api-key", ADMIN_KEY, "--max-body-bytes", "65536", "--max-adapter-bytes",
                          "200000", "--max-completion-tokens", "64", "--default-max-tokens", "16",
                          "--max-prompt-tokens", "256"],
                         tmp / "server.log")
    yield proc
    proc.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def http(server, key=API_KEY):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def store_snapshot(server):
    with http(server) as c:
        return sorted((a["name"], a["checksum"]) for a in c.get("/v1/adapters").json()["data"])


def greedy(client, prompt, model="tiny", **kw):
    out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, **kw)
    return out.choices[0].text


def test_completion_chat_and_stream_agree(client):
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert full.usage.completion_tokens == 10 and full.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10
    messages = [{"role": "user", "content": "Say something"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                              stream=True)
    parts = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert "".join(parts) == chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"


def test_adapter_changes_output_and_is_reported(client, server):
    base = greedy(client, "The weather today")
    with http(server) as c:
        r = c.post("/v1/completions", json={"model": "ad3", "prompt": "The weather today", "max_tokens": 8,
                                            "temperature": 0})
    assert r.status_code == 200
    assert r.headers["x-loramux-adapters"] == "ad3:1"
    assert r.json()["loramux"]["adapters"][0]["name"] == "ad3"
    assert r.json()["choices"][0]["text"] != base
    mixed = client.completions.create(model="tiny", prompt="The weather today", max_tokens=8, temperature=0,
                                      extra_body={"adapters": [{"name": "ad1", "weight": 0.5}, "ad2"]})
    assert [a["name"] for a in mixed.model_extra["loramux"]["adapters"]] == ["ad1", "ad2"]


def test_n_seed_logprobs_and_stop(client):
    out = client.completions.create(model="tiny", prompt="Numbers:", max_tokens=6, temperature=1.0, n=3, seed=7)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    again = client.completions.create(model="tiny", prompt="Numbers:", max_tokens=6, temperature=1.0, n=3, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    lp = client.completions.create(model="tiny", prompt="Numbers:", max_tokens=5, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) == 5
    assert all(len(top) == 2 for top in lp.choices[0].logprobs.top_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    assert len(chat.choices[0].logprobs.content) == 4
    assert all(len(t.top_logprobs) == 3 for t in chat.choices[0].logprobs.content)
    text = greedy(client, "Stop test prompt")
    stop = text.strip().split()[1] if len(text.split()) > 2 else text[2:4]
    cut = client.completions.create(model="tiny", prompt="Stop test prompt", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text)


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert "tiny" in models and all(f"ad{i}" in models for i in range(NUM_ADAPTERS))
    assert models["ad0"].model_extra["parent"] == "tiny"


def test_metrics_count_requests_and_tokens(client, server):
    before = metric_values(server)
    client.completions.create(model="ad5", prompt="count me", max_tokens=7, temperature=0)
    after = metric_values(server)

    def delta(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert delta("loramux_requests_total", (("status", "success"),)) == 1
    assert delta("loramux_generation_tokens_total") == 7
    assert delta("loramux_time_to_first_token_seconds_count") == 1
    assert after[("loramux_gpu_adapter_slots_total", ())] == 8
    assert ("loramux_adapter_evictions_total", (("tier", "gpu"),)) in after


def test_auth(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with http(server, API_KEY) as c:
        assert c.delete("/v1/adapters/ad0").status_code == 401  # admin only
        assert c.get("/v1/adapters/ad0").status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def upload(server, name, folder, key=ADMIN_KEY, weights=None, description="", examples=None):
    files = {"adapter_config.json": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
             "adapter_model.safetensors": ("adapter_model.safetensors",
                                           weights if weights is not None
                                           else (folder / "adapter_model.safetensors").read_bytes())}
    data = {"name": name, "description": description, "examples": json.dumps(examples or [])}
    with http(server, key) as c:
        return c.post("/v1/adapters", files=files, data=data)


def test_upload_use_delete(server, client, adapter_dir):
    r = upload(server, "uploaded", adapter_dir / "ad8", description="demo", examples=["a", "b"])
    assert r.status_code == 201, r.text
    assert r.json()["examples"] == ["a", "b"] and r.json()["rank"] == 8
    direct = greedy(client, "upload check", model="uploaded")
    with http(server, ADMIN_KEY) as c:
        loaded = c.post("/v1/adapters/load", json={"name": "loaded", "path": "ad8"})
        assert loaded.status_code == 201, loaded.text
    assert greedy(client, "upload check", model="loaded") == direct
    with http(server, ADMIN_KEY) as c:
        assert c.delete("/v1/adapters/uploaded").status_code == 200
        assert c.delete("/v1/adapters/loaded").status_code == 200
        assert c.get("/v1/adapters/uploaded").status_code == 404
    with pytest.raises(openai.NotFoundError):
        greedy(client, "upload check", model="uploaded")


BAD_REQUESTS = [
    ("malformed json", "/v1/completions", b'{"model": "tiny", "prompt": ', 400, "invalid_json"),
    ("wrong type", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "invalid_value"),
    ("unknown field", "/v1/completions", {"model": "tiny", "prompt": "x", "bogus": 1}, 400, "unknown_field"),
    ("unknown adapter", "/v1/completions", {"model": "no-such", "prompt": "x"}, 404, "model_not_found"),
    ("unknown mix member", "/v1/completions", {"model": "tiny", "prompt": "x", "adapters": ["nope"]}, 404,
     "adapter_not_found"),
    ("negative max_tokens", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400,
     "invalid_value"),
    ("huge max_tokens", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**9}, 400, None),
    ("empty prompt", "/v1/completions", {"model": "tiny", "prompt": ""}, 400, None),
    ("prompt over context", "/v1/completions", {"model": "tiny", "prompt": list(range(1000, 2100))}, 400,
     "context_length_exceeded"),
    ("prompt over server limit", "/v1/completions", {"model": "tiny", "prompt": "word " * 300}, 400,
     "context_length_exceeded"),
    ("auto with adapters", "/v1/completions", {"model": "auto", "prompt": "x", "adapters": ["ad0"]}, 400, None),
    ("router on an adapter", "/v1/completions", {"model": "ad0", "prompt": "x", "router": {"top_k": 2}}, 400, None),
    ("auto with bad token ids", "/v1/completions", {"model": "auto", "prompt": [5, -1, 10**9]}, 400, None),
    ("unknown strategy", "/v1/completions", {"model": "auto", "prompt": "x", "router": {"strategy": "vote"}}, 400,
     None),
    ("zero temperature", "/v1/completions", {"model": "auto", "prompt": "x", "router": {"temperature": 0}}, 400,
     None),
    ("penalty", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                         "presence_penalty": 1.0}, 400, "unsupported_parameter"),
    ("no messages", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400, None),
    ("oversized body", "/v1/completions", {"model": "tiny", "prompt": "x" * 100_000}, 413, "body_too_large"),
    ("load outside root", "/v1/adapters/load", {"name": "evil", "path": "../../etc"}, 400, "path_not_allowed"),
    ("traversal name", "/v1/adapters/load", {"name": "../evil", "path": "ad9"}, 400, "invalid_name"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_change_nothing(server, client, case):
    _, path, payload, status, code = case
    before = store_snapshot(server)
    with http(server, ADMIN_KEY) as c:
        r = (c.post(path, content=payload, headers={"content-type": "application/json"})
             if isinstance(payload, bytes) else c.post(path, json=payload))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and "Traceback" not in r.text
    if code:
        assert error["code"] == code
    assert store_snapshot(server) == before
    assert greedy(client, "still alive") == greedy(client, "still alive")


@pytest.mark.parametrize("case", ["corrupt", "oversized", "bad name"])
def test_bad_uploads(server, adapter_dir, case):
    before = store_snapshot(server)
    if case == "corrupt":
        r = upload(server, "corrupt", adapter_dir / "ad9", weights=b"\x00" * 1000)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_weights"
    elif case == "oversized":
        r = upload(server, "big", adapter_dir / "ad9", weights=b"\x00" * 400_000)
        assert r.status_code == 413
    else:
        r = upload(server, ".hidden", adapter_dir / "ad9")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_name"
    assert store_snapshot(server) == before


def test_concurrent_uploads_of_one_name(server, adapter_dir):
    results = []
    threads = [threading.Thread(target=lambda: results.append(upload(server, "race", adapter_dir / "ad9").status_code))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [201, 409, 409, 409]
    with http(server, ADMIN_KEY) as c:
        assert c.delete("/v1/adapters/race").status_code == 200


def test_64_concurrent_streams_over_8_adapters_match_sequential(server, client):
    prompts = [(f"ad{i % NUM_ADAPTERS}", f"request {i} says") for i in range(64)]
    expected = {p: greedy(client, p[1], model=p[0]) for p in prompts}

    async def one(aclient, model, prompt):
        stream = await aclient.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                                  stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, m, p) for m, p in prompts))

    assert asyncio.run(run_all()) == [expected[p] for p in prompts]


def test_client_disconnect_aborts_and_frees_blocks(server):
    with http(server) as c:
        with c.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "long " * 20, "max_tokens": 64,
                                                      "ignore_eos": True, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 3:
                    break
    for _ in range(100):
        values = metric_values(server)
        if values[("loramux_requests_running", ())] == 0 and values[("loramux_kv_blocks_used", ())] == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert values[("loramux_requests_running", ())] == 0 and values[("loramux_kv_blocks_used", ())] == 0
    assert values[("loramux_requests_total", (("status", "aborted"),))] >= 1


def test_overload_answers_429_and_sigterm_shuts_down_cleanly(tiny_llama_dir, tmp_path):
    proc = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--num-kv-blocks", "128", "--max-concurrent-requests", "1"],
                         tmp_path / "small.log")
    try:
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "hold", "max_tokens": 200,
                                                          "ignore_eos": True, "stream": True}) as held:
                lines = held.iter_lines()
                next(lines)
                busy = c.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
                assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
                proc.proc.send_signal(signal.SIGTERM)
                rest = list(lines)
            events = [line for line in rest if line]
            assert events[-1] == "data: [DONE]" or any("error" in line for line in events)
        # uvicorn finishes in-flight requests, shuts the app down, then re-raises SIGTERM for the exit status.
        assert proc.proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        proc.stop()
    assert "Traceback" not in (tmp_path / "small.log").read_text()
