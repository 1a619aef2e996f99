"""Read and validate composite experts: `loramux_composite.json` + `composite.safetensors`.

Every composite becomes the same thing for the engine: a list of **members**
(LoRA adapters the store serves from its slots) and, for MoLE and MoR, a
per-decoder-layer **gate** over them:

- mole: members are adapters by name (already registered) or PEFT folders
  shipped inside the composite (`{"name", "path"}`); the gate is learned.
- mor:  one shared A [r, d_in] / B [d_out, r] per module and N experts with
  lambda_A [N, r], lambda_B [N, d_out]; the shared factors are one derived
  member (one slot), and the gate runs over the N experts, each that slot with
  its own pool row of scaling vectors (`expert_scales`, written into the LoRA
  linears' pools at registration: see `loramux.composites.scale_pool`).
- more: one shared LoRA of rank r; per task and per module a selector picks a
  rank prefix k from `rank_choices` (argmax of selector @ task embedding).
  Each task becomes one derived member whose module m keeps A[:k_m], B[:, :k_m]
  (zeros beyond): the rank is fixed per task, so no gate runs.

Tensors in composite.safetensors (l = decoder layer, m = module name):
  layers.{l}.gate.weight       [N, hidden]   mole, mor
  layers.{l}.gate.temperature  [] or [1]     mole, mor (optional, default 1; > 0)
  layers.{l}.{m}.lora_A        [r, d_in]     mor, more
  layers.{l}.{m}.lora_B        [d_out, r]    mor, more
  layers.{l}.{m}.lambda_A      [N, r]        mor
  layers.{l}.{m}.lambda_B      [N, d_out]    mor
  layers.{l}.{m}.selector      [C, e]        more (C = len(rank_choices))
  task_embeddings              [T, e]        more (T = len(tasks))
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loramux.adapters_store.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError, LoraAdapter
from loramux.adapters_store.registry import COMPOSITE_CONFIG_FILE, check_metadata, check_name
from loramux.config import LORA_TARGET_MODULES

COMPOSITE_WEIGHTS_FILE = "composite.safetensors"
COMPOSITE_TYPES = ("mole", "mor", "more")
GATE_GRANULARITIES = ("layer",)

_SHARED_KEY = re.compile(r"layers\.(\d+)\.(" + "|".join(LORA_TARGET_MODULES) + r")\.(lora_A|lora_B|lambda_A|lambda_B|selector)$")
_GATE_KEY = re.compile(r"layers\.(\d+)\.gate\.(weight|temperature)$")


@dataclass
class CompositeSpec:
    """A validated composite.

    members: (name, adapter) the store serves; adapter None = a registered adapter
      of that name, otherwise a derived member the store will hold in memory
      under `name` (which is then "<composite>.<suffix>"). In gate order, except
      for mor, whose one member is the shared A/B ("<composite>.shared").
    experts: mor only, the gate's N members "<composite>.expert<i>";
      expert_scales: (layer, module) -> (lambda_A [N, r], lambda_B [N, d_out]).
    gate_weight: [L, N, hidden] float32, gate_temperature: [L] float32 (None for more).
    tasks: more only, task name -> index into members.
    """

    kind: str
    members: list[tuple[str, LoraAdapter | None]]
    gate_weight: torch.Tensor | None
    gate_temperature: torch.Tensor | None
    top_k: int
    tasks: dict[str, int] = field(default_factory=dict)
    default_task: str | None = None
    member_ranks: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # more: task -> module -> ranks
    description: str = ""
    examples: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    expert_scales: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def gated(self) -> list[str]:
        """The names the gate runs over, in its order: mor's experts, otherwise the members."""
        return self.experts or [m for m, _ in self.members]


@dataclass(frozen=True)
class BaseShape:
    """What a composite is checked against: the base model and the server's limits."""

    target_shapes: dict[str, tuple[int, int]]
    num_layers: int
    hidden_size: int
    max_rank: int
    max_members: int


def _refuse(code: str, message: str):
    raise AdapterError(code, message)


