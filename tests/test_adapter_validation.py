"""Malformed or unsupported adapters are refused with their own error, and nothing changes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.adapters_store import AdapterError
from tests.conftest import make_engine, make_peft_adapter


@pytest.fixture(scope="module")
def good_adapter(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("good"), 8, 16, ["q_proj", "v_proj"], seed=0)


def edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(folder, fn):
    tensors = load_file(folder / "adapter_model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


def first_key(tensors, part):
    return next(k for k in tensors if part in k)


CASES = {
    "missing_config": (lambda f: (f / "adapter_config.json").unlink(), "not_found"),
    "malformed_json": (lambda f: (f / "adapter_config.json").write_text("{not json"), "invalid_config"),
    "config_not_object": (lambda f: (f / "adapter_config.json").write_text("[1, 2]"), "invalid_config"),
    "garbage_safetensors": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10),
                            "invalid_weights"),
    "dora": (lambda f: edit_config(f, use_dora=True), "unsupported_option"),
    "bias": (lambda f: edit_config(f, bias="all"), "unsupported_option"),
    "lm_head_target": (lambda f: edit_config(f, target_modules=["q_proj", "lm_head"]), "unsupported_target"),
    "rank_pattern": (lambda f: edit_config(f, rank_pattern={"q_proj": 4}), "unsupported_option"),
    "not_lora": (lambda f: edit_config(f, peft_type="IA3"), "unsupported_option"),
    "rank_over_limit": (lambda f: edit_config(f, r=128), "rank_too_large"),
    "shape_mismatch": (lambda f: edit_config(f, r=4), "shape_mismatch"),
    "nan_weights": (lambda f: edit_tensors(f, lambda t: t[first_key(t, "lora_A")].fill_(float("nan"))),
                    "non_finite_weights"),
    "missing_b": (lambda f: edit_tensors(f, lambda t: t.pop(first_key(t, "lora_B"))), "invalid_weights"),
    "embedding_tensor": (lambda f: edit_tensors(
        f, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 10)})),
        "unsupported_option"),
    # Python's json reads NaN and Infinity; 1e308 / r overflows the float32 slot scale.
    "alpha_1e308": (lambda f: edit_config(f, lora_alpha=1e308), "invalid_config"),
    "alpha_nan": (lambda f: edit_config(f, lora_alpha=float("nan")), "invalid_config"),
    "alpha_infinity": (lambda f: edit_config(f, lora_alpha=float("inf")), "invalid_config"),
    "alpha_bool": (lambda f: edit_config(f, lora_alpha=True), "invalid_config"),
    "target_modules_not_strings": (lambda f: edit_config(f, target_modules=[1]), "invalid_config"),
    "config_nested_100k_deep": (lambda f: (f / "adapter_config.json").write_text(
        '{"r": 8, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"), "invalid_config"),
    "weights_overflow_float32": (lambda f: edit_tensors(
        f, lambda t: t.update({first_key(t, "lora_A"): t[first_key(t, "lora_A")].double() * 1e300})),
        "unrepresentable_weights"),
    "layer_out_of_range": (lambda f: edit_tensors(f, lambda t: t.update({
        k.replace("layers.0.", "layers.7."): v.clone() for k, v in list(t.items()) if "layers.0." in k})),
        "shape_mismatch"),
}


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, good_adapter):
    return make_engine(tiny_llama_dir, max_loras=4, adapters={"good": str(good_adapter)})


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_adapter_is_refused_and_changes_nothing(case, engine, good_adapter, tmp_path):
    mutate, code = CASES[case]
    folder = shutil.copytree(good_adapter, tmp_path / case)
    mutate(folder)
    before = (engine.adapter_names, list(engine.slots.free_slots), engine.slots.scales.clone())
    with pytest.raises(AdapterError) as err:
        engine.add_adapter(case, str(folder))
    assert err.value.code == code, str(err.value)
    assert str(err.value)
    assert (engine.adapter_names, list(engine.slots.free_slots)) == before[:2]
    assert torch.equal(engine.slots.scales, before[2])


def test_adapter_for_another_base_model_is_refused(engine, tmp_path):
    # A q_proj LoRA for a model with hidden size 48 (the base has 64).
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "target_modules": ["q_proj"]}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(4, 48), f"{prefix}.lora_B.weight": torch.zeros(48, 4)},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError) as err:
        engine.add_adapter("foreign", str(tmp_path))
    assert err.value.code == "shape_mismatch" and "another base model" in str(err.value)
    assert engine.adapter_names == ["good"]


def test_good_adapter_loads_and_duplicate_name_is_refused(engine, good_adapter):
    assert engine.adapter_names == ["good"]
    with pytest.raises(AdapterError) as err:
        engine.add_adapter("good", str(good_adapter))
    assert err.value.code == "already_exists"


def test_weights_that_overflow_the_serving_dtype_are_refused(good_adapter):
    """scale * B must fit the serving dtype: fine in float32, an overflow in float16."""
    from loramux.adapters_store.peft_format import parse_peft_adapter

    config = json.loads((good_adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = 1e7
    tensors = load_file(good_adapter / "adapter_model.safetensors")
    rank = config["r"]
    shapes = {"q_proj": tuple(tensors[first_key(tensors, "q_proj.lora_B")].shape[:1]) + (
        tensors[first_key(tensors, "q_proj.lora_A")].shape[1],)}
    shapes["v_proj"] = (tensors[first_key(tensors, "v_proj.lora_B")].shape[0],
                        tensors[first_key(tensors, "v_proj.lora_A")].shape[1])
    args = (json.dumps(config).encode(), (good_adapter / "adapter_model.safetensors").read_bytes(), shapes, 2, rank)
    assert parse_peft_adapter(*args, dtype=torch.float32).scale == 1e7 / rank
    with pytest.raises(AdapterError) as err:
        parse_peft_adapter(*args, dtype=torch.float16)
    assert err.value.code == "unrepresentable_weights" and "float16" in str(err.value)
