"""The adapter store through a real server process: bad adapters get 4xx, a broken adapter hurts only its own
requests, start-up survives a replaced configured adapter, and kill -9 never loses an acknowledged adapter."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from loramux.adapters_store.synthetic import write_random_adapter
from loadtest.server_process import ServerProcess

FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def shape(tiny_llama_dir):
    from transformers import AutoConfig

    from loramux.engine.model import ModelShape

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_llama_dir))


@pytest.fixture(scope="module")
def adapters(shape, tmp_path_factory):
    root = tmp_path_factory.mktemp("store-server-adapters")
    return {f"ad{i}": write_random_adapter(root / f"ad{i}", shape.lora_target_shapes(), shape.num_layers, rank=4,
                                           seed=300 + i, b_std=0.5) for i in range(6)}


def serve(tiny_llama_dir, tmp, configured, extra=()) -> ServerProcess:
    """A server with `configured` adapters from --adapter-dir, an upload store and a load root under `tmp`."""
    serving = tmp / "serving"
    if not serving.exists():
        serving.mkdir()
        for name, folder in configured.items():
            (serving / name).symlink_to(folder)
    (tmp / "load-root").mkdir(exist_ok=True)
    return ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--num-kv-blocks", "128",
                          "--no-router", "--adapter-dir", str(serving), "--adapter-store", str(tmp / "store"),
                          "--adapter-load-root", str(tmp / "load-root"), *extra], tmp / "server.log")


def upload(client: httpx.Client, name: str, folder, replace=False, config_bytes: bytes | None = None):
    files = {key: (key, (folder / key).read_bytes()) for key in FILES}
    if config_bytes is not None:
        files["adapter_config.json"] = ("adapter_config.json", config_bytes)
    return client.post("/v1/adapters", data={"name": name, "replace": str(replace).lower()}, files=files)


def listing(client: httpx.Client) -> dict[str, str]:
    return {a["name"]: a["checksum"] for a in client.get("/v1/adapters").json()["data"]}


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store-server")
    proc = serve(tiny_llama_dir, tmp, {"ad0": adapters["ad0"], "ad1": adapters["ad1"]},
                 ["--max-loras", "2", "--max-cpu-loras", "1"])
    proc.tmp = tmp
    yield proc
    proc.stop()


def test_bad_adapter_configs_and_reserved_names_get_4xx(server, adapters):
    config = json.loads((adapters["ad2"] / "adapter_config.json").read_text())
    cases = {
        "alpha-huge": (json.dumps(config | {"lora_alpha": 1e308}).encode(), 422),
        "alpha-nan": (json.dumps(config | {"lora_alpha": float("nan")}).encode(), 422),  # NaN literal
        "alpha-inf": (json.dumps(config | {"lora_alpha": float("inf")}).encode(), 422),  # Infinity literal
        "targets-int": (json.dumps(config | {"target_modules": [1]}).encode(), 422),
        "nested": (b'{"r": 4, "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 422),
    }
    with httpx.Client(base_url=server.url, timeout=60) as c:
        before = listing(c)
        for name, (config_bytes, status) in cases.items():
            r = upload(c, name, adapters["ad2"], config_bytes=config_bytes)
            assert r.status_code == status, (name, r.text)
            assert r.json()["error"]["code"] == "invalid_config", name
        for name in ("auto", "tiny"):
            r = upload(c, name, adapters["ad2"])
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_name", name
        assert listing(c) == before
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert sorted(models) == sorted(set(models))
        assert c.post("/v1/completions", json={"model": "ad0", "prompt": "hi", "max_tokens": 2}).status_code == 200
    assert sorted(p.name for p in (server.tmp / "store").iterdir()) == []


def test_an_adapter_whose_files_vanished_fails_only_its_requests(server, adapters):
    fragile = shutil.copytree(adapters["ad3"], server.tmp / "load-root" / "fragile")
    shutil.copytree(adapters["ad4"], server.tmp / "load-root" / "filler")
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for name in ("fragile", "filler"):  # filler pushes fragile out of the one CPU place: it pages from disk
            assert c.post("/v1/adapters/load", json={"name": name, "path": name}).status_code == 201
        assert c.get("/v1/adapters/fragile").json()["tier"] == "disk"
        (fragile / "adapter_model.safetensors").unlink()
        events = []

        def base_stream():
            with httpx.Client(base_url=server.url, timeout=60) as s, s.stream(
                    "POST", "/v1/completions", json={"model": "tiny", "prompt": "a long base-model answer",
                                                     "max_tokens": 48, "temperature": 0, "ignore_eos": True,
                                                     "stream": True}) as r:
                events.extend(line for line in r.iter_lines() if line.startswith("data: "))

        streamer = threading.Thread(target=base_stream)
        streamer.start()
        for _ in range(3):  # with --max-loras 2, each failure used to leak a slot
            r = c.post("/v1/completions", json={"model": "fragile", "prompt": "hi", "max_tokens": 4})
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "adapter_unavailable" and "fragile" in error["message"]
        for name in ("ad0", "ad1", "filler"):
            r = c.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 4}, timeout=30)
            assert r.status_code == 200, r.text
        streamer.join(60)
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
        assert sum(json.loads(e[6:])["choices"][0]["text"] != "" for e in events[:-1]) > 1


def test_start_up_after_replacing_a_configured_adapter_serves_the_upload(tiny_llama_dir, adapters, tmp_path):
    proc = serve(tiny_llama_dir, tmp_path, {"ad0": adapters["ad0"]})
    try:
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            r = upload(c, "ad0", adapters["ad5"], replace=True)
            assert r.status_code == 201, r.text
            uploaded = r.json()["checksum"]
    finally:
        proc.stop()
    proc = serve(tiny_llama_dir, tmp_path, {"ad0": adapters["ad0"]})  # used to exit with "already exists"
    try:
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            record = c.get("/v1/adapters/ad0").json()
            assert record["checksum"] == uploaded and record["uploaded"]
    finally:
        proc.stop()


def files_checksum(folder: Path) -> str:
    """What the store reports as an adapter's checksum: sha256 over the weights, then the config."""
    return hashlib.sha256((folder / FILES[1]).read_bytes() + (folder / FILES[0]).read_bytes()).hexdigest()


