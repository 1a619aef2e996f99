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
