"""Projections no adapter of the step targets: no kernel eagerly, skipped rows under fixed launches."""

from __future__ import annotations

from collections import Counter

import torch

from loramux.adapters_store.peft_format import LoraAdapter
from loramux.adapters_store.slot_pool import LoraSlotPool
from loramux.engine.lora_linear import LoraLinear
from loramux.kernels import LoraBackend, LoraPlan, build_lora_plan, torch_ref
from tests.lora_cases import loop_reference

D, R = 24, 8
SHAPES = {"qkv": (D, ("q_proj", "k_proj", "v_proj"), (16, 8, 8)), "o": (16, ("o_proj",), (D,)),
          "gate_up": (D, ("gate_proj", "up_proj"), (20, 20)), "down": (20, ("down_proj",), (D,))}


def counting_backend(calls: Counter, name: str) -> LoraBackend:
    """The torch ops, counting the launches of one module."""
    def shrink(*args):
        calls[name] += 1
        return torch_ref.lora_shrink(*args)

    def expand(*args):
        calls[name] += 1
        torch_ref.lora_expand(*args)

    return LoraBackend("counting", shrink, expand, torch_ref.warm_up)


def adapter(targets: dict[str, tuple[int, int]], seed: int) -> LoraAdapter:
    """Rank-4 adapter on layer 0; targets: sub-projection -> (d_in, d_out)."""
    g = torch.Generator().manual_seed(seed)
    weights = {(0, sub): (torch.randn(4, d_in, generator=g), torch.randn(d_out, 4, generator=g))
               for sub, (d_in, d_out) in targets.items()}
    return LoraAdapter(rank=4, alpha=8.0, scale=2.0, target_modules=tuple(targets), weights=weights, base_model=None)


def setup():
    calls = Counter()
    g = torch.Generator().manual_seed(0)
    modules = {name: LoraLinear(torch.randn(sum(sizes), d_in, generator=g), None, subs, sizes,
                                counting_backend(calls, name)) for name, (d_in, subs, sizes) in SHAPES.items()}
    pool = LoraSlotPool([(0, m) for m in modules.values()], num_slots=4, max_rank=R, device=torch.device("cpu"))
    qv = adapter({"q_proj": (D, 16), "v_proj": (D, 8)}, seed=1)
    q = adapter({"q_proj": (D, 16)}, seed=2)
    slots = [pool.load("qv", qv), pool.load("q", q)]
    assert slots == [0, 1]  # the reference names adapters by slot
    return calls, modules, pool, (qv, q), slots


def expected_qkv(x, adapters, runs):
    """The per-token loop's delta for the q and v columns of the fused output (runs name adapters by index)."""
    out = torch.zeros(x.shape[0], 32)
    for sub, offset, d_out in (("q_proj", 0, 16), ("v_proj", 24, 8)):
        a = torch.zeros(2, R, D)
        b = torch.zeros(2, d_out, R)
        for i, ad in enumerate(adapters):
            if (0, sub) in ad.weights:
                a[i, :4], b[i, :, :4] = ad.weights[(0, sub)]
        out += loop_reference(x, a, b, torch.full((2,), 2.0), runs, y_offset=offset, d_total=32)
    return out


def test_a_step_targeting_q_and_v_only_launches_nothing_for_o_gate_up_and_down():
    calls, modules, pool, adapters, slots = setup()
    runs = [(0, 3, [(slots[0], 1.0, 0, 4)]), (3, 2, [(slots[1], 0.5, 0, 4)])]
    plan = build_lora_plan(runs, pool.scales, pool.max_rank, "cpu", pool.targets)
    assert plan.targets == {"q_proj", "v_proj"}
    g = torch.Generator().manual_seed(3)
    for name, module in modules.items():
        inputs = torch.randn(5, module.in_features, generator=g)
        y = module(inputs, plan)
        if name == "qkv":
            torch.testing.assert_close(y, inputs @ module.weight.T + expected_qkv(inputs, adapters, [
                (0, 3, [(0, 1.0, 0, 4)]), (3, 2, [(1, 0.5, 0, 4)])]), rtol=1e-5, atol=1e-4)
        else:
            torch.testing.assert_close(y, inputs @ module.weight.T, rtol=0, atol=0)
    assert calls == Counter({"qkv": 2})  # one shrink, one expand


def test_fixed_launches_skip_the_rows_of_slots_that_do_not_target_the_module():
    """A CUDA-graph plan (targets None) launches everywhere; slot_active makes o/gate_up/down rows inert."""
    calls, modules, pool, _, slots = setup()
    assert [int(modules[n].slot_active[slots[0]]) for n in SHAPES] == [1, 0, 0, 0]
    runs = [(0, 2, [(slots[0], 1.0, 0, 4)])]
    plan = LoraPlan(build_lora_plan(runs, pool.scales, pool.max_rank, "cpu").levels)
    assert plan.targets is None
    module = modules["gate_up"]
    with torch.no_grad():
        module.lora_a[slots[0]].fill_(1.0)  # weights the flag must hide
        module.lora_b[slots[0]].fill_(1.0)
    x = torch.randn(2, D, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(module(x, plan), x @ module.weight.T, rtol=0, atol=0)
    assert calls["gate_up"] == 2
    pool.unload("qv")
    assert int(modules["qkv"].slot_active[slots[0]]) == 0 and pool.targets[slots[0]] == frozenset()
