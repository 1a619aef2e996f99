"""The adapter lifecycle state machine and what the engine does around it.

Invariants under random operations; failed page-ins and failing steps that
hurt only their own requests; a bounded wait for a slot; a prefix cache that
follows a replace; crash recovery of the store directory; reserved names.
"""

from __future__ import annotations

import random
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from loramux.adapters_store import AdapterError
from loramux.adapters_store.lifecycle import Phase, Tier
from loramux.adapters_store.synthetic import write_random_adapter
from loramux.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, StoreConfig
from loramux.engine import Engine, RequestError, SamplingParams
from tests.test_adapter_store import GREEDY, store_engine, upload


@pytest.fixture(scope="module")
def folders(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    engine = store_engine(tiny_llama_dir, 1, 1)
    shapes, layers = engine.shape.lora_target_shapes(), engine.shape.num_layers
    return {f"a{i}": write_random_adapter(root / f"a{i}", shapes, layers, rank=8, seed=50 + i, b_std=0.3)
            for i in range(8)}


def test_invariants_hold_under_random_operations(tiny_llama_dir, folders, tmp_path):
    """Uploads, replaces, deletes, fusions and traffic in a seeded random order; `check` after every operation."""
    engine = store_engine(tiny_llama_dir, gpu_slots=3, cpu_slots=2, store_dir=tmp_path / "store")
    store, rng = engine.store, random.Random(7)
    names, live = sorted(folders), set()
    engine.store.max_fused = 2
    for step in range(300):
        op = rng.choice(["upload", "replace", "delete", "request", "request", "fuse", "step", "step", "abort"])
        name = rng.choice(names)
        try:
            if op == "upload":
                upload(engine, name, folders[name])
            elif op == "replace":
                upload(engine, name, folders[rng.choice(names)], replace=True)
            elif op == "delete":
                engine.remove_adapter(name)
            elif op == "request":
                engine.add_request(f"r{step}", [1, 2, 3, rng.randrange(100)], SamplingParams(
                    max_tokens=rng.randint(1, 6), temperature=0, ignore_eos=True), [name])
            elif op == "fuse" and len(live) >= 2:
                experts = rng.sample(sorted(live), 2)
                engine.add_request(f"r{step}", [4, 5, 6], GREEDY, [store.fuse(experts, [0.5, 0.5])])
            elif op == "abort":
                engine.abort(f"r{rng.randrange(max(step, 1))}")
            else:
                engine.step()
        except (AdapterError, RequestError):
            pass
        live = {n for n in store.records if not n.startswith("fusion-")}
        store.lifecycle.check()
        on_disk = {p.name for p in (tmp_path / "store").iterdir() if not p.name.startswith(".")}
        assert on_disk == live, (op, name)
    while engine.has_unfinished_requests():
        engine.step()
        store.lifecycle.check()
    entries = store.lifecycle.entries.values()
    assert not any(e.uses or e.pins or e.phase is Phase.DELETING for e in entries)
    assert not list((tmp_path / "store").glob(".del-*"))


def test_a_failed_page_in_fails_only_its_requests_and_gives_the_slot_back(tiny_llama_dir, folders, tmp_path):
    engine = store_engine(tiny_llama_dir, gpu_slots=2, cpu_slots=1)
    fragile = shutil.copytree(folders["a0"], tmp_path / "fragile")
    engine.add_adapter("fragile", str(fragile))
    engine.add_adapter("good", str(folders["a1"]))  # pushes fragile out of the CPU tier: it pages from disk
    assert engine.store.tier("fragile") == "disk"
    (fragile / "adapter_model.safetensors").unlink()
    long = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    [[expected]] = engine.generate(["base model text"], long)
    engine.add_request("base", "base model text", long)
    engine.step()
    for i in range(3):
        engine.add_request(f"bad{i}", "hi", GREEDY, ["fragile"])
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        engine.store.lifecycle.check()
    for i in range(3):
        [out] = outputs[f"bad{i}"]
        assert out.finish_reason == "error" and out.error_code == "adapter_unavailable"
        assert "fragile" in out.error and "cannot be read" in out.error
    assert [t for o in outputs["base"] for t in o.new_token_ids] == expected.new_token_ids[1:]
    assert sorted(engine.slots.free_slots) == [0, 1]  # no slot leaked
    [[good]] = engine.generate(["hi"], GREEDY, [["good"]])
    assert good.finish_reason == "length"


def test_a_step_that_raises_fails_only_the_request_that_caused_it(tiny_llama_dir, monkeypatch):
    """Fault injection: the forward pass raises whenever one poisoned token is in the batch."""
    engine = store_engine(tiny_llama_dir, 2, 2)
    prompts = {"a": [5, 6, 7], "b": [8, 9, 10, 11], "poison": [12, 999, 13], "c": [14, 15]}
    clean = [rid for rid in prompts if rid != "poison"]
    expected = {rid: out.new_token_ids for rid, [out] in zip(clean, engine.generate([prompts[r] for r in clean],
                                                                                     GREEDY))}
    real_forward = engine.model.forward

    def faulty(input_ids, *args, **kwargs):
        if (input_ids == 999).any():
            raise RuntimeError("device fault")
        return real_forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", faulty)
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, GREEDY)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    [failed] = outputs.pop("poison")
    assert failed.finish_reason == "error" and failed.error_code == "engine_error" and "device fault" in failed.error
    for rid, outs in outputs.items():
        assert [t for o in outs for t in o.new_token_ids] == expected[rid] and outs[-1].finish_reason == "length"
    assert engine.blocks.num_used == 0 and not engine.scheduler.suspects