@pytest.mark.slow
def test_kill_9_at_random_points_never_loses_an_acknowledged_adapter(tiny_llama_dir, adapters, tmp_path):
    """50 seeded kills during uploads, replaces and deletes, a restart after each: every acknowledged adapter is
    there with its acknowledged bytes, deleted ones stay deleted, and no half-written folder is visible."""
    rng = random.Random(1234)
    versions = {files_checksum(f): f for f in adapters.values()}
    names = [f"u{i}" for i in range(4)]
    acked: dict[str, str | None] = {}  # name -> checksum acknowledged last (None: deleted)
    pending: list[tuple[str, str | None]] = []  # the operation the kill cut: (name, checksum it would leave)
    store = tmp_path / "store"
    for kill in range(50):
        proc = serve(tiny_llama_dir, tmp_path, {})
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            current = listing(c)
            for name in set(acked) | {n for n, _ in pending} | set(current):
                allowed = {acked.get(name)} | {after for n, after in pending if n == name}
                assert current.get(name) in allowed, (kill, name, current.get(name), allowed)
            for name, checksum in current.items():
                assert files_checksum(store / name) == checksum, (kill, name)
            assert sorted(p.name for p in store.iterdir()) == sorted(current), kill  # nothing half-written
            acked.update({name: current.get(name) for name, _ in pending})  # the kill's outcome is now the truth
            pending.clear()
            op_rng = random.Random(rng.random())

            def operations():
                while True:
                    name = op_rng.choice(names)
                    delete = acked.get(name) is not None and op_rng.random() < 0.3
                    after = None if delete else op_rng.choice(sorted(versions))
                    pending[:] = [(name, after)]
                    try:
                        r = (c.delete(f"/v1/adapters/{name}") if delete else
                             upload(c, name, versions[after], replace=True))
                    except httpx.HTTPError:
                        return  # the kill
                    assert r.status_code in (200, 201), r.text
                    acked[name] = after
                    pending.clear()

            worker = threading.Thread(target=operations)
            worker.start()
            time.sleep(rng.uniform(0.05, 1.0))
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait()
            worker.join(30)
        proc.log.close()
    assert any(acked.values())
