"""Two `loramux serve --adapter-store s3://...` processes sharing one bucket (moto in server mode)."""

from __future__ import annotations

import time

import boto3
import httpx
import pytest

from loadtest.server_process import ServerProcess
from loramux.adapters_store.synthetic import write_random_adapter
from tests.conftest import make_engine
from tests.s3_server import AWS_TEST_ENV, create_bucket, moto_s3_server

pytestmark = pytest.mark.slow  # two server processes
POLL_SECONDS = 0.3


@pytest.fixture(scope="module")
def shared_bucket_servers(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3-serve")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in AWS_TEST_ENV.items():
            mp.setenv(key, value)  # the server processes inherit these credentials
        with moto_s3_server() as endpoint:
            bucket = create_bucket(endpoint)
            servers = [ServerProcess(["--model", str(tiny_llama_dir), "--no-router", "--num-kv-blocks", "64",
                                      "--adapter-store", f"s3://{bucket}/shared", "--s3-endpoint-url", endpoint,
                                      "--adapter-cache-dir", str(root / f"cache{i}"),
                                      "--adapter-store-poll-seconds", str(POLL_SECONDS)], root / f"server{i}.log")
                       for i in range(2)]
            try:
                yield servers, endpoint, bucket
            finally:
                for server in servers:
                    server.stop()


def listed(server) -> set[str]:
    return {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}


def wait_for(predicate, seconds: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < seconds, "not seen within the documented delay"
        time.sleep(0.05)
    return time.monotonic() - start


def base_model(server) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def greedy_text(server, model: str) -> str:
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": model, "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def upload(server, name: str, config: bytes, weights: bytes):
    files = {"adapter_config.json": ("adapter_config.json", config),
             "adapter_model.safetensors": ("adapter_model.safetensors", weights)}
    return httpx.post(server.url + "/v1/adapters", files=files, data={"name": name, "description": "demo"},
                      timeout=60)


def test_an_upload_and_a_delete_reach_every_server(shared_bucket_servers, tiny_llama_dir, tmp_path):
    (a, b), endpoint, bucket = shared_bucket_servers
    shape = make_engine(tiny_llama_dir, num_blocks=8).shape
    folder = write_random_adapter(tmp_path / "ad", shape.lora_target_shapes(), shape.num_layers, rank=4, seed=3,
                                  b_std=0.5)
    config, weights = (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()

    bad = upload(a, "broken", config, weights[:-50])
    assert 400 <= bad.status_code < 500 and "error" in bad.json()
    for name in ("auto", base_model(a)):  # reserved names are refused before anything is published
        refused = upload(a, name, config, weights)
        assert 400 <= refused.status_code < 500 and refused.json()["error"]["code"] == "invalid_name", refused.text
    assert boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    composite = httpx.post(a.url + "/v1/adapters", data={"name": "mix"}, timeout=60, files={
        "loramux_composite.json": ("loramux_composite.json", b'{"type": "mole", "members": ["x", "y"]}'),
        "composite.safetensors": ("composite.safetensors", b"")})
    assert composite.status_code == 400 and composite.json()["error"]["code"] == "unsupported_parameter"
    assert boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket).get("KeyCount") == 0

    r = upload(a, "shared-expert", config, weights)
    assert r.status_code == 201, r.text
    # The same body as the local-directory route (and GET /v1/adapters/{name}).
    assert r.json() == httpx.get(a.url + "/v1/adapters/shared-expert").json()
    assert r.json()["tier"] in ("gpu", "cpu", "disk") and r.json()["running_requests"] == 0
    assert "shared-expert" in listed(a)  # the uploading server serves it at once
    wait_for(lambda: "shared-expert" in listed(b), 5 * POLL_SECONDS + 2)
    assert greedy_text(b, "shared-expert") == greedy_text(a, "shared-expert") != greedy_text(b, base_model(b))

    again = upload(b, "shared-expert", config, weights)
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_exists"

    assert httpx.delete(b.url + "/v1/adapters/shared-expert").status_code == 200
    assert "shared-expert" not in listed(b)
    wait_for(lambda: "shared-expert" not in listed(a), 5 * POLL_SECONDS + 2)
    r = httpx.post(a.url + "/v1/completions", json={"model": "shared-expert", "prompt": "x"})
    assert r.status_code == 404
