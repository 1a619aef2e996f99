"""Train the bundled MoLE, MoR and MoRE composites on the nine demo tasks and check them through the engine.

    python -m loramux.experts.train_composites [--methods mole,mor,more] [--steps N] [--out DIR]
                                               [--experts-dir DIR] [--threads N]

- mole: learned per-decoder-layer gates (and temperatures) over the nine frozen
  demo experts of --experts-dir, with the gate balancing loss -log prod_i q_i
  (alpha = 0.5). --mole-granularity projection trains one gate per (decoder
  layer, projection) instead, each reading its projection's input; the engine
  does not serve those, so their held-out check runs through the hooks
  (--heldout-via hooks). Members are named by task, so the server pairs the gates with
  the experts it registers under those names: re-run it when the experts change.
- mor: one shared rank-8 LoRA with nine experts' lambda_A / lambda_B vectors and
  a router per decoder layer.
- more: one shared rank-8 LoRA whose rank prefixes (2, 4, 6, 8) are the experts,
  a task embedding per demo task, a rank selector per module (straight-through)
  and an InfoNCE term between the mean token state and the task embeddings.

Every batch mixes all nine tasks (training phrasings only); base model and
experts stay frozen, the base in bfloat16 (--base-dtype) and the trained
parameters in float32. Fixed seeds. Each composite is written to
<out>/<method>_demo/ with a card, then served by the engine on the tasks'
held-out phrasings (greedy, exact match), which is logged and kept in the card.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from loramux.adapters_store.peft_format import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, parse_peft_adapter
from loramux.adapters_store.registry import COMPOSITE_CONFIG_FILE
from loramux.composites.format import COMPOSITE_WEIGHTS_FILE
from loramux.composites.trainable import HookedComposite, TrainableMoLE, TrainableMoR, TrainableMoRE
from loramux.engine.loader import load_checkpoint
from loramux.engine.model import ModelShape
from loramux.experts import BUNDLED_COMPOSITES_DIR, BUNDLED_EXPERTS_DIR
from loramux.experts.tasks import TASKS
from loramux.experts.train import TARGET_MODULES, answer_loss, make_batch

logger = logging.getLogger(__name__)

METHODS = ("mole", "mor", "more")
DEFAULT_STEPS = {"mole": 120, "mor": 240, "more": 240}
LEARNING_RATES = {"mole": 1e-2, "mor": 4e-3, "more": 4e-3}
BALANCE_ALPHA = 0.5  # MoLE's gate balancing loss weight
CONTRASTIVE_BETA = 0.1  # MoRE's token-state / task-embedding term
SHARED_RANK = 8
MORE_RANK_CHOICES = [2, 4, 6, 8]
MORE_EMBEDDING_DIM = 16
CARD_EXAMPLES_PER_TASK = 2
TASK_NAMES = [task.name for task in TASKS]

DESCRIPTIONS = {
    "mole": "MoLE composite: learned per-layer gates over the nine demo experts ({tasks}); handles any of their "
            "tasks and mixes the experts token by token.",
    "mor": "MoR composite: one shared LoRA with nine rank-scaling experts and a router, trained on all nine demo "
           "tasks ({tasks}).",
    "more": "MoRE composite: one shared rank-8 LoRA whose rank experts are chosen per task; trained on the nine "
            "demo tasks ({tasks}); the request or the router names the task.",
}


def load_experts(experts_dir: Path, shapes: dict, num_layers: int) -> dict[str, LoraAdapter]:
    """The nine demo experts (PEFT folders named by task) as validated adapters, in task order."""
    return {name: parse_peft_adapter((experts_dir / name / CONFIG_FILE).read_bytes(),
                                     (experts_dir / name / WEIGHTS_FILE).read_bytes(), shapes, num_layers, 64)
            for name in TASK_NAMES}


def build_composite(method: str, model, experts_dir: Path, seed: int, mole_granularity: str = "layer"
                    ) -> HookedComposite:
    shape = ModelShape.from_hf_config(model.config)
    shapes, num_layers, hidden = shape.lora_target_shapes(), shape.num_layers, shape.hidden_size
    targets = tuple(TARGET_MODULES)
    if method == "mole":
        return TrainableMoLE(load_experts(experts_dir, shapes, num_layers), shapes, num_layers, hidden, seed,
                             mole_granularity)
    if method == "mor":
        return TrainableMoR(shapes, num_layers, hidden, targets, len(TASKS), SHARED_RANK, seed)
    return TrainableMoRE(shapes, num_layers, hidden, targets, SHARED_RANK, MORE_RANK_CHOICES, TASK_NAMES,
                         MORE_EMBEDDING_DIM, seed)


def mixed_batch(rng: random.Random, step: int, batch_size: int) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """(prompt, answer) pairs cycling through all tasks (training phrasings) and each row's task index [B]."""
    tasks = [(step * batch_size + row) % len(TASKS) for row in range(batch_size)]
    return [TASKS[t].sample(rng) for t in tasks], torch.tensor(tasks)