def test_a_request_waiting_for_a_slot_gets_the_next_freed_one(tiny_llama_dir, folders):
    """Two slots, two popular adapters with overlapping requests that always keep both pinned: the rare one
    used to be passed over for as long as the traffic lasted."""
    engine = store_engine(tiny_llama_dir, gpu_slots=2, cpu_slots=4)
    for name in ("a0", "a1", "a2"):
        engine.add_adapter(name, str(folders[name]))
    long = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.add_request("p0", [1, 2], long, ["a0"])
    engine.add_request("p1", [1, 2], long, ["a1"])
    engine.step()
    engine.add_request("rare", [3, 4], long, ["a2"])
    rare_started = None
    for step in range(60):
        for name in ("a0", "a1"):  # a new request for each popular adapter every step
            engine.add_request(f"{name}-{step}", [1, 2, step], long, [name])
        engine.step()
        if rare_started is None and any(s.request_id == "rare" for s in engine.scheduler.running):
            rare_started = step
    assert rare_started is not None and rare_started <= long.max_tokens + 1


def test_the_prefix_cache_serves_the_new_version_after_a_replace(tiny_llama_dir, folders, tmp_path):
    engine = store_engine(tiny_llama_dir, 4, 4, tmp_path / "store")
    prompt = list(range(10, 50))  # 40 tokens: two full 16-token blocks are cached
    upload(engine, "v", folders["a3"])
    [[old]] = engine.generate([prompt], GREEDY, [["v"]])
    upload(engine, "v", folders["a4"], replace=True)
    [[new]] = engine.generate([prompt], GREEDY, [["v"]])
    reference = store_engine(tiny_llama_dir, 4, 4)
    reference.add_adapter("v", str(folders["a4"]))
    [[expected]] = reference.generate([prompt], GREEDY, [["v"]])
    assert new.new_token_ids == expected.new_token_ids != old.new_token_ids
    [[again]] = engine.generate([prompt], GREEDY, [["v"]])  # the new version's blocks are reused
    assert again.new_token_ids == expected.new_token_ids and engine.blocks.prefix_hit_tokens >= 32


def test_a_replace_that_changes_only_the_config_is_a_new_adapter_for_the_prefix_cache(tiny_llama_dir, folders,
                                                                                      tmp_path):
    """Same weights, another lora_alpha: another scale, so the old version's cached blocks must not be served."""
    tripled = tmp_path / "tripled"
    shutil.copytree(folders["a3"], tripled)
    config = json.loads((tripled / "adapter_config.json").read_text())
    config["lora_alpha"] *= 3
    (tripled / "adapter_config.json").write_text(json.dumps(config))
    engine = store_engine(tiny_llama_dir, 4, 4, tmp_path / "store")
    prompt = list(range(10, 50))
    upload(engine, "v", folders["a3"])
    [[old]] = engine.generate([prompt], GREEDY, [["v"]])
    upload(engine, "v", tripled, replace=True)
    [[new]] = engine.generate([prompt], GREEDY, [["v"]])
    reference = store_engine(tiny_llama_dir, 4, 4)
    reference.add_adapter("v", str(tripled))
    [[expected]] = reference.generate([prompt], GREEDY, [["v"]])
    assert new.new_token_ids == expected.new_token_ids != old.new_token_ids


