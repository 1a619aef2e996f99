"""The composite trainer on a tiny random model: every method trains, writes a folder the engine serves,
and its training forward (hooks over transformers) gives the engine's greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loramux.engine import SamplingParams
from loramux.experts.tasks import TASKS
from loramux.experts.train_composites import (TASK_NAMES, TrainableMoRE, build_composite, main, serving_engine,
                                              write_composite)
from tests.conftest import hf_greedy, make_peft_adapter

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_experts(tiny_llama_dir, tmp_path_factory):
    """Nine random PEFT experts on q/k/v/o, named by the demo tasks (ranks 4 and 8, as the demo's 8 and 16)."""
    root = tmp_path_factory.mktemp("experts")
    for i, name in enumerate(TASK_NAMES):
        rank = 8 if i % 3 == 0 else 4
        make_peft_adapter(tiny_llama_dir, root / name, rank, 2 * rank, ["q_proj", "k_proj", "v_proj", "o_proj"],
                          seed=100 + i)
    return root


def test_every_method_trains_and_its_folder_serves(tiny_llama_dir, tiny_experts, tmp_path):
    out = tmp_path / "composites"
    main(["--model", str(tiny_llama_dir), "--experts-dir", str(tiny_experts), "--out", str(out), "--steps", "2",
          "--batch-size", "3", "--heldout-per-task", "1", "--heldout-max-tokens", "4"])
    for method in ("mole", "mor", "more"):
        folder = out / f"{method}_demo"
        config = json.loads((folder / "loramux_composite.json").read_text())
        tensors = load_file(folder / "composite.safetensors")
        assert config["type"] == method
        assert config["card"]["description"] and len(config["card"]["examples"]) == 2 * len(TASKS)
        training = config["training"]
        assert training["steps"] == 2 and training["cpu_seconds"] >= 0
        # the check through the engine ran: one held-out prompt per task was served
        assert set(training["heldout_exact_match"]["per_task"]) == set(TASK_NAMES)
        if method == "mole":
            assert config["members"] == TASK_NAMES
            # the temperature starts at 1 and the gates near 0: two steps at lr 1e-2 moved both
            assert any(float(tensors[f"layers.{l}.gate.temperature"]) != 1.0 for l in range(2))
        else:  # the shared LoRA's B starts at zero
            assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("lora_B"))
        if method == "more":
            assert config["tasks"] == TASK_NAMES


def _randomise(composite) -> None:
    """Parameters far from their init, so every part of the forward changes the tokens."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in composite.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
            elif "log_temperature" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
            elif "lambda" in name or "weight" in name or "selector" in name or "task_embeddings" in name:
                param.copy_(torch.randn(param.shape, generator=g))


@pytest.mark.parametrize("method", ["mole", "mor", "more"])
def test_training_forward_gives_the_engines_greedy_tokens(method, tiny_llama_dir, tiny_experts, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    composite = build_composite(method, model, tiny_experts, seed=3)
    _randomise(composite)
    folder = write_composite(composite, tmp_path / method, {"description": "test"}, {},
                             weights_dtype=torch.float32)
    engine = serving_engine(tiny_experts, str(tiny_llama_dir), dtype="float32")  # the reference is float32
    engine.add_adapter(folder.name, str(folder))
    prompts = [[5, 17, 300, 4000, 12], [900, 31, 7, 7, 2500, 18, 40, 41, 42]]
    tasks = [TASK_NAMES[2], TASK_NAMES[7]]
    mixes = [[{"name": method, "task": t}] if method == "more" else [method] for t in tasks]
    served = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True), mixes)
    for ids, task, [out] in zip(prompts, tasks, served):
        if isinstance(composite, TrainableMoRE):
            composite.batch_tasks = torch.tensor([TASK_NAMES.index(task)])
        with composite.attached(model):
            expected = hf_greedy(model, ids, NEW_TOKENS)
        assert out.new_token_ids == expected, f"{method} {task}"
    if method == "more":  # the two tasks' selected ranks differ somewhere, or the task would change nothing
        assert composite.selected_ranks()[tasks[0]] != composite.selected_ranks()[tasks[1]]


class GatedProjection(torch.nn.Module):
    """Reference of one per-projection MoLE gate, written from the file contents: base(x) + sum_i g_i s_i B_i A_i x
    with g = softmax(W · x / rms(x) / tau) of this projection's own input x."""

    def __init__(self, base, gate_weight, temperature, members):
        super().__init__()
        self.base, self.gate_weight, self.temperature, self.members = base, gate_weight, temperature, members

    def forward(self, x):
        g = torch.softmax(x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() @ self.gate_weight.T
                          / self.temperature, dim=-1)
        return self.base(x) + sum(g[..., i:i + 1] * s * (x @ a.T @ b.T) for i, (a, b, s) in enumerate(self.members))


