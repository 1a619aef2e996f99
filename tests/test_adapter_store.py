"""The adapter store: paging under pressure, uploads, deletes, restarts, and bad uploads."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest

from loramux.adapters_store import AdapterError
from loramux.adapters_store.synthetic import write_random_adapter
from loramux.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, StoreConfig
from loramux.engine import Engine, RequestError, SamplingParams

GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def store_engine(model_dir: Path, gpu_slots: int, cpu_slots: int, store_dir: Path | None = None,
                 max_adapter_bytes: int = 512 * 2**20) -> Engine:
    return Engine(EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype="float32"),
        cache=CacheConfig(num_blocks=512),
        scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=256, max_loras_per_batch=8),
        store=StoreConfig(max_loras=gpu_slots, max_cpu_loras=cpu_slots, max_lora_rank=16,
                          store_dir=str(store_dir) if store_dir else None, max_adapter_bytes=max_adapter_bytes)))


@pytest.fixture(scope="module")
def fleet(tiny_llama_dir, tmp_path_factory):
    """200 random adapters, ranks 4-16, on different module sets."""
    root = tmp_path_factory.mktemp("fleet")
    engine = store_engine(tiny_llama_dir, 1, 1)
    shapes, layers = engine.shape.lora_target_shapes(), engine.shape.num_layers
    target_sets = [("q_proj", "v_proj"), ("o_proj", "down_proj"), ("gate_proj", "up_proj", "k_proj")]
    return {f"e{i:03d}": write_random_adapter(root / f"e{i:03d}", shapes, layers, rank=(4, 8, 16)[i % 3], seed=i,
                                              targets=target_sets[i % 3], b_std=0.3)
            for i in range(200)}


def run_traffic(engine: Engine, requests, check=None) -> dict[str, list[int]]:
    """Add requests a few per step in the given order; returns tokens per request id."""
    outputs: dict[str, list[int]] = {}
    pending = list(requests)
    while pending or engine.has_unfinished_requests():
        for _ in range(7):
            if pending:
                rid, prompt, mix = pending.pop(0)
                engine.add_request(rid, prompt, GREEDY, mix)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        if check:
            check(engine)
    return outputs


def assert_pins_match_running(engine: Engine) -> None:
    running = Counter(name for seq in engine.scheduler.running for name in seq.adapter_names)
    assert all(name in engine.slots for name in running), "a running sequence's adapter left its slot"
    assert Counter({n: e.pins for n, e in engine.store.lifecycle.entries.items() if e.pins}) == running
    engine.store.lifecycle.check()


def test_zipf_traffic_over_200_adapters_with_8_slots_matches_all_resident(tiny_llama_dir, fleet):
    rng = random.Random(0)
    names = sorted(fleet)
    weights = [1 / (i + 1) for i in range(len(names))]
    words = "one two three four five six seven".split()
    requests = [(f"q{i}", " ".join(rng.choices(words, k=rng.randint(2, 6))), [rng.choices(names, weights)[0]])
                for i in range(500)]
    rng.shuffle(requests)
    paged = store_engine(tiny_llama_dir, gpu_slots=8, cpu_slots=32)
    resident = store_engine(tiny_llama_dir, gpu_slots=200, cpu_slots=200)
    for engine in (paged, resident):
        for name, folder in fleet.items():
            engine.add_adapter(name, str(folder))
    assert resident.store.ensure_resident(frozenset(names))
    expected = run_traffic(resident, requests)
    got = run_traffic(paged, requests, check=assert_pins_match_running)
    assert got == expected
    stats = paged.store.stats
    assert stats.gpu_evictions > 0 and stats.cpu_evictions > 0 and stats.disk_loads > 32
    assert len(paged.slots.slot_of) <= 8
    assert not any(e.pins or e.uses for e in paged.store.lifecycle.entries.values())
    assert paged.blocks.num_free == paged.num_blocks


def test_every_slot_pinned_makes_new_adapters_wait_without_deadlock(tiny_llama_dir, fleet):
    engine = store_engine(tiny_llama_dir, gpu_slots=2, cpu_slots=2)
    for name in ("e000", "e001", "e002"):
        engine.add_adapter(name, str(fleet[name]))
    for i, name in enumerate(("e000", "e001", "e002")):
        engine.add_request(f"r{i}", "hello world", SamplingParams(max_tokens=6, ignore_eos=True), [name])
    engine.step()
    assert {s.request_id for s in engine.scheduler.running} == {"r0", "r1"}  # r2 waits for a slot
    finished = set()
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}
        assert_pins_match_running(engine)
    assert finished == {"r0", "r1", "r2"}


def upload(engine: Engine, name: str, folder: Path, **kwargs):
    return engine.store.register_from_files(name, (folder / "adapter_config.json").read_bytes(),
                                            (folder / "adapter_model.safetensors").read_bytes(), **kwargs)


def test_uploads_survive_restart_and_keep_outputs(tiny_llama_dir, fleet, tmp_path):
    store = tmp_path / "store"
    first = store_engine(tiny_llama_dir, 4, 4, store)
    upload(first, "kept", fleet["e005"], metadata={"description": "d", "examples": ["x"]})
    [[before]] = first.generate(["the same prompt"], GREEDY, [["kept"]])
    second = store_engine(tiny_llama_dir, 4, 4, store)
    record = second.store.get("kept")
    assert (record.description, record.examples, record.uploaded) == ("d", ["x"], True)
    [[after]] = second.generate(["the same prompt"], GREEDY, [["kept"]])
    assert after.new_token_ids == before.new_token_ids


def test_crash_during_upload_leaves_nothing_after_restart(tiny_llama_dir, fleet, tmp_path, monkeypatch):
    store = tmp_path / "store"
    engine = store_engine(tiny_llama_dir, 4, 4, store)
    real_replace = os.replace

    def crash(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        upload(engine, "half", fleet["e006"])
    monkeypatch.setattr(os, "replace", real_replace)
    assert "half" not in engine.store and list(store.iterdir()) == []
    # A process killed mid-write leaves a hidden temp folder; the next start removes it.
    partial = store / ".tmp-half-abc"
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{")
    restarted = store_engine(tiny_llama_dir, 4, 4, store)
    assert "half" not in restarted.store and list(store.iterdir()) == []


def test_delete_while_in_use_lets_requests_finish_then_frees(tiny_llama_dir, fleet, tmp_path):
    store = tmp_path / "store"
    engine = store_engine(tiny_llama_dir, 4, 4, store)
    upload(engine, "gone", fleet["e007"])
    [[expected]] = engine.generate(["a running request"], SamplingParams(max_tokens=8, temperature=0,
                                                                          ignore_eos=True), [["gone"]])
    engine.add_request("live", "a running request", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                       ["gone"])
    tokens = [t for o in engine.step() for t in o.new_token_ids]
    engine.remove_adapter("gone")
    with pytest.raises(RequestError, match="does not exist"):
        engine.add_request("new", "hi", GREEDY, ["gone"])
    # The delete is acknowledged: the folder is out of sight at once (a crash now cannot bring it back),
    # but its files and slot stay until the running request ends.
    assert not (store / "gone").exists() and "gone" in engine.slots
    assert [p.name for p in store.iterdir()] == [p.name for p in store.glob(".del-gone-*")] != []
    while engine.has_unfinished_requests():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
        engine.store.lifecycle.check()
    assert tokens == expected.new_token_ids
    assert list(store.iterdir()) == [] and "gone" not in engine.slots
    upload(engine, "gone", fleet["e008"])  # the name can be used again
    assert engine.store.get("gone").checksum != ""


BAD_NAMES = ["", ".hidden", "a/b", "../escape", "x" * 65, "with space", "..", "name\x00"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_and_nothing_is_written(tiny_llama_dir, fleet, tmp_path, name):
    store = tmp_path / "store"
    engine = store_engine(tiny_llama_dir, 4, 4, store)
    with pytest.raises(AdapterError) as err:
        upload(engine, name, fleet["e000"])
    assert err.value.code == "invalid_name"
    assert list(store.iterdir()) == [] and not list(tmp_path.glob("escape*"))


def test_bad_uploads_leave_registry_and_directory_unchanged(tiny_llama_dir, fleet, tmp_path):
    store = tmp_path / "store"
    engine = store_engine(tiny_llama_dir, 4, 4, store, max_adapter_bytes=60_000)
    upload(engine, "ok", fleet["e000"])
    snapshot = (sorted(engine.store.records), sorted(p.name for p in store.iterdir()),
                (store / "ok" / "adapter_model.safetensors").read_bytes())
    cfg, weights = (fleet["e001"] / "adapter_config.json").read_bytes(), (fleet["e001"] / "adapter_model.safetensors").read_bytes()
    big = write_random_adapter(tmp_path / "big", engine.shape.lora_target_shapes(), 2, 16, 0)
    cases = {
        "already_exists": ("ok", cfg, weights, {}),
        "invalid_weights": ("x1", cfg, b"not safetensors at all", {}),
        "invalid_config": ("x2", b"{broken", weights, {}),
        "too_large": ("x3", (big / "adapter_config.json").read_bytes(),
                      (big / "adapter_model.safetensors").read_bytes(), {}),
        "invalid_metadata": ("x4", cfg, weights, {"examples": "not a list"}),
    }
    for code, (name, c, w, meta) in cases.items():
        with pytest.raises(AdapterError) as err:
            engine.store.register_from_files(name, c, w, meta)
        assert err.value.code == code, (code, str(err.value))
        assert (sorted(engine.store.records), sorted(p.name for p in store.iterdir()),
                (store / "ok" / "adapter_model.safetensors").read_bytes()) == snapshot


def test_rank_over_limit_is_refused_with_the_limit_in_the_message(tiny_llama_dir, tmp_path):
    engine = store_engine(tiny_llama_dir, 4, 4)
    folder = write_random_adapter(tmp_path / "r32", engine.shape.lora_target_shapes(), 2, 32, 0)
    with pytest.raises(AdapterError, match="--max-lora-rank 16"):
        engine.add_adapter("r32", str(folder))


def test_replace_needs_the_flag_and_swaps_weights(tiny_llama_dir, fleet, tmp_path):
    engine = store_engine(tiny_llama_dir, 4, 4, tmp_path / "store")
    upload(engine, "v", fleet["e010"])
    [[old]] = engine.generate(["replace me"], GREEDY, [["v"]])
    upload(engine, "v", fleet["e011"], replace=True)
    [[new]] = engine.generate(["replace me"], GREEDY, [["v"]])
    reference = store_engine(tiny_llama_dir, 4, 4)
    reference.add_adapter("v", str(fleet["e011"]))
    [[expected]] = reference.generate(["replace me"], GREEDY, [["v"]])
    assert new.new_token_ids == expected.new_token_ids != old.new_token_ids


def test_fusions_are_cached_bounded_and_dropped_with_their_experts(tiny_llama_dir, fleet):
    engine = store_engine(tiny_llama_dir, 4, 8)
    engine.store.max_fused = 2
    for name in ("e000", "e001", "e002", "e003"):
        engine.add_adapter(name, str(fleet[name]))
    changes = []
    engine.store.change_listeners.append(lambda name, record: changes.append((name, record is not None)))
    first = engine.store.fuse(["e000", "e001"], [0.5, 0.5])
    assert engine.store.fuse(["e000", "e001"], [0.5, 0.5]) == first  # built once
    assert engine.store.fuse(["e000", "e001"], [0.25, 0.75]) != first
    assert engine.store.get(first).fused_from == ["e000", "e001"] and changes == []
    # A fusion that a request holds survives eviction; an idle one goes first.
    engine.add_request("held", [1, 2, 3], GREEDY, [first])
    third = engine.store.fuse(["e002", "e003"], [0.5, 0.5])
    assert first in engine.store and third in engine.store
    assert len([n for n in engine.store.records if n.startswith("fusion-")]) == 2
    fourth = engine.store.fuse(["e001", "e002"], [0.5, 0.5])  # the held one is the oldest, the idle one goes
    assert first in engine.store and fourth in engine.store and third not in engine.store
    third = engine.store.fuse(["e002", "e003"], [0.5, 0.5])
    while engine.has_unfinished_requests():
        engine.step()
    engine.remove_adapter("e003")  # its fusions go with it
    assert third not in engine.store and first in engine.store
    assert changes[0] == ("e003", False)
    stats_before = engine.store.stats.deletions
    engine.add_adapter("e000", str(fleet["e002"]), replace=True)  # new weights: the old fusion is stale
    assert first not in engine.store and engine.store.stats.deletions == stats_before
    assert changes[-1] == ("e000", True)