def _int_field(cfg: dict, key: str, low: int, high: int | None = None) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f" and at most {high}" if high is not None else ""
        _refuse("invalid_config", f"{COMPOSITE_CONFIG_FILE}: {key} must be an integer of at least {low}{bound}, "
                                  f"got {value!r}")
    return value


def _check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        _refuse("invalid_weights", f"{COMPOSITE_WEIGHTS_FILE}: {name} must be floating point")
    if not torch.isfinite(tensor).all():
        _refuse("non_finite_weights", f"{COMPOSITE_WEIGHTS_FILE}: {name} contains NaN or Inf")
    return tensor.float()


def _expect_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        _refuse("shape_mismatch", f"{COMPOSITE_WEIGHTS_FILE}: {name} has shape {tuple(tensor.shape)}; "
                                  f"expected {shape} for this base model")
    return _check_finite(name, tensor)


def _take(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in tensors:
        _refuse("invalid_weights", f"{COMPOSITE_WEIGHTS_FILE} has no tensor {name!r}")
    return _expect_shape(name, tensors.pop(name), shape)


def _gate(tensors: dict, base: BaseShape, num_members: int) -> tuple[torch.Tensor, torch.Tensor]:
    weights, temperatures = [], []
    for layer in range(base.num_layers):
        weights.append(_take(tensors, f"layers.{layer}.gate.weight", (num_members, base.hidden_size)))
        name = f"layers.{layer}.gate.temperature"
        tau = tensors.pop(name, torch.ones(()))
        tau = _expect_shape(name, tau, (1,) if tau.dim() else ())
        if float(tau.reshape(())) <= 0:
            _refuse("invalid_config", f"{COMPOSITE_WEIGHTS_FILE}: {name} must be positive, got {float(tau):g}")
        temperatures.append(tau.reshape(()))
    return torch.stack(weights), torch.stack(temperatures)


def _targets(cfg: dict) -> tuple[str, ...]:
    targets = cfg.get("target_modules")
    if not (isinstance(targets, list) and targets and all(t in LORA_TARGET_MODULES for t in targets)):
        _refuse("invalid_config", f"{COMPOSITE_CONFIG_FILE}: target_modules must be a non-empty list of "
                                  f"{', '.join(LORA_TARGET_MODULES)}")
    return tuple(sorted(set(targets), key=LORA_TARGET_MODULES.index))


def _shared_lora(cfg: dict, tensors: dict, base: BaseShape) -> tuple[int, float, tuple[str, ...],
                                                                   dict[tuple[int, str], tuple]]:
    """The shared A [r, d_in] and B [d_out, r] of every (layer, module) of mor / more."""
    rank = _int_field(cfg, "rank", 1, base.max_rank)
    alpha = cfg.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        _refuse("invalid_config", f"{COMPOSITE_CONFIG_FILE}: lora_alpha must be a positive number, got {alpha!r}")
    targets = _targets(cfg)
    shared = {}
    for layer in range(base.num_layers):
        for module in targets:
            d_out, d_in = base.target_shapes[module]
            p = f"layers.{layer}.{module}."
            shared[(layer, module)] = (_take(tensors, p + "lora_A", (rank, d_in)),
                                       _take(tensors, p + "lora_B", (d_out, rank)))
    return rank, float(alpha), targets, shared


def _mole_members(cfg: dict, folder: Path | None, name: str, base: BaseShape) -> list[tuple[str, LoraAdapter | None]]:
    from loramux.adapters_store.peft_format import parse_peft_adapter

    entries = cfg.get("members")
    if not isinstance(entries, list) or len(entries) < 2:
        _refuse("invalid_config", f"{COMPOSITE_CONFIG_FILE}: members must list at least 2 adapters")
    members = []
    for entry in entries:
        if isinstance(entry, str):
            members.append((entry, None))
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("path"), str)):
            _refuse("invalid_config", f"{COMPOSITE_CONFIG_FILE}: a member is an adapter name or "
                                      f"{{\"name\", \"path\"}} of a PEFT folder shipped inside, got {entry!r}")
        if folder is None:
            _refuse("invalid_config", "members shipped inside a composite need a folder; an upload may only "
                                      "name registered adapters")
        inner = (folder / entry["path"]).resolve()
        if not inner.is_relative_to(folder.resolve()) or not (inner / CONFIG_FILE).is_file():
            _refuse("member_not_found", f"member {entry['name']!r}: {entry['path']!r} is not a PEFT folder "
                                        "inside the composite")
        check_name(entry["name"])
        adapter = parse_peft_adapter((inner / CONFIG_FILE).read_bytes(), (inner / WEIGHTS_FILE).read_bytes(),
                                     base.target_shapes, base.num_layers, base.max_rank)
        members.append((f"{name}.{entry['name']}", adapter))
    if len({m for m, _ in members}) != len(members):
        _refuse("invalid_config", f"{COMPOSITE_CONFIG_FILE}: a member appears twice")
    return members


