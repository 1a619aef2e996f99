"""Evaluate the router and the bundled demo experts on held-out phrasings.

    python -m loadtest.eval_router [--per-task 20] [--embedders minilm,base] [--distractors 500]

Reports, per task and overall:
- routing top-1 accuracy and router latency for each embedder;
- exact-match task accuracy of the base model alone, the oracle expert,
  router `select`, `mixture` (k = 2, 3) and `fusion` (k = 2), with the first
  embedder of --embedders;
- routing accuracy again after registering random distractor experts
  (random weights, generic cards).
Prompts use the tasks' held-out phrasings, which no expert was trained on and
no card contains. Writes a JSON file and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from loramux.adapters_store.synthetic import write_random_adapter
from loramux.config import CacheConfig, EngineConfig, ModelConfig, RouterConfig, SchedulerConfig, StoreConfig
from loramux.engine import Engine, SamplingParams
from loramux.experts import BUNDLED_EXPERTS_DIR
from loramux.experts.tasks import TASKS
from loramux.router import Router, build_embedder

logger = logging.getLogger("eval_router")

DISTRACTOR_TOPICS = (
    "gardening", "astronomy", "cooking pasta", "medieval history", "jazz music", "car repair", "yoga",
    "knitting", "chess openings", "bird watching", "tax law", "football tactics", "photography", "wine tasting",
    "marine biology", "poetry", "home insurance", "video games", "mountain hiking", "baking bread",
    "stock markets", "ancient Rome", "climate science", "dog training", "interior design", "opera",
    "cybersecurity", "volcanoes", "fashion trends", "quantum physics", "sailing", "beekeeping",
    "customer service emails", "job interviews", "meditation", "travel in Japan", "film criticism",
    "kitchen plumbing", "electric cars", "wedding planning",
)
# Requests no demo expert is for: how often the default threshold leaves them to the base model.
GENERAL_PROMPTS = (
    "Tell me a joke about cats.", "Write a haiku about the sea.", "What is machine learning?",
    "Hello, how are you today?", "Explain how photosynthesis works.", "Give me a recipe for pancakes.",
    "Who wrote Hamlet?", "Summarize the plot of Star Wars.", "Translate 'good morning' into French.",
    "What should I cook tonight?", "Describe the water cycle.", "Why is the sky blue?",
    "Suggest a name for my new puppy.", "How do I change a flat tyre?", "What are the rules of chess?",
    "Write a limerick about a programmer.", "Recommend a good science fiction novel.",
    "How far away is the Moon?", "What causes earthquakes?", "Plan a three-day trip to Rome.",
)
DISTRACTOR_EXAMPLES = ("Tell me something interesting about {t}.", "Write a short paragraph on {t}.",
                       "What should a beginner know about {t}?", "Give me three tips about {t}.",
                       "Explain {t} to a child.", "Answer my question about {t}: where do I start?")


def heldout_set(per_task: int, seed: int) -> list[tuple[str, str, str]]:
    """(task name, prompt, exact answer) with held-out phrasings only."""
    rng = random.Random(seed)
    return [(task.name, *task.sample(rng, heldout=True)) for task in TASKS for _ in range(per_task)]


def chat_prompt(engine: Engine, text: str) -> str:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def evaluate_routing(router: Router, items: list[tuple[str, str, str]]) -> dict:
    """Top-1 routing accuracy per task and overall, the router's latency per request, and how often the
    default threshold hands task prompts and general prompts to the base model."""
    hits: dict[str, list[bool]] = {}
    seconds = []
    task_fallbacks = 0
    for task, prompt, _ in items:
        decision = router.route(prompt, strategy="select")
        seconds.append(decision.seconds)
        hits.setdefault(task, []).append(bool(decision.candidates) and decision.candidates[0][0] == task)
        task_fallbacks += not decision.experts
    per_task = {task: sum(h) / len(h) for task, h in hits.items()}
    task_fallback = task_fallbacks / len(items)
    general_fallback = sum(router.route(p).experts == [] for p in GENERAL_PROMPTS) / len(GENERAL_PROMPTS)
    return {"accuracy": sum(sum(h) for h in hits.values()) / len(items), "per_task": per_task,
            "threshold": router.threshold, "task_prompts_to_base": task_fallback,
            "general_prompts_to_base": general_fallback,
            "latency_ms": {"mean": 1e3 * sum(seconds) / len(seconds), "p50": 1e3 * percentile(seconds, 0.5),
                           "p99": 1e3 * percentile(seconds, 0.99)}}


def routed_mixes(engine: Engine, router: Router, items, strategy: str, k: int) -> list[tuple]:
    """The lora_mix the server would use for every prompt under one strategy."""
    return [router.route(prompt, strategy=strategy, top_k=k).lora_mix(engine.store) for _, prompt, _ in items]


def task_accuracy(engine: Engine, items, mixes, max_tokens: int) -> dict:
    """Exact match (after stripping whitespace) per task and overall, greedy decoding."""
    prompts = [chat_prompt(engine, prompt) for _, prompt, _ in items]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), mixes)
    hits: dict[str, list[bool]] = {}
    for (task, _, answer), [out] in zip(items, outputs):
        hits.setdefault(task, []).append(out.new_text.strip() == answer)
    return {"accuracy": sum(sum(h) for h in hits.values()) / len(items),
            "per_task": {task: sum(h) / len(h) for task, h in hits.items()}}


def register_distractors(engine: Engine, count: int, folder: Path, seed: int) -> None:
    """`count` rank-2 q_proj adapters with random weights and generic, randomly composed cards.

    Registering them runs every router's change listener, so this also times index updates.
    """
    rng = random.Random(seed)
    shapes, layers = engine.shape.lora_target_shapes(), engine.shape.num_layers
    for i in range(count):
        topic = rng.choice(DISTRACTOR_TOPICS)
        path = write_random_adapter(folder / f"distractor-{i}", shapes, layers, rank=2, seed=seed + i,
                                    targets=("q_proj",))
        examples = [e.format(t=topic) for e in rng.sample(DISTRACTOR_EXAMPLES, 3)]
        engine.add_adapter(f"distractor-{i}", str(path), {"description": f"Helps with {topic}.",
                                                        "examples": examples})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts-dir", default=str(BUNDLED_EXPERTS_DIR))
    parser.add_argument("--per-task", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--embedders", default="minilm,base", help="first one drives the task-accuracy runs")
    parser.add_argument("--distractors", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--skip-generation", action="store_true", help="routing numbers only")
    parser.add_argument("--out", default="loadtest/results/eval_router.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("loramux").setLevel(logging.WARNING)

    engine = Engine(EngineConfig(
        model=ModelConfig(), cache=CacheConfig(num_blocks=1024),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=1024),
        store=StoreConfig(max_loras=16, adapter_dirs=[args.experts_dir]),
        router=RouterConfig(max_fused=1024)))  # every fusion is built before the runs: none may be evicted
    items = heldout_set(args.per_task, args.seed)
    experts = sorted(engine.store.records)
    report: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                               f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                    "experts": experts, "prompts": len(items), "per_task": args.per_task, "seed": args.seed,
                    "routing": {}, "tasks": {}}
    logger.info("%d experts, %d held-out prompts", len(experts), len(items))

    routers = {}
    for kind in args.embedders.split(","):
        start = time.perf_counter()
        routers[kind] = Router(build_embedder(kind, engine), RouterConfig(embedder=kind), engine.store.records)
        engine.store.change_listeners.append(routers[kind].update)
        report["routing"][kind] = evaluate_routing(routers[kind], items)
        report["routing"][kind]["index_seconds"] = time.perf_counter() - start
        logger.info("routing %s: %.3f", kind, report["routing"][kind]["accuracy"])
    main_router = routers[args.embedders.split(",")[0]]

    if not args.skip_generation:
        runs = {"base": [()] * len(items), "oracle": [((task, 1.0),) for task, _, _ in items],
                "select": routed_mixes(engine, main_router, items, "select", 1),
                "mixture_k2": routed_mixes(engine, main_router, items, "mixture", 2),
                "mixture_k3": routed_mixes(engine, main_router, items, "mixture", 3),
                "fusion_k2": routed_mixes(engine, main_router, items, "fusion", 2)}
        for name, mixes in runs.items():
            start = time.perf_counter()
            report["tasks"][name] = task_accuracy(engine, items, mixes, args.max_tokens)
            logger.info("%s: %.3f (%.0f s)", name, report["tasks"][name]["accuracy"], time.perf_counter() - start)

    if args.distractors:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            register_distractors(engine, args.distractors, Path(tmp), args.seed)
            report["distractors"] = {"count": args.distractors, "register_seconds": time.perf_counter() - start}
            for kind, router in routers.items():  # their indexes took the distractors in as they registered
                report["distractors"][kind] = evaluate_routing(router, items)
                logger.info("routing %s with %d distractors: %.3f", kind, args.distractors,
                            report["distractors"][kind]["accuracy"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))


def format_report(report: dict) -> str:
    """Markdown tables: routing accuracy/latency per embedder, task accuracy per configuration."""
    tasks = [task.name for task in TASKS]
    lines = [f"machine: {report['machine']}; {report['prompts']} held-out prompts ({report['per_task']} per task)", "",
             "| embedder | routing acc | with distractors | latency mean / p99 (ms) | threshold | "
             "task prompts to base | general prompts to base |", "|---|---|---|---|---|---|---|"]
    for kind, r in report["routing"].items():
        with_d = report.get("distractors", {}).get(kind, {}).get("accuracy")
        lines.append(f"| {kind} | {r['accuracy']:.3f} | {'-' if with_d is None else f'{with_d:.3f}'} | "
                     f"{r['latency_ms']['mean']:.1f} / {r['latency_ms']['p99']:.1f} | {r['threshold']} | "
                     f"{r['task_prompts_to_base']:.3f} | {r['general_prompts_to_base']:.3f} |")
    if report["tasks"]:
        runs = list(report["tasks"])
        lines += ["", "| task | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
        for task in tasks:
            lines.append(f"| {task} | " + " | ".join(f"{report['tasks'][r]['per_task'][task]:.2f}" for r in runs) + " |")
        lines.append("| **all** | " + " | ".join(f"**{report['tasks'][r]['accuracy']:.3f}**" for r in runs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