def test_a_replace_cut_between_its_renames_recovers_the_acknowledged_version(tiny_llama_dir, folders, tmp_path):
    store = tmp_path / "store"
    engine = store_engine(tiny_llama_dir, 4, 4, store)
    upload(engine, "kept", folders["a5"])
    upload(engine, "done", folders["a5"])
    acknowledged = (store / "kept" / "adapter_model.safetensors").read_bytes()
    # The state a kill -9 leaves between the renames of `commit_adapter_dir`: the old version set aside,
    # the new one still staged; and for "done", a replace cut after its second rename.
    (store / "kept").rename(store / ".old-kept")
    shutil.copytree(folders["a6"], store / ".tmp-kept-x")
    shutil.copytree(folders["a6"], store / ".old-done")
    restarted = store_engine(tiny_llama_dir, 4, 4, store)
    assert sorted(restarted.store.records) == ["done", "kept"]
    assert (store / "kept" / "adapter_model.safetensors").read_bytes() == acknowledged
    assert sorted(p.name for p in store.iterdir()) == ["done", "kept"]


def test_reserved_names_are_refused(tiny_llama_dir, folders, tmp_path):
    engine = store_engine(tiny_llama_dir, 4, 4, tmp_path / "store")
    for name in ("auto", engine.model_id):
        with pytest.raises(AdapterError) as err:
            upload(engine, name, folders["a0"])
        assert err.value.code == "invalid_name" and "reserved" in str(err.value)
    assert engine.store.records == {} and list((tmp_path / "store").iterdir()) == []


def test_uploads_are_prepared_off_the_engine_thread(tiny_llama_dir, tmp_path):
    """prepare_upload (parse, sha256, cast, write, fsync) runs on a worker while the engine steps; install,
    the only part on the engine thread, is a small fraction of the work."""
    engine = store_engine(tiny_llama_dir, 4, 4, tmp_path / "store")
    big = write_random_adapter(tmp_path / "big", engine.shape.lora_target_shapes(), engine.shape.num_layers,
                               rank=16, seed=1)
    config, weights = (big / "adapter_config.json").read_bytes(), (big / "adapter_model.safetensors").read_bytes()
    engine.add_request("busy", [1, 2, 3], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    result = {}

    def prepare():
        start = time.perf_counter()
        result["prepared"] = engine.store.prepare_upload("big", config, weights)
        result["seconds"] = time.perf_counter() - start

    worker = threading.Thread(target=prepare)
    worker.start()
    steps = 0
    while worker.is_alive() or engine.has_unfinished_requests():
        steps += bool(engine.step())
    worker.join()
    assert "big" not in engine.store and not (tmp_path / "store" / "big").exists()  # staged, not visible
    start = time.perf_counter()
    engine.store.install(result["prepared"])
    install_seconds = time.perf_counter() - start
    assert engine.store.tier("big") == "cpu" and (tmp_path / "store" / "big" / "adapter_model.safetensors").exists()
    assert install_seconds < result["seconds"] and steps == 30
    assert [p.name for p in Path(tmp_path / "store").iterdir()] == ["big"]
    assert engine.store.lifecycle["big"].tier is Tier.CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paging_on_cuda_streams_matches_all_resident(tiny_llama_dir, folders):
    """Two slots for eight adapters: every step evicts and pages in while the previous step may still run on
    the compute stream; the side stream's ordering must make that invisible."""
    def cuda_engine(slots: int) -> Engine:
        return Engine(EngineConfig(
            model=ModelConfig(model=str(tiny_llama_dir), device="cuda", dtype="float32", enforce_eager=True),
            cache=CacheConfig(num_blocks=256), scheduler=SchedulerConfig(max_num_seqs=16, max_loras_per_batch=2),
            store=StoreConfig(max_loras=slots, max_cpu_loras=8, max_lora_rank=16,
                              adapters={name: str(folder) for name, folder in folders.items()})))

    names = sorted(folders)
    prompts = [[1 + i, 2 + i, 3 + i] for i in range(40)]
    mixes = [[names[i % len(names)]] for i in range(40)]
    sampling = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    paged, resident = cuda_engine(2), cuda_engine(8)
    expected = [o[0].new_token_ids for o in resident.generate(prompts, sampling, mixes)]
    assert [o[0].new_token_ids for o in paged.generate(prompts, sampling, mixes)] == expected
    assert paged.store.stats.gpu_evictions > 0