def _mor_members(cfg: dict, tensors: dict, name: str, base: BaseShape
                 ) -> tuple[list[tuple[str, LoraAdapter]], list[str], dict[tuple[int, str], tuple]]:
    """The shared member, the experts' names and their scaling vectors (see `CompositeSpec`)."""
    num_experts = _int_field(cfg, "num_experts", 2, base.max_members)
    rank, alpha, targets, shared = _shared_lora(cfg, tensors, base)
    scales = {}
    for (layer, module), (_, b) in shared.items():
        p = f"layers.{layer}.{module}."
        scales[(layer, module)] = (_take(tensors, p + "lambda_A", (num_experts, rank)),
                                   _take(tensors, p + "lambda_B", (num_experts, b.shape[0])))
    member = LoraAdapter(rank=rank, alpha=alpha, scale=alpha / rank, target_modules=targets, weights=shared,
                         base_model=cfg.get("base_model_name_or_path"))
    return [(f"{name}.shared", member)], [f"{name}.expert{i}" for i in range(num_experts)], scales


def _more_members(cfg: dict, tensors: dict, name: str, base: BaseShape
                  ) -> tuple[list[tuple[str, LoraAdapter]], dict[str, int], dict[str, dict[str, list[int]]]]:
    rank, alpha, targets, shared = _shared_lora(cfg, tensors, base)
    choices = cfg.get("rank_choices")
    if not (isinstance(choices, list) and choices and all(isinstance(c, int) and 1 <= c <= rank for c in choices)):
        _refuse("invalid_config", f"{COMPOSITE_CONFIG_FILE}: rank_choices must be a non-empty list of ranks "
                                  f"between 1 and rank ({rank})")
    tasks = cfg.get("tasks")
    if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) and t for t in tasks)
            and len(set(tasks)) == len(tasks)):
        _refuse("invalid_config", f"{COMPOSITE_CONFIG_FILE}: tasks must be a non-empty list of distinct names")
    if "task_embeddings" not in tensors:
        _refuse("invalid_weights", f"{COMPOSITE_WEIGHTS_FILE} has no tensor 'task_embeddings'")
    embeddings = tensors["task_embeddings"]
    if embeddings.dim() != 2 or embeddings.shape[0] != len(tasks):
        _refuse("shape_mismatch", f"{COMPOSITE_WEIGHTS_FILE}: task_embeddings must be [{len(tasks)}, e] "
                                  f"(one row per task), got {tuple(embeddings.shape)}")
    embeddings = _take(tensors, "task_embeddings", tuple(embeddings.shape))
    members, ranks = [], {task: {} for task in tasks}
    weights = [{} for _ in tasks]
    for (layer, module), (a, b) in shared.items():
        selector = _take(tensors, f"layers.{layer}.{module}.selector", (len(choices), embeddings.shape[1]))
        picks = (embeddings @ selector.T).argmax(dim=1)  # [T]
        for t, task in enumerate(tasks):
            k = choices[int(picks[t])]
            ranks[task].setdefault(module, []).append(k)
            keep = (torch.arange(rank) < k).float()
            weights[t][(layer, module)] = (a * keep[:, None], b * keep[None, :])
    for t, task in enumerate(tasks):
        members.append((f"{name}.task-{task}", LoraAdapter(rank=rank, alpha=alpha, scale=alpha / rank,
                                                           target_modules=targets, weights=weights[t],
                                                           base_model=cfg.get("base_model_name_or_path"))))
    return members, {task: t for t, task in enumerate(tasks)}, ranks