def test_per_projection_mole_matches_a_hand_written_reference(tiny_llama_dir, tiny_experts, tmp_path):
    import copy

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    composite = build_composite("mole", model, tiny_experts, seed=3, mole_granularity="projection")
    _randomise(composite)
    folder = write_composite(composite, tmp_path / "mole", {"description": "test"}, {})
    assert json.loads((folder / "loramux_composite.json").read_text())["gate"]["granularity"] == "projection"
    gates = load_file(folder / "composite.safetensors")
    experts = [(load_file(tiny_experts / name / "adapter_model.safetensors"),
                json.loads((tiny_experts / name / "adapter_config.json").read_text())) for name in TASK_NAMES]
    reference = copy.deepcopy(model)
    for l, layer in enumerate(reference.model.layers):
        for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
            prefix = f"base_model.model.model.layers.{l}.self_attn.{module}"
            members = [(w[f"{prefix}.lora_A.weight"], w[f"{prefix}.lora_B.weight"], c["lora_alpha"] / c["r"])
                       for w, c in experts]
            weight = gates[f"layers.{l}.{module}.gate.weight"]
            temperature = gates[f"layers.{l}.{module}.gate.temperature"]
            assert weight.shape == (len(TASK_NAMES), getattr(layer.self_attn, module).in_features)
            assert temperature.shape == ()
            setattr(layer.self_attn, module, GatedProjection(getattr(layer.self_attn, module), weight, temperature,
                                                             members))
    ids = torch.tensor([[5, 17, 300, 4000, 12, 9, 33], [900, 31, 7, 7, 2500, 18, 40]])
    with torch.no_grad():
        expected = reference(ids).logits
        with composite.attached(model):
            got = model(ids).logits
        plain = model(ids).logits
    assert (expected - plain).abs().max() > 1e-2  # the members change the logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # every projection has its own gate: q and v of a layer read the same input but weigh the members differently
    assert len(composite.last_gates) == 2 * 4
    assert not torch.allclose(composite.last_gates[0], composite.last_gates[2])


def test_per_projection_mole_trains_and_is_checked_through_the_hooks(tiny_llama_dir, tiny_experts, tmp_path):
    out = tmp_path / "composites"
    args = ["--model", str(tiny_llama_dir), "--experts-dir", str(tiny_experts), "--out", str(out), "--methods",
            "mole", "--mole-granularity", "projection", "--steps", "2", "--batch-size", "3",
            "--heldout-per-task", "1", "--heldout-max-tokens", "4"]
    with pytest.raises(SystemExit):  # the engine cannot serve per-projection gates
        main(args)
    main(args + ["--heldout-via", "hooks"])
    config = json.loads((out / "mole_demo" / "loramux_composite.json").read_text())
    tensors = load_file(out / "mole_demo" / "composite.safetensors")
    assert config["gate"]["granularity"] == "projection"
    assert config["training"]["heldout_exact_match"]["via"] == "hooks"
    assert set(config["training"]["heldout_exact_match"]["per_task"]) == set(TASK_NAMES)
    # a weight and a temperature per (layer, projection); two steps moved the temperatures from 1
    assert len(tensors) == 2 * 4 * 2
    assert any(float(tensors[f"layers.{l}.{m}.gate.temperature"]) != 1.0
               for l in range(2) for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
