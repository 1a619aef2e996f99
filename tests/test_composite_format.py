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
            engine.composites.gate_weight.clone(), sorted(p.name for p in engine.store.store_dir.iterdir()),
            list(engine.composites.scale_pool._free))


def assert_same(before, after):
    assert before[:3] == after[:3] and before[4:] == after[4:]
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
    assert [n for n in engine.store.records if n.startswith("up.")] == ["up.shared"]  # one member, one slot
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
        engine.remove_adapter("mine.shared")
    assert err.value.code == "in_use" and "mine.shared" in engine.store
    engine.remove_adapter("mine")
    assert "mine.shared" not in engine.store


def test_members_built_in_memory_are_lifecycle_entries_keyed_by_content(setup):
    """MoR's shared member lives in the store's state machine: at the CPU tier whatever the CPU bound, never on
    disk, hidden from the router; a second composite with the same files gets a member with the same checksum."""
    engine, root = setup
    store = engine.store
    engine.add_adapter("twin-a", str(root / "mor"))
    engine.add_adapter("twin-b", str(root / "mor"))
    try:
        entries = {n: store.lifecycle[n] for n in store.records if n.startswith("twin-")}
        assert sorted(entries) == ["twin-a.shared", "twin-b.shared"]
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


def test_a_mor_composite_takes_one_slot_and_pool_rows_that_its_deletion_frees(setup):
    """The shared A/B are one store member (one slot once used); each expert's λ_A / λ_B sit in its row of every
    LoRA linear's pools; deleting the composite frees the rows, and the next MoR composite takes them again."""
    engine, root = setup
    pool = engine.composites.scale_pool
    free_before = pool.num_free
    record = engine.composites.register_path("pooled", root / "mor")
    assert record.members == ["pooled.expert0", "pooled.expert1", "pooled.expert2"] and record.shared == "pooled.shared"
    assert [n for n in engine.store.records if n.startswith("pooled")] == ["pooled.shared"]
    assert pool.num_free == free_before - 3 and len(set(record.scale_rows)) == 3
    tensors = load_file(root / "mor" / "composite.safetensors")
    layer, qkv = engine.model.lora_linears()[0]
    for expert, row in enumerate(record.scale_rows):  # q_proj is the first sub-projection of the fused q/k/v
        lambda_a, lambda_b = (tensors[f"layers.{layer}.q_proj.lambda_{ab}"][expert] for ab in "AB")
        assert torch.equal(qkv.rank_scale[row, :lambda_a.shape[0]], lambda_a)
        assert torch.equal(qkv.rank_scale[row, lambda_a.shape[0]:qkv.r_max], torch.ones(qkv.r_max - lambda_a.shape[0]))
        assert torch.equal(qkv.out_scale[row, :lambda_b.shape[0]], lambda_b)
    assert torch.equal(qkv.rank_scale[-1], torch.ones_like(qkv.rank_scale[-1]))  # the row of "no scaling"
    ids = engine.tokenizer.encode("one two", add_special_tokens=False)
    engine.generate([ids], None, [["pooled"]])
    assert [n for n in engine.slots.slot_of if n.startswith("pooled")] == ["pooled.shared"]
    rows = list(record.scale_rows)
    engine.remove_adapter("pooled")
    assert pool.num_free == free_before
    assert engine.composites.register_path("pooled-again", root / "mor").scale_rows == rows
    engine.remove_adapter("pooled-again")
    assert pool.num_free == free_before


def test_replacing_a_mor_composite_reuses_its_pool_rows_and_shared_member(setup):
    engine, root = setup
    pool = engine.composites.scale_pool
    free_before = pool.num_free
    rows = engine.composites.register_path("renewed", root / "mor").scale_rows
    ids = engine.tokenizer.encode("one two", add_special_tokens=False)
    first = engine.generate([ids], None, [["renewed"]])[0][0].new_token_ids
    record = engine.composites.register_path("renewed", root / "mor", replace=True)
    try:
        assert sorted(record.scale_rows) == sorted(rows) and pool.num_free == free_before - len(rows)
        assert [n for n in engine.store.records if n.startswith("renewed")] == ["renewed.shared"]
        assert engine.generate([ids], None, [["renewed"]])[0][0].new_token_ids == first  # the same weights again
    finally:
        engine.remove_adapter("renewed")
    assert pool.num_free == free_before


def test_mor_is_refused_when_the_pool_is_full(tiny_llama_dir, setup):
    _, root = setup
    engine = make_engine(tiny_llama_dir, max_mor_experts=5)
    engine.composites.store_dir = engine.store.store_dir = root / "store-small-pool"
    engine.store.store_dir.mkdir()
    engine.add_adapter("first", str(root / "mor"))  # 3 of the 5 rows
    before = state(engine)
    with pytest.raises(AdapterError, match="at most 5 MoR experts") as err:
        engine.add_adapter("second", str(root / "mor"))
    assert err.value.code == "too_many_mor_experts"
    assert_same(before, state(engine))
    engine.add_adapter("more-ok", str(root / "more"))  # MoRE takes no rows
    engine.remove_adapter("first")
    engine.add_adapter("second", str(root / "mor"))
    assert engine.composites.scale_pool.num_free == 2