def parse_composite(name: str, config_bytes: bytes, weights_bytes: bytes, base: BaseShape,
                    folder: Path | None = None) -> CompositeSpec:
    """Validate a composite against the base model; raises AdapterError (nothing is stored here)."""
    check_name(name)
    try:
        cfg = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError("invalid_config", f"{COMPOSITE_CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        _refuse("invalid_config", f"{COMPOSITE_CONFIG_FILE} must hold a JSON object")
    kind = cfg.get("type")
    if kind not in COMPOSITE_TYPES:
        _refuse("unsupported_type", f"{COMPOSITE_CONFIG_FILE}: type must be one of {', '.join(COMPOSITE_TYPES)}, "
                                    f"got {kind!r}")
    card = cfg.get("card", {})
    if not isinstance(card, dict):
        _refuse("invalid_metadata", f"{COMPOSITE_CONFIG_FILE}: card must be an object")
    description, examples = check_metadata(card)
    gate_cfg = cfg.get("gate", {})
    if not isinstance(gate_cfg, dict) or gate_cfg.get("granularity", "layer") not in GATE_GRANULARITIES:
        _refuse("invalid_config", f"{COMPOSITE_CONFIG_FILE}: gate.granularity must be one of "
                                  f"{', '.join(GATE_GRANULARITIES)} (one gate per decoder layer)")
    try:
        tensors = load_safetensors(weights_bytes)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterError("invalid_weights", f"{COMPOSITE_WEIGHTS_FILE} is not a valid safetensors file: {exc}") \
            from exc
    for key in tensors:
        m = _SHARED_KEY.fullmatch(key) or _GATE_KEY.fullmatch(key)
        if (m and int(m.group(1)) >= base.num_layers) or not (m or key == "task_embeddings"):
            _refuse("invalid_weights", f"{COMPOSITE_WEIGHTS_FILE}: unexpected tensor {key!r}")
    tasks, default_task, ranks, experts, scales = {}, None, {}, [], {}
    if kind == "mole":
        members = _mole_members(cfg, folder, name, base)
    elif kind == "mor":
        members, experts, scales = _mor_members(cfg, tensors, name, base)
    else:
        members, tasks, ranks = _more_members(cfg, tensors, name, base)
        default_task = cfg.get("default_task")
        if default_task is not None and default_task not in tasks:
            _refuse("invalid_config", f"{COMPOSITE_CONFIG_FILE}: default_task {default_task!r} is not one of the "
                                      "tasks")
    gated = len(experts or members)
    if gated > base.max_members and kind != "more":
        _refuse("too_many_members", f"a {kind} composite may have at most {base.max_members} members on this "
                                    f"server (--max-composite-members), got {gated}")
    gate_weight = gate_temperature = None
    top_k = 0
    if kind != "more":
        gate_weight, gate_temperature = _gate(tensors, base, gated)
        top_k = gate_cfg.get("top_k", 0)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 <= top_k <= gated:
            _refuse("invalid_config", f"{COMPOSITE_CONFIG_FILE}: gate.top_k must be between 0 (all) and "
                                      f"{gated}, got {top_k!r}")
    if tensors:
        _refuse("invalid_weights", f"{COMPOSITE_WEIGHTS_FILE}: tensors {sorted(tensors)[:4]} are not used by a "
                                   f"{kind} composite")
    return CompositeSpec(kind=kind, members=members, gate_weight=gate_weight, gate_temperature=gate_temperature,
                         top_k=top_k, tasks=tasks, default_task=default_task, member_ranks=ranks,
                         description=description, examples=examples, experts=experts, expert_scales=scales)