def composite_loss(composite: HookedComposite, model, batch: dict, tasks: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The answer cross-entropy under the composite plus its method's auxiliary term."""
    states = {}
    if isinstance(composite, TrainableMoRE):
        composite.batch_tasks = tasks
    hook = model.model.norm.register_forward_hook(lambda _, __, out: states.update(hidden=out))
    try:
        with composite.attached(model):
            loss = answer_loss(model, batch)
    finally:
        hook.remove()
    parts = {"ce": loss.item()}
    if isinstance(composite, TrainableMoLE):
        balance = composite.balance_loss(batch["attention_mask"])
        parts["balance"] = balance.item()
        loss = loss + BALANCE_ALPHA * balance
    elif isinstance(composite, TrainableMoRE):
        contrastive = composite.contrastive_loss(states["hidden"], batch["attention_mask"])
        parts["contrastive"] = contrastive.item()
        loss = loss + CONTRASTIVE_BETA * contrastive
    return loss, parts


def train_composite(composite: HookedComposite, model, tokenizer, steps: int, batch_size: int, lr: float,
                    seed: int, cpu_budget_s: float | None = None, wall_budget_s: float | None = None) -> dict:
    """Optimise the composite's parameters (the model stays frozen); returns the training record.

    With a budget of this process's CPU seconds or of wall-clock seconds (on a shared machine they differ
    widely), training stops after the step that exhausts it; the record says how many steps ran."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for p in composite.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 10) * max(0.05, 1 - step / steps))
    start, cpu_start = time.perf_counter(), time.process_time()
    parts, done = {}, 0
    for step in range(steps):
        pairs, tasks = mixed_batch(rng, step, batch_size)
        loss, parts = composite_loss(composite, model, make_batch(tokenizer, pairs), tasks)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        out_of_time = ((cpu_budget_s is not None and cpu >= cpu_budget_s)
                       or (wall_budget_s is not None and wall >= wall_budget_s))
        if step % 5 == 0 or done == steps or out_of_time:
            logger.info("%s step %d/%d %s (%.1f CPU s/step, %.1f wall s/step)", composite.kind, done, steps,
                        " ".join(f"{k} {v:.4f}" for k, v in parts.items()), cpu / done, wall / done)
        if out_of_time:
            logger.warning("%s: time budget spent after %d of %d steps (%.0f CPU s, %.0f wall s)", composite.kind,
                           done, steps, cpu, wall)
            break
    return {"steps": done, "planned_steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "trainable_parameters": sum(p.numel() for p in params),
            "final_loss": {k: round(v, 4) for k, v in parts.items()},
            "cpu_seconds": round(time.process_time() - cpu_start, 1),
            "wall_seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads()}


def card(method: str, seed: int) -> dict:
    """Description and CARD_EXAMPLES_PER_TASK training-phrasing examples of every task."""
    rng = random.Random(seed)
    examples = [phrasing.format(x=task.make_input(rng)[0]) for task in TASKS
                for phrasing in rng.sample(task.train_phrasings, CARD_EXAMPLES_PER_TASK)]
    return {"description": DESCRIPTIONS[method].format(tasks=", ".join(TASK_NAMES)), "examples": examples}


def write_composite(composite: HookedComposite, folder: Path, card_fields: dict, training: dict,
                    weights_dtype: torch.dtype = torch.float16) -> Path:
    """loramux_composite.json (config, card, training record) and composite.safetensors.

    Shared LoRA factors and lambdas are written in `weights_dtype` (float16 keeps the files under 4 MB; the
    engine casts to its serving dtype); gates, selectors and task embeddings stay float32."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = composite.tensors(weights_dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / COMPOSITE_WEIGHTS_FILE)
    config = composite.config() | {"card": card_fields, "training": training}
    (folder / COMPOSITE_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def heldout_items(per_task: int, seed: int) -> list[tuple[str, str, str]]:
    """(task, prompt, answer) of `per_task` held-out phrasings of every task, drawn from `seed`."""
    rng = random.Random(seed)
    return [(task.name, *task.sample(rng, "heldout")) for task in TASKS for _ in range(per_task)]


def chat_prompt(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def exact_match(items: list[tuple[str, str, str]], texts: list[str]) -> dict:
    """Overall and per-task share of generated `texts` that equal their item's answer (stripped)."""
    hits: dict[str, list[bool]] = {}
    for (task, _, answer), text in zip(items, texts):
        hits.setdefault(task, []).append(text.strip() == answer)
    return {"overall": round(sum(sum(h) for h in hits.values()) / len(items), 3),
            "per_task": {task: round(sum(h) / len(h), 3) for task, h in hits.items()},
            "per_task_prompts": len(items) // len(hits)}


def heldout_exact_match(engine, name: str, kind: str, per_task: int, seed: int, max_tokens: int = 48) -> dict:
    """Greedy exact match of composite `name` served by `engine` on every task's held-out phrasings."""
    from loramux.engine import SamplingParams

    items = heldout_items(per_task, seed)
    prompts = [chat_prompt(engine.tokenizer, prompt) for _, prompt, _ in items]
    mixes = [[{"name": name, "task": task}] if kind == "more" else [name] for task, _, _ in items]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), mixes)
    return exact_match(items, [out.new_text for [out] in outputs]) | {"via": "engine"}


def hooked_heldout_exact_match(composite: HookedComposite, model, tokenizer, per_task: int, seed: int,
                               max_tokens: int = 48, batch_size: int = 24) -> dict:
    """The same check through the training forward: transformers' greedy generate with the composite's hooks,
    for composites the engine does not serve (MoLE with per-projection gates). MoRE is not handled."""
    items = heldout_items(per_task, seed)
    texts = []
    saved = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.pad_token or tokenizer.eos_token
    try:
        for start in range(0, len(items), batch_size):
            prompts = [chat_prompt(tokenizer, prompt) for _, prompt, _ in items[start:start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad(), composite.attached(model):
                out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = saved
    return exact_match(items, texts) | {"via": "hooks"}


def serving_engine(experts_dir: Path, model: str | None, dtype: str = "auto"):
    """An engine with the demo experts of `experts_dir` registered, room for nine-member composites."""
    from loramux.config import EngineConfig, ModelConfig, StoreConfig
    from loramux.engine import Engine

    return Engine(EngineConfig(model=ModelConfig(model=model, dtype=dtype), store=StoreConfig(
        adapter_dirs=[str(experts_dir)], max_composite_members=len(TASKS))))


def _methods(value: str) -> list[str]:
    methods = value.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    return methods


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), type=_methods,
                        help="comma-separated subset of mole,mor,more")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {DEFAULT_STEPS})")
    parser.add_argument("--batch-size", type=int, default=9, help="rows per step, cycling through the nine tasks")
    parser.add_argument("--out", default=str(BUNDLED_COMPOSITES_DIR))
    parser.add_argument("--experts-dir", default=str(BUNDLED_EXPERTS_DIR),
                        help="the demo experts MoLE gates over (folders named by task)")
    parser.add_argument("--model", default=None, help="HF folder of the base model (default: the bundled one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="dtype of the frozen base weights while training (composite parameters are float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cpu-budget-s", type=float, default=None,
                        help="stop each method's training after this many CPU seconds of this process")
    parser.add_argument("--wall-budget-s", type=float, default=None,
                        help="stop each method's training after this many wall-clock seconds")
    parser.add_argument("--heldout-per-task", type=int, default=8,
                        help="held-out prompts per task in the check through the engine (0: no check)")
    parser.add_argument("--heldout-max-tokens", type=int, default=48, help="tokens generated per held-out prompt")
    parser.add_argument("--heldout-via", choices=["engine", "hooks"], default="engine",
                        help="serve the held-out check with the engine, or with transformers and the training hooks "
                             "(mole and mor only)")
    parser.add_argument("--mole-granularity", choices=["layer", "projection"], default="layer",
                        help="one MoLE gate per decoder layer, or per (decoder layer, projection): the engine "
                             "serves only 'layer', so 'projection' needs --heldout-via hooks or --heldout-per-task 0")
    args = parser.parse_args(argv)
    if args.heldout_per_task and args.heldout_via == "engine" and args.mole_granularity == "projection":
        parser.error("the engine does not serve per-projection MoLE gates: pass --heldout-via hooks")
    if args.mole_granularity == "projection" and "mole" in args.methods and Path(args.out) == BUNDLED_COMPOSITES_DIR:
        parser.error("the engine does not serve per-projection MoLE gates: pass an --out other than the bundled "
                     "composites, whose mole_demo the default serve loads")
    if args.heldout_per_task and args.heldout_via == "hooks" and "more" in args.methods:
        parser.error("--heldout-via hooks does not check MoRE (its task is set per row): drop it from --methods")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    checkpoint = load_checkpoint(args.model)
    model = AutoModelForCausalLM.from_pretrained(checkpoint.folder, dtype=getattr(torch, args.base_dtype))
    model.requires_grad_(False)
    experts_dir = Path(args.experts_dir)
    written = []
    for method in args.methods:
        seed = args.seed + METHODS.index(method)
        composite = build_composite(method, model, experts_dir, seed, args.mole_granularity)
        training = train_composite(composite, model, checkpoint.tokenizer, args.steps or DEFAULT_STEPS[method],
                                   args.batch_size, LEARNING_RATES[method], seed, args.cpu_budget_s,
                                   args.wall_budget_s)
        training["base_dtype"] = args.base_dtype
        if isinstance(composite, TrainableMoRE):
            training["selected_ranks"] = composite.selected_ranks()
        folder = write_composite(composite, Path(args.out) / f"{method}_demo", card(method, seed), training)
        logger.info("%s trained in %.0f CPU s -> %s", method, training["cpu_seconds"], folder)
        written.append((method, composite, folder, training))
    if args.heldout_per_task:
        engine = serving_engine(experts_dir, args.model) if args.heldout_via == "engine" else None
        for method, composite, folder, training in written:
            if engine is None:
                score = hooked_heldout_exact_match(composite, model, checkpoint.tokenizer, args.heldout_per_task,
                                                   args.seed, args.heldout_max_tokens)
            else:
                engine.add_adapter(folder.name, str(folder))
                score = heldout_exact_match(engine, folder.name, method, args.heldout_per_task, args.seed,
                                            args.heldout_max_tokens)
            logger.info("%s held-out exact match %.3f %s", folder.name, score["overall"], score["per_task"])
            training["heldout_exact_match"] = score
            config = json.loads((folder / COMPOSITE_CONFIG_FILE).read_text())
            config["training"] = training
            (folder / COMPOSITE_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
