"""Every bad composite folder or upload gets its own error and leaves the store and the registry as they were."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.adapters_store import AdapterError
from loramux.adapters_store.lifecycle import Tier
from loramux.composites.synthetic import write_random_mole, write_random_mor, write_random_more
from tests.conftest import make_engine, make_peft_adapter

SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
          "gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96)}


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-composites")
    for i, name in enumerate(("m0", "m1")):
        make_peft_adapter(tiny_llama_dir, root / name, 4, 8, ["q_proj", "v_proj"], seed=i)
    engine = make_engine(tiny_llama_dir, adapters={n: str(root / n) for n in ("m0", "m1")})
    engine.composites.store_dir = engine.store.store_dir = root / "store"
    (root / "store").mkdir()
    write_random_mole(root / "mole", ["m0", "m1"], 2, 64, seed=0)
    write_random_mor(root / "mor", SHAPES, 2, 64, num_experts=3, rank=4, seed=1)
    write_random_more(root / "more", SHAPES, 2, rank=8, rank_choices=[2, 8], tasks=["a", "b"], seed=2)
    return engine, root


def edit_config(**changes):
    def edit(folder):
        cfg = json.loads((folder / "loramux_composite.json").read_text())
        cfg.update(changes)
        (folder / "loramux_composite.json").write_text(json.dumps(cfg))
    return edit


def edit_tensor(key, fn):
    def edit(folder):
        tensors = load_file(folder / "composite.safetensors")
        result = fn(tensors.pop(key))
        if result is not None:
            tensors[key] = result.contiguous()
        save_file(tensors, folder / "composite.safetensors")
    return edit


def add_tensor(key):
    def edit(folder):
        save_file(load_file(folder / "composite.safetensors") | {key: torch.ones(2, 64)},
                  folder / "composite.safetensors")
    return edit


def write_bytes(filename, data):
    return lambda folder: (folder / filename).write_bytes(data)


def nan_at_zero(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


BAD = [
    ("mole", write_bytes("loramux_composite.json", b"{not json"), "invalid_config", "not valid JSON"),
    ("mole", edit_config(type="moe"), "unsupported_type", "type must be one of"),
    ("mole", edit_config(members=["m0", "nope"]), "member_not_found", "'nope' of composite"),
    ("mole", edit_config(members=["m0"]), "invalid_config", "at least 2"),
    ("mole", edit_config(members=["m0", "m0"]), "invalid_config", "appears twice"),
    ("mole", edit_config(members=["m0", {"name": "x", "path": "../m0"}]), "member_not_found", "inside the composite"),
    ("mole", edit_config(gate={"granularity": "token"}), "invalid_config", "granularity"),
    ("mole", edit_config(gate={"top_k": 3}), "invalid_config", "top_k"),
    ("mole", edit_config(card={"description": 5}), "invalid_metadata", "description"),
    ("mole", write_bytes("composite.safetensors", b"garbage"), "invalid_weights", "not a valid safetensors"),
    ("mole", edit_tensor("layers.1.gate.weight", lambda t: t[:, :32]), "shape_mismatch", "layers.1.gate.weight"),
    ("mole", edit_tensor("layers.0.gate.weight", nan_at_zero), "non_finite_weights", "NaN"),
    ("mole", edit_tensor("layers.0.gate.weight", lambda t: t.to(torch.int32)), "invalid_weights",
     "floating point"),
    ("mole", edit_tensor("layers.0.gate.temperature", lambda t: -t), "invalid_config", "must be positive"),
    ("mole", edit_tensor("layers.1.gate.weight", lambda t: None), "invalid_weights", "no tensor"),
    ("mole", add_tensor("layers.5.gate.weight"), "invalid_weights", "unexpected tensor"),
    ("mor", edit_config(rank=128), "invalid_config", "rank must be"),
    ("mor", edit_config(num_experts=20), "invalid_config", "num_experts"),
    ("mor", edit_config(target_modules=["lm_head"]), "invalid_config", "target_modules"),
    ("mor", edit_tensor("layers.0.q_proj.lambda_B", lambda t: t[:, :10]), "shape_mismatch", "lambda_B"),
    ("mor", edit_tensor("layers.1.v_proj.lambda_A", lambda t: None), "invalid_weights", "lambda_A"),
    ("mor", edit_tensor("layers.0.q_proj.lora_A", lambda t: t * float("inf")), "non_finite_weights", "lora_A"),
    ("more", edit_config(rank_choices=[2, 16]), "invalid_config", "rank_choices"),
    ("more", edit_config(tasks=["a", "a"]), "invalid_config", "distinct"),
    ("more", edit_config(default_task="z"), "invalid_config", "default_task"),
    ("more", edit_tensor("task_embeddings", lambda t: t[:1]), "shape_mismatch", "one row per task"),
    ("more", edit_tensor("layers.0.up_proj.selector", lambda t: t[:1]), "shape_mismatch", "selector"),
    ("more", add_tensor("layers.0.gate.weight"), "invalid_weights", "not used by a more composite"),
]


def state(engine):
    return (sorted(engine.store.records), sorted(engine.composites.records), list(engine.composites._free_gates),
            engine.composites.gate_weight.clone(), sorted(p.name for p in engine.store.store_dir.iterdir()))


def assert_same(before, after):
    assert before[:3] == after[:3] and before[4] == after[4]
    assert torch.equal(before[3], after[3])


@pytest.mark.parametrize("kind, edit, code, message", BAD, ids=[f"{b[0]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_composite_is_refused_and_nothing_changes(setup, tmp_path, kind, edit, code, message):
    engine, root = setup
    folder = tmp_path / "bad"
    shutil.copytree(root / kind, folder)
    edit(folder)
    before = state(engine)
    with pytest.raises(AdapterError, match=message) as err:
        engine.add_adapter("bad", str(folder))
    assert err.value.code == code
    assert_same(before, state(engine))
    if message == "inside the composite":
        return  # members shipped inside need a folder; an upload is refused for that reason instead
    with pytest.raises(AdapterError) as err:  # the same bytes uploaded: same error, nothing written
        engine.composites.register_from_files("bad", (folder / "loramux_composite.json").read_bytes(),
                                              (folder / "composite.safetensors").read_bytes())
    assert err.value.code == code
    assert_same(before, state(engine))


def test_limits_and_names(setup, tmp_path):
    engine, root = setup
    before = state(engine)
    for name, code in [("m0", "already_exists"), ("bad/name", "invalid_name")]:
        with pytest.raises(AdapterError) as err:
            engine.add_adapter(name, str(root / "mole"))
        assert err.value.code == code
    engine.composites.base = type(engine.composites.base)(**{**engine.composites.base.__dict__, "max_members": 2})
    try:
        with pytest.raises(AdapterError) as err:
            engine.add_adapter("big", str(root / "mor"))
        assert err.value.code == "invalid_config"  # num_experts 3 > 2 members
    finally:
        engine.composites.base = type(engine.composites.base)(**{**engine.composites.base.__dict__,
                                                                 "max_members": 8})
    assert_same(before, state(engine))


def test_upload_is_written_and_deleted(setup):
    engine, root = setup
    record = engine.composites.register_from_files(
        "up", (root / "mor" / "loramux_composite.json").read_bytes(),
        (root / "mor" / "composite.safetensors").read_bytes())
    assert (engine.store.store_dir / "up" / "composite.safetensors").is_file() and record.uploaded
    assert [n for n in engine.store.records if n.startswith("up.")] == ["up.expert0", "up.expert1", "up.expert2"]
    engine.remove_adapter("up")
    assert not (engine.store.store_dir / "up").exists() and "up" not in engine.composites
    assert not [n for n in engine.store.records if n.startswith("up.")]


def test_gate_rows_run_out(setup):
    engine, root = setup
    capacity = len(engine.composites._free_gates)
    for i in range(capacity):
        engine.add_adapter(f"g{i}", str(root / "mole"))
    before = state(engine)
    with pytest.raises(AdapterError) as err:
        engine.add_adapter("one-more", str(root / "mole"))
    assert err.value.code == "too_many_composites"
    assert_same(before, state(engine))
    engine.add_adapter("more-ok", str(root / "more"))  # MoRE has no gate: it still fits
    for i in range(capacity):
        engine.remove_adapter(f"g{i}")
    engine.remove_adapter("more-ok")
    assert len(engine.composites._free_gates) == capacity


def test_a_derived_member_is_deleted_only_with_its_composite(setup):
    engine, root = setup
    engine.add_adapter("mine", str(root / "mor"))
    with pytest.raises(AdapterError, match="belongs to composite 'mine'") as err:
        engine.remove_adapter("mine.expert1")
    assert err.value.code == "in_use" and "mine.expert1" in engine.store
    engine.remove_adapter("mine")
    assert "mine.expert1" not in engine.store


def test_members_built_in_memory_are_lifecycle_entries_keyed_by_content(setup):
    """MoR experts live in the store's state machine: at the CPU tier whatever the CPU bound, never on disk,
    hidden from the router; a second composite with the same files gets members with the same checksums."""
    engine, root = setup
    store = engine.store
    engine.add_adapter("twin-a", str(root / "mor"))
    engine.add_adapter("twin-b", str(root / "mor"))
    try:
        entries = {n: store.lifecycle[n] for n in store.records if n.startswith("twin-")}
        assert len(entries) == 6
        for name, entry in entries.items():
            assert entry.in_memory and entry.record.member_of == name.split(".")[0] and entry.record.path == ""
            assert entry.tier >= Tier.CPU  # nothing to read back from disk
        store.lifecycle.max_cpu = 0  # the bound evicts only adapters with files
        store.lifecycle._enforce_cpu_bound()
        store.lifecycle.check()
        assert all(e.weights is not None for e in entries.values())
        checksums = {n.split(".", 1)[1]: [] for n in entries}
        for name, entry in entries.items():
            checksums[name.split(".", 1)[1]].append(entry.record.checksum)
        assert all(a == b for a, b in checksums.values())  # same content, same identity
        assert len({a for a, _ in checksums.values()}) == 3  # the experts differ
    finally:
        store.lifecycle.max_cpu = engine.config.store.max_cpu_loras
        engine.remove_adapter("twin-a")
        engine.remove_adapter("twin-b")
    assert not [n for n in store.lifecycle.entries if n.startswith("twin-")]
    store.lifecycle.check()


def test_an_adapter_cannot_take_a_composites_name(setup):
    engine, root = setup
    engine.add_adapter("shared-name", str(root / "more"))
    try:
        before = state(engine)
        with pytest.raises(AdapterError, match="name of a composite expert") as err:
            engine.add_adapter("shared-name", str(root / "m0"), replace=True)
        assert err.value.code == "already_exists"
        assert_same(before, state(engine))
    finally:
        engine.remove_adapter("shared-name")
