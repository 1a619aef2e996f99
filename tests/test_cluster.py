"""`serve-cluster` on a local Ray cluster: two CPU replicas of a tiny model behind the ingress.

Affinity (an adapter's requests land on the replica that served it first),
equality with one engine (32 concurrent streams over 8 adapters, greedy,
through the official `openai` client), per-replica metrics, and a replica
killed mid-run. Ray starts and stops inside the module; everything listens
on loopback only.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import openai
import pytest

from loramux.adapters_store.synthetic import write_random_adapter
from loramux.config import (CacheConfig, ClusterConfig, EngineConfig, ModelConfig, RouterConfig, SchedulerConfig,
                            ServerConfig, StoreConfig)
from loramux.engine import Engine, SamplingParams
from tests.conftest import metric_values
from loadtest.server_process import free_port

pytestmark = pytest.mark.slow  # a Ray cluster and two engine processes: about a minute on 2 cores

ADAPTERS = [f"expert{i}" for i in range(8)]


def engine_config(model_dir, adapters: dict[str, str]) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype="float32"),  # cluster == one engine: no bf16 batch effects
        cache=CacheConfig(num_blocks=512, block_size=16),
        scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=256, max_loras_per_batch=8),
        store=StoreConfig(max_loras=8, max_lora_rank=16, adapters=adapters),
        router=RouterConfig(enabled=False))


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-adapters")
    probe = Engine(engine_config(tiny_llama_dir, {}))
    shapes, layers = probe.shape.lora_target_shapes(), probe.shape.num_layers
    return {name: str(write_random_adapter(root / name, shapes, layers, rank=8, seed=i, b_std=0.5))
            for i, name in enumerate(ADAPTERS)}


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir, adapter_dirs):
    from loramux.cluster import start_cluster, stop_cluster

    url = start_cluster(engine_config(tiny_llama_dir, adapter_dirs), ServerConfig(port=free_port()),
                        ClusterConfig(num_replicas=2, num_cpus_per_replica=0.5, metrics_report_seconds=0.5),
                        num_cpus=2)
    try:
        yield url
    finally:
        stop_cluster()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, adapter_dirs):
    return Engine(engine_config(tiny_llama_dir, adapter_dirs))


def complete(url: str, model: str, prompt: list[int], max_tokens: int = 4) -> httpx.Response:
    response = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response


def test_requests_for_an_adapter_stay_on_the_replica_that_served_it(cluster):
    first = {name: complete(cluster, name, [3, 4, 5]).headers["x-loramux-replica"] for name in ADAPTERS}
    time.sleep(1.0)  # replicas push the adapters they hold to the Serve controller asynchronously
    for _ in range(3):
        for name in ADAPTERS:
            assert complete(cluster, name, [7, 8, 9, 10]).headers["x-loramux-replica"] == first[name], name
    assert len(set(first.values())) == 2  # new adapters go to the replica holding fewer
    # Per-replica metrics: each adapter is resident exactly on its replica, and both replicas report.
    time.sleep(1.0)
    metrics = metric_values(type("Server", (), {"url": cluster}))
    resident = {dict(labels)["adapter"]: dict(labels)["replica"]
                for (name, labels), value in metrics.items() if name == "loramux_adapter_resident" and value == 1}
    assert resident == first
    served = {dict(labels)["replica"]: value for (name, labels), value in metrics.items()
              if name == "loramux_requests_total" and dict(labels).get("status") == "success"}
    assert set(served) == set(first.values()) and sum(served.values()) == 4 * len(ADAPTERS)


def test_adapter_changes_need_a_shared_store(cluster, adapter_dirs):
    r = httpx.delete(cluster + "/v1/adapters/" + ADAPTERS[0])
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_shared_store"
    listed = httpx.get(cluster + "/v1/adapters").json()["data"]
    assert ADAPTERS[0] in {a["name"] for a in listed}


def test_32_concurrent_streams_over_8_adapters_equal_one_engine(cluster, reference):
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 40000) for _ in range(rng.randrange(3, 20))] for _ in range(32)]
    names = [ADAPTERS[i % 8] for i in range(32)]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = [outs[0].new_text for outs in reference.generate(prompts, greedy, [[n] for n in names])]
    client = openai.AsyncOpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def stream(prompt, name):
        chunks = await client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in chunks if c.choices])

    async def run_all():
        return await asyncio.gather(*(stream(p, n) for p, n in zip(prompts, names)))

    assert asyncio.run(run_all()) == expected


def test_a_replica_killed_mid_run_fails_only_its_streams_clearly(cluster):
    import ray

    replica_of = {name: complete(cluster, name, [3, 4, 5]).headers["x-loramux-replica"] for name in ADAPTERS}
    victim = replica_of[ADAPTERS[0]]
    client = openai.AsyncOpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0, timeout=120)
    started: list[asyncio.Event] = []

    async def stream(name, ready: asyncio.Event):
        response = await client.completions.with_raw_response.create(
            model=name, prompt=[11, 12, 13], max_tokens=400, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        replica, chunks, finish = response.headers["x-loramux-replica"], 0, None
        try:
            async for chunk in response.parse():
                chunks += 1
                finish = chunk.choices[0].finish_reason if chunk.choices else finish
                if chunks == 5:
                    ready.set()
        except openai.APIError as exc:
            ready.set()
            return replica, finish, str(exc)
        return replica, finish, None

    async def run():
        tasks = []
        for name in ADAPTERS * 2:
            started.append(asyncio.Event())
            tasks.append(asyncio.create_task(stream(name, started[-1])))
        await asyncio.gather(*(e.wait() for e in started))
        actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"])
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    on_victim = [r for r in results if r[0] == victim]
    others = [r for r in results if r[0] != victim]
    assert on_victim and others
    for replica, finish, error in others:
        assert error is None and finish == "length", (replica, finish, error)
    for replica, finish, error in on_victim:
        assert error is not None and "failed mid-stream" in error and finish is None, (replica, finish, error)
    # New requests for the victim's adapters are served (by the survivor, or by the victim's replacement).
    assert complete(cluster, ADAPTERS[0], [3, 4, 5]).headers["x-loramux-replica"] != victim
