"""MoLE, MoR and MoRE in mixed batches give the tokens of an independent reference.

The reference is the transformers model with hooks that apply the papers'
formulas straight from the composite's files (never through loramux's parser):
a pre-hook on every decoder layer computes the gate from that layer's input,
forward hooks on every targeted nn.Linear add the delta.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loramux.adapters_store import AdapterError
from loramux.composites.synthetic import write_random_mole, write_random_mor, write_random_more
from loramux.engine import SamplingParams
from loramux.engine.engine import RequestError
from loramux.kernels import cpu_extension
from tests.conftest import hf_greedy, make_engine, make_peft_adapter

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NEW_TOKENS = 8
NUM_LAYERS, HIDDEN = 2, 64
# MoLE members: different ranks and target sets; "inner" ships inside the composite folder.
MEMBER_SPECS = {"m0": (4, 8, list(ATTN + MLP)), "m1": (8, 16, ["q_proj", "v_proj"]),
                "m2": (16, 8, list(MLP)), "inner": (8, 8, ["o_proj", "k_proj", "up_proj"])}
MORE_TASKS = ["math", "code", "chat"]


# ------------------------------------------------------------------ reference
def read_peft(folder) -> tuple[float, dict]:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    weights = {}
    for key, t in tensors.items():
        parts = key.split(".")
        layer, module = int(parts[parts.index("layers") + 1]), parts[-3]
        weights.setdefault((layer, module), {})[parts[-2][-1]] = t
    return cfg["lora_alpha"] / cfg["r"], {k: (v["A"], v["B"]) for k, v in weights.items()}


def reference_gate(weight: torch.Tensor, tau: torch.Tensor, x: torch.Tensor, allowed=None, top_k=0) -> torch.Tensor:
    """softmax(W · x / sqrt(mean(x^2)) / tau), then masked / top-k members dropped and the rest renormalised."""
    xs = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    p = torch.softmax(xs @ weight.T / tau, dim=-1)
    keep = torch.ones_like(p, dtype=torch.bool) if allowed is None else torch.tensor(allowed).expand_as(p).clone()
    p = p * keep
    if top_k:
        kept = torch.zeros_like(keep)
        kept.scatter_(1, p.topk(top_k, dim=1).indices, True)
        p = p * kept
    return p / p.sum(dim=1, keepdim=True)


class HookedReference:
    """The transformers model; `greedy(ids, gate, delta)` runs it with the hooks of one composite."""

    def __init__(self, model_dir):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def greedy(self, ids, gate=None, delta=None) -> list[int]:
        """gate(layer, x [T, d]) -> g [T, N]; delta(layer, module, x [T, d_in], g) -> [T, d_out]."""
        if delta is None:
            return hf_greedy(self.model, ids, NEW_TOKENS)
        state, handles = {}, []
        for l, layer in enumerate(self.model.model.layers):
            def pre(_, args, kwargs, l=l):
                hidden = args[0] if args else kwargs["hidden_states"]
                state["g"] = gate(l, hidden[0]) if gate else None
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            for module in ATTN + MLP:
                linear = getattr(layer.self_attn if module in ATTN else layer.mlp, module)
                def post(_, inp, out, l=l, module=module):
                    d = delta(l, module, inp[0][0], state["g"])
                    return out + d[None] if torch.is_tensor(d) else out  # 0: the module is not targeted
                handles.append(linear.register_forward_hook(post))
        try:
            return hf_greedy(self.model, ids, NEW_TOKENS)
        finally:
            for h in handles:
                h.remove()


def mole_hooks(members: list, composite_dir, allowed=None, top_k=0):
    tensors = load_file(composite_dir / "composite.safetensors")

    def gate(l, x):
        return reference_gate(tensors[f"layers.{l}.gate.weight"], tensors[f"layers.{l}.gate.temperature"], x,
                              allowed, top_k)

    def delta(l, module, x, g):
        out = 0
        for i, (scale, weights) in enumerate(members):
            if (l, module) in weights:
                a, b = weights[(l, module)]
                out = out + g[:, i:i + 1] * scale * (x @ a.T) @ b.T
        return out
    return gate, delta


def mor_hooks(composite_dir):
    cfg = json.loads((composite_dir / "loramux_composite.json").read_text())
    tensors = load_file(composite_dir / "composite.safetensors")
    scale = cfg["lora_alpha"] / cfg["rank"]

    def gate(l, x):
        return reference_gate(tensors[f"layers.{l}.gate.weight"], tensors[f"layers.{l}.gate.temperature"], x)

    def delta(l, module, x, g):  # sum_i g_i diag(lambda_B_i) B diag(lambda_A_i) A x
        p = f"layers.{l}.{module}."
        if p + "lora_A" not in tensors:
            return 0
        a, b, lam_a, lam_b = (tensors[p + n] for n in ("lora_A", "lora_B", "lambda_A", "lambda_B"))
        out = 0
        for i in range(lam_a.shape[0]):
            out = out + g[:, i:i + 1] * scale * (((x @ a.T) * lam_a[i]) @ b.T) * lam_b[i]
        return out
    return gate, delta


def more_hooks(composite_dir, task):
    cfg = json.loads((composite_dir / "loramux_composite.json").read_text())
    tensors = load_file(composite_dir / "composite.safetensors")
    embedding = tensors["task_embeddings"][cfg["tasks"].index(task)]
    scale = cfg["lora_alpha"] / cfg["rank"]

    def delta(l, module, x, g):  # the rank prefix the module's selector picks for the task
        p = f"layers.{l}.{module}."
        if p + "lora_A" not in tensors:
            return 0
        k = cfg["rank_choices"][int((tensors[p + "selector"] @ embedding).argmax())]
        return scale * (x @ tensors[p + "lora_A"][:k].T) @ tensors[p + "lora_B"][:, :k].T
    return None, delta


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def composites(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("composites")
    mole_dir = root / "mole"
    members = {}
    for i, (name, (rank, alpha, targets)) in enumerate(MEMBER_SPECS.items()):
        folder = (mole_dir / name) if name == "inner" else (root / name)
        members[name] = make_peft_adapter(tiny_llama_dir, folder, rank, alpha, targets, seed=10 + i)
    write_random_mole(mole_dir, ["m0", "m1", "m2", {"name": "inner", "path": "inner"}], NUM_LAYERS, HIDDEN, seed=1)
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96)}
    write_random_mor(root / "mor", shapes, NUM_LAYERS, HIDDEN, num_experts=4, rank=8, seed=2, b_std=0.3)
    write_random_more(root / "more", shapes, NUM_LAYERS, rank=16, rank_choices=[2, 4, 8, 16], tasks=MORE_TASKS,
                      seed=3, b_std=0.3)
    return root, members


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return HookedReference(tiny_llama_dir)


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def engine_with(model_dir, root, **kwargs):
    engine = make_engine(model_dir, adapters={n: str(root / n) for n in ("m0", "m1", "m2")}, **kwargs)
    for name in ("mole", "mor", "more"):
        engine.add_adapter(name, str(root / name))
    return engine


def run_staggered(engine, requests) -> dict[str, list[int]]:
    """Add one request every other step; return the tokens of each."""
    outputs, pending, step = {}, list(requests), 0
    reports = {}
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:
            rid, ids, mix = pending.pop(0)
            engine.add_request(rid, ids, greedy(), mix)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.composite is not None:
                reports[out.request_id] = out.composite
        step += 1
    return outputs, reports


# ------------------------------------------------------------------ tests
def test_mixed_batch_of_composites_plain_adapters_and_base(tiny_llama_dir, composites, reference):
    """Every composite kind beside plain adapters and base requests, with chunked prefill and preemption."""
    root, members = composites
    engine = engine_with(tiny_llama_dir, root, num_blocks=12, max_num_batched_tokens=40)
    mole_members = [read_peft(members[n]) for n in MEMBER_SPECS]
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    cases = [
        ("mole", ["mole"], mole_hooks(mole_members, root / "mole")),
        ("mole-masked", [{"name": "mole", "mask": ["m1"]}],
         mole_hooks(mole_members, root / "mole", allowed=[True, False, True, True])),
        ("mole-top2", [{"name": "mole", "top_k": 2}], mole_hooks(mole_members, root / "mole", top_k=2)),
        ("plain-m0", ["m0"], mole_hooks(mole_members[:1], root / "mole")[1]),
        ("mor", ["mor"], mor_hooks(root / "mor")),
        ("base", [], None),
        ("more-math", [{"name": "more", "task": "math"}], more_hooks(root / "more", "math")),
        ("more-code", [{"name": "more", "task": "code"}], more_hooks(root / "more", "code")),
        ("plain-m2", [("m2", 0.5)], None),
    ]
    requests = []
    for i, (rid, mix, _) in enumerate(cases):
        text = " ".join(words[(i + j) % len(words)] for j in range(3 + 6 * i))
        requests.append((rid, engine.tokenizer.encode(text, add_special_tokens=False), mix))
    outputs, reports = run_staggered(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    base_tokens = {rid: reference.greedy(ids) for rid, ids, _ in requests}
    m0_scale, m0 = mole_members[0]
    m2_scale, m2 = mole_members[2]

    def plain(scale, weights, w=1.0):
        return lambda l, module, x, g: (w * scale * (x @ weights[(l, module)][0].T) @ weights[(l, module)][1].T
                                        if (l, module) in weights else 0)
    for (rid, ids, _), (_, _, hooks) in zip(requests, cases):
        if rid == "plain-m0":
            expected = reference.greedy(ids, None, plain(m0_scale, m0))
        elif rid == "plain-m2":
            expected = reference.greedy(ids, None, plain(m2_scale, m2, 0.5))
        elif hooks is None:
            expected = base_tokens[rid]
        else:
            expected = reference.greedy(ids, *hooks)
        assert outputs[rid] == expected, rid
        if rid not in ("base", "plain-m2"):
            assert outputs[rid] != base_tokens[rid], f"{rid} should change the output"
    assert engine.blocks.num_free == engine.num_blocks
    # The gate report: weights of the allowed members sum to 1; a masked member gets none.
    assert math.isclose(sum(reports["mole"]["gates"].values()), 1.0, rel_tol=1e-5)
    assert reports["mole-masked"]["gates"]["m1"] == 0.0
    assert reports["more-math"] == {"name": "more", "type": "more", "task": "math"}


@pytest.mark.skipif(not cpu_extension.load(), reason="no AVX512-BF16 or the kernel did not build")
def test_bf16_cpu_kernel_serves_mor_beside_plain_adapters_as_torchs_ops_do(tiny_llama_dir, composites):
    """A bfloat16 CPU engine runs MoR's scaled rows in the C++ kernel (bfloat16 slots and pools) with the
    tokens of the torch backend (float32 slots, torch's ops), MoR requests batched with plain adapters."""
    root, _ = composites
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    mixes = [["mor"], ["m0"], ["mor"], [("m2", 0.5)], ["mor"], ["m1"], []]  # the last: r0's prompt, base only
    outputs = {}
    for backend in ("auto", "torch"):
        engine = engine_with(tiny_llama_dir, root, dtype="bfloat16", lora_backend=backend)
        assert engine.lora_backend.name == ("torch+cpu-bgmv" if backend == "auto" else "torch")
        prompts = [" ".join(words[i:i + 2 + 3 * i]) for i in range(len(mixes) - 1)] + [" ".join(words[:2])]
        requests = [(f"r{i}", engine.tokenizer.encode(text, add_special_tokens=False), mix)
                    for i, (text, mix) in enumerate(zip(prompts, mixes))]
        outputs[backend], _ = run_staggered(engine, requests)
    assert outputs["auto"] == outputs["torch"]
    assert outputs["auto"]["r0"] != outputs["auto"]["r6"], "MoR should change the output"


def test_mole_gate_report_per_layer_matches_reference(tiny_llama_dir, composites, reference):
    root, members = composites
    engine = engine_with(tiny_llama_dir, root)
    ids = engine.tokenizer.encode("one two three four", add_special_tokens=False)
    [[out]] = engine.generate([ids], greedy(), [[{"name": "mole", "per_layer": True}]])
    gate, delta = mole_hooks([read_peft(members[n]) for n in MEMBER_SPECS], root / "mole")
    seen = []
    expected = reference.greedy(ids, lambda l, x: seen.append((l, gate(l, x)[-1])) or gate(l, x), delta)
    assert out.new_token_ids == expected
    # The report averages the gate at each sampled position; the reference's last row of each
    # forward pass is that position (one forward per generated token).
    per_layer = torch.stack([torch.stack([g for l, g in seen if l == layer]) for layer in range(NUM_LAYERS)])
    names = ["m0", "m1", "m2", "mole.inner"]
    reported = torch.tensor([[row[n] for n in names] for row in out.composite["gates_per_layer"]])
    torch.testing.assert_close(reported, per_layer.mean(dim=1).float(), atol=1e-5, rtol=1e-4)


def store_idle(engine) -> bool:
    """The store's state machine holds its invariants and no adapter is used or pinned."""
    engine.store.lifecycle.check()
    return not any(e.uses or e.pins for e in engine.store.lifecycle.entries.values())


def test_deleting_a_member_lets_running_requests_finish(tiny_llama_dir, composites, reference):
    root, members = composites
    engine = engine_with(tiny_llama_dir, root)
    ids = engine.tokenizer.encode("the member goes away", add_special_tokens=False)
    engine.add_request("r", ids, greedy(), ["mole"])
    tokens = []
    for _ in range(3):
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    engine.remove_adapter("m1")
    while engine.has_unfinished_requests():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert tokens == reference.greedy(ids, *mole_hooks([read_peft(members[n]) for n in MEMBER_SPECS], root / "mole"))
    with pytest.raises(RequestError, match="member 'm1' of composite 'mole' was deleted") as err:
        engine.add_request("r2", ids, greedy(), ["mole"])
    assert err.value.code == "member_not_found"
    assert "m1" not in engine.store.lifecycle.entries and store_idle(engine)  # gone after the last use


def test_deleting_a_composite_lets_running_requests_finish(tiny_llama_dir, composites):
    root, _ = composites
    engine = engine_with(tiny_llama_dir, root)
    ids = engine.tokenizer.encode("going going gone", add_special_tokens=False)
    [[expected]] = engine.generate([ids], greedy(), [["mor"]])
    engine.add_request("r", ids, greedy(), ["mor"])
    tokens = [t for out in engine.step() for t in out.new_token_ids]
    engine.remove_adapter("mor")
    assert "mor" not in engine.composites
    with pytest.raises(RequestError, match="does not exist"):
        engine.add_request("r2", ids, greedy(), ["mor"])
    while engine.has_unfinished_requests():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert tokens == expected.new_token_ids
    assert not [n for n in engine.store.records if n.startswith("mor.")]  # its shared member went with it
    assert len(engine.composites._free_gates) == engine.config.store.max_composites - 1  # only mole holds one
    assert engine.composites.scale_pool.num_free == engine.config.store.mor_expert_rows  # its experts' pool rows


def test_bad_request_options(tiny_llama_dir, composites):
    root, _ = composites
    engine = engine_with(tiny_llama_dir, root)
    ids = [5, 6, 7]
    for mix, message in [
        ([{"name": "mole", "mask": ["nope"]}], "not members"),
        ([{"name": "mole", "mask": ["m0", "m1", "m2", "mole.inner"]}], "drops every member"),
        ([{"name": "mole", "top_k": 9}], "top_k"),
        ([{"name": "mole", "task": "math"}], "more composites only"),
        ([{"name": "more", "task": "poetry"}], "needs a task"),
        ([{"name": "more", "top_k": 1}], "mole and mor"),
        (["mole", "m0"], "only entry"),
        ([{"name": "m0", "top_k": 1}], "composite experts only"),
    ]:
        with pytest.raises(RequestError, match=message):
            engine.add_request("bad", ids, greedy(), mix)
    assert engine.composites._uses == {} and not engine.has_unfinished_requests()
    with pytest.raises(AdapterError):
        engine.composites.get("nope")


def test_n_completions_each_get_a_report_and_release_the_composite(tiny_llama_dir, composites):
    root, _ = composites
    engine = engine_with(tiny_llama_dir, root)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, n=2)
    [outs] = engine.generate([[11, 12, 13]], params, [[{"name": "mor", "top_k": 2}]])
    assert [o.new_token_ids for o in outs][0] == [o.new_token_ids for o in outs][1]
    for out in outs:
        assert out.composite["type"] == "mor" and math.isclose(sum(out.composite["gates"].values()), 1.0,
                                                                rel_tol=1e-5)
    assert engine.composites._uses == {} and store_idle(engine)


def test_prefix_cache_shares_kv_only_between_the_same_gate_settings(tiny_llama_dir, composites):
    """K/V under a gated composite depend on its kept members and top-k: other settings never reuse them."""
    root, _ = composites
    engine = engine_with(tiny_llama_dir, root)
    ids = list(range(3, 3 + 4 * engine.config.cache.block_size))  # four full blocks
    hits = engine.blocks

    def hit_tokens(mix) -> int:
        before = hits.prefix_hit_tokens
        engine.generate([ids], greedy(), [mix])
        return hits.prefix_hit_tokens - before

    assert hit_tokens([{"name": "mole", "mask": ["m0"]}]) == 0
    assert hit_tokens([{"name": "mole", "mask": ["m0"]}]) > 0  # the same settings: shared
    assert hit_tokens([{"name": "mole", "mask": ["m1"]}]) == 0  # other members kept
    assert hit_tokens([{"name": "mole", "top_k": 1}]) == 0  # another top-k
    assert hit_tokens(["m0", "m1", "m2", "mole.inner"]) == 0  # its members as a plain mix: no gate
    assert hit_tokens([{"name": "mole", "mask": ["m0"], "per_layer": True}]) > 0  # the report changes no K/V
