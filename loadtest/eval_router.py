"""Evaluate the router and the bundled demo experts on held-out phrasings.

    python -m loadtest.eval_router [--per-task 20] [--embedders minilm,base] [--distractors 500] [--plot PNG]
                                   [--mole PATH] [--mor PATH] [--more PATH] [--runs select,mole,...]

Reports, per task and overall:
- routing top-1 accuracy and router latency for each embedder, and with its
  default (calibrated) rule: task prompts routed to the right expert, general
  prompts (loramux/router/data/general_heldout.txt) left to the base model;
- the candidate no-expert rules of loadtest/no_expert_rules.py swept over
  their settings (first embedder), with a plot (--plot);
- exact-match task accuracy of the base model alone, the oracle expert,
  router `select`, `mixture` (k = 2, 3) and `fusion` (k = 2), with the first
  embedder of --embedders, and of the composite experts (MoLE, MoR, MoRE;
  --mole/--mor/--more, default: the shipped ones, skipped when absent) as
  the router sends prompts to them (strategies mole/mor/more; `auto` is
  select with the composites registered; `more_oracle_task` gives MoRE the
  right task), per task and overall, on the held-out phrasings and on
  two-task prompts (loadtest/two_task_prompts.py), with each run's output
  tokens/s on the same batch and a plot (--methods-plot);
- routing accuracy again after registering random distractor experts
  (random weights, generic cards).
Prompts use the tasks' held-out phrasings (or, with --phrasings check, the
later check phrasings), which no expert was trained on and no card contains. Writes a JSON file and prints a table.
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

from loramux.adapters_store.registry import AdapterRecord
from loramux.adapters_store.synthetic import write_random_adapter
from loramux.config import CacheConfig, EngineConfig, ModelConfig, RouterConfig, SchedulerConfig, StoreConfig
from loramux.engine import Engine, SamplingParams
from loramux.experts import BUNDLED_COMPOSITES_DIR, BUNDLED_EXPERTS_DIR
from loramux.experts.tasks import TASKS
from loramux.adapters_store.registry import COMPOSITE_CONFIG_FILE
from loramux.router import Router, build_embedder, load_prompts
from loramux.router.index import embed_card
from loadtest.no_expert_rules import RuleScores, best_point, plot_tradeoff, sweep
from loadtest.two_task_prompts import TWO_TASK_KINDS, two_task_set

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
DISTRACTOR_EXAMPLES = ("Tell me something interesting about {t}.", "Write a short paragraph on {t}.",
                       "What should a beginner know about {t}?", "Give me three tips about {t}.",
                       "Explain {t} to a child.", "Answer my question about {t}: where do I start?")


def heldout_set(per_task: int, seed: int, split: str = "heldout") -> list[tuple[str, str, str]]:
    """(task name, prompt, exact answer) with one evaluation split's phrasings ("heldout" or "check")."""
    rng = random.Random(seed)
    return [(task.name, *task.sample(rng, split)) for task in TASKS for _ in range(per_task)]


def chat_prompt(engine: Engine, text: str) -> str:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def evaluate_routing(router: Router, items: list[tuple[str, str, str]], general: list[str]) -> dict:
    """Top-1 routing accuracy per task and overall, the router's latency per request, and with the
    router's default rule: task prompts routed to the right expert, general prompts left to the base model."""
    hits: dict[str, list[bool]] = {}
    routed_right: dict[str, list[bool]] = {}
    seconds = []
    for task, prompt, _ in items:
        decision = router.route(prompt, strategy="select")
        seconds.append(decision.seconds)
        hits.setdefault(task, []).append(bool(decision.candidates) and decision.candidates[0][0] == task)
        routed_right.setdefault(task, []).append(bool(decision.experts) and decision.experts[0][0] == task)
    general_decisions = [router.route(p) for p in general]
    seconds += [d.seconds for d in general_decisions]
    return {"accuracy": sum(sum(h) for h in hits.values()) / len(items),
            "per_task": {task: sum(h) / len(h) for task, h in hits.items()},
            "margin": router.config.margin,
            "task_routed_right": sum(sum(h) for h in routed_right.values()) / len(items),
            "task_routed_right_per_task": {task: sum(h) / len(h) for task, h in routed_right.items()},
            "general_to_base": sum(not d.experts for d in general_decisions) / len(general),
            "general_not_to_base": [(p, d.experts[0][0]) for p, d in zip(general, general_decisions) if d.experts],
            "latency_ms": {"mean": 1e3 * sum(seconds) / len(seconds), "p50": 1e3 * percentile(seconds, 0.5),
                           "p99": 1e3 * percentile(seconds, 0.99)}}


def compare_rules(router: Router, store_records: dict, items, general: list[str]) -> dict:
    """The candidate no-expert rules swept over their settings, on the router's embeddings of the cards."""
    cards = {name: embed_card(router.embedder, r.description, r.examples) for name, r in store_records.items()
             if not r.fused_from and (r.description or r.examples)}
    scores = RuleScores(cards, router.generic)
    sweeps = sweep(scores, router.embedder.embed([p for _, p, _ in items]), [t for t, _, _ in items],
                   router.embedder.embed(general))
    return {"sweep": sweeps, "best": {rule: best_point(points) for rule, points in sweeps.items()}}


def synthetic_records(count: int, seed: int) -> dict[str, AdapterRecord]:
    """`count` expert cards composed from generic topics (no weights: the router reads only cards)."""
    rng = random.Random(seed)
    records = {}
    for i in range(count):
        topic = rng.choice(DISTRACTOR_TOPICS)
        records[f"synthetic-{i}"] = AdapterRecord(
            name=f"synthetic-{i}", path="", base_model=None, rank=2, alpha=4.0, target_modules=["q_proj"],
            size_bytes=0, checksum="", description=f"Helps with {topic}.",
            examples=[e.format(t=topic) for e in rng.sample(DISTRACTOR_EXAMPLES, 3)])
    return records


def bundled_records(experts_dir: Path = BUNDLED_EXPERTS_DIR) -> dict[str, AdapterRecord]:
    """The bundled experts' cards as records, without loading any weights: the router reads only the cards, so
    rank, alpha and targets are placeholders."""
    records = {}
    for folder in sorted(p for p in experts_dir.iterdir() if (p / "loramux.json").is_file()):
        card = json.loads((folder / "loramux.json").read_text())
        records[folder.name] = AdapterRecord(
            name=folder.name, path=str(folder), base_model=None, rank=8, alpha=16.0, target_modules=["q_proj"],
            size_bytes=0, checksum="", description=card.get("description", ""), examples=card.get("examples", []))
    return records


def benchmark_latency(embedder, records: dict[str, AdapterRecord], prompts: list[str], repeats: int) -> dict:
    """Router latency per request, one at a time on one torch thread, over `records` (the bundled experts and
    synthetic ones): wall-clock and the routing thread's CPU time (less disturbed by a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        router = Router(embedder, RouterConfig(), records)
        router.wait_for_updates(None)
        wall, cpu = [], []
        for _ in range(repeats):
            for prompt in prompts:
                start_cpu = time.thread_time()
                wall.append(router.route(prompt).seconds)
                cpu.append(time.thread_time() - start_cpu)
    finally:
        torch.set_num_threads(threads)
    summary = {}
    for name, values in (("wall_ms", wall), ("cpu_ms", cpu)):
        summary[name] = {"mean": 1e3 * sum(values) / len(values), "p50": 1e3 * percentile(values, 0.5),
                         "p99": 1e3 * percentile(values, 0.99)}
    return {"experts": len(records), "requests": len(wall), "torch_threads": 1, **summary}


COMPOSITE_KINDS = ("mole", "mor", "more")
LORARETRIEVER_RUNS = ("base", "oracle", "select", "mixture_k2", "mixture_k3", "fusion_k2")
COMPOSITE_RUNS = ("auto", "mole", "mor", "more", "more_oracle_task")


def register_composites(engine: Engine, paths: dict[str, str]) -> dict[str, str]:
    """Register the composite folders that exist: kind -> registered name; the others are reported and skipped."""
    names = {}
    for kind, path in paths.items():
        folder = Path(path)
        if not (folder / COMPOSITE_CONFIG_FILE).is_file():
            logger.warning("no %s composite at %s (not shipped yet?): its rows are skipped; pass --%s PATH",
                           kind, folder, kind)
            continue
        if folder.name not in engine.composites:
            engine.add_adapter(folder.name, str(folder))
        names[kind] = folder.name
    return names


def routed_mixes(engine: Engine, router: Router, items, strategy: str, k: int) -> tuple[list[tuple], float]:
    """The lora_mix the server would use for every prompt under one strategy, and the share of prompts the
    router left to the base model."""
    decisions = [router.route(prompt, strategy=strategy, top_k=k) for _, prompt, _ in items]
    return [d.lora_mix(engine.store) for d in decisions], sum(not d.experts for d in decisions) / len(items)


def generation_runs(engine: Engine, routers: dict[str, Router], items, composites: dict[str, str],
                    with_oracle: bool, wanted: set[str]) -> dict[str, tuple[list[tuple], float | None]]:
    """Run name -> (one mix per prompt, share left to the base model by the router or None). `routers`:
    `experts` (LoraRetriever: experts only) and `composites` (the composites registered too)."""
    runs: dict[str, tuple[list[tuple], float | None]] = {"base": ([()] * len(items), None)}
    if with_oracle:
        runs["oracle"] = ([((task, 1.0),) for task, _, _ in items], None)
    for name, strategy, k in (("select", "select", 1), ("mixture_k2", "mixture", 2), ("mixture_k3", "mixture", 3),
                              ("fusion_k2", "fusion", 2)):
        if name in wanted:
            runs[name] = routed_mixes(engine, routers["experts"], items, strategy, k)
    if composites and "auto" in wanted:
        runs["auto"] = routed_mixes(engine, routers["composites"], items, "select", 1)
    for kind, name in composites.items():
        if kind in wanted:
            runs[kind] = routed_mixes(engine, routers["composites"], items, kind, 1)
    if "more" in composites and with_oracle and "more_oracle_task" in wanted:
        runs["more_oracle_task"] = ([({"name": composites["more"], "task": task},) for task, _, _ in items], None)
    return {name: run for name, run in runs.items() if name in wanted}


def task_accuracy(engine: Engine, items, mixes, max_tokens: int) -> dict:
    """Exact match (after stripping whitespace) per task and overall, greedy decoding, and the output
    tokens/s of the whole batch."""
    prompts = [chat_prompt(engine, prompt) for _, prompt, _ in items]
    start = time.perf_counter()
    outputs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), mixes)
    seconds = time.perf_counter() - start
    hits: dict[str, list[bool]] = {}
    for (task, _, answer), [out] in zip(items, outputs):
        hits.setdefault(task, []).append(out.new_text.strip() == answer)
    tokens = sum(out.num_output_tokens for [out] in outputs)
    return {"accuracy": sum(sum(h) for h in hits.values()) / len(items),
            "per_task": {task: sum(h) / len(h) for task, h in hits.items()},
            "output_tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


def evaluate_generation(engine: Engine, routers: dict[str, Router], items, composites: dict[str, str],
                        with_oracle: bool, wanted: set[str], max_tokens: int) -> dict:
    """Every run's exact match and tokens/s on `items`, the same batch for each."""
    results = {}
    for name, (mixes, to_base) in generation_runs(engine, routers, items, composites, with_oracle, wanted).items():
        results[name] = task_accuracy(engine, items, mixes, max_tokens)
        if to_base is not None:
            results[name]["router_to_base"] = to_base
        logger.info("%s: %.3f, %.1f tokens/s", name, results[name]["accuracy"], results[name]["tokens_per_second"])
    return results


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
    parser.add_argument("--phrasings", choices=["heldout", "check"], default="heldout",
                        help="evaluation split of loramux/experts/tasks.py: the held-out phrasings, or the "
                             "later check phrasings that nothing was tuned on")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--embedders", default="minilm,base", help="first one drives the task-accuracy runs")
    parser.add_argument("--distractors", type=int, default=500)
    parser.add_argument("--latency-experts", type=int, default=500,
                        help="registered experts (bundled + synthetic cards) for the latency benchmark; 0: none")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--skip-generation", action="store_true", help="routing numbers only")
    for kind in COMPOSITE_KINDS:
        parser.add_argument(f"--{kind}", default=str(BUNDLED_COMPOSITES_DIR / f"{kind}_demo"),
                            help=f"{kind} composite folder (default: the shipped one; its rows are skipped if absent)")
    parser.add_argument("--runs", default=",".join(LORARETRIEVER_RUNS + COMPOSITE_RUNS),
                        help="which generation runs (rows) to make")
    parser.add_argument("--two-task-per-kind", type=int, default=12,
                        help=f"two-task prompts per kind ({len(TWO_TASK_KINDS)} kinds); 0: none")
    parser.add_argument("--methods-plot", default="docs/figures/router_methods.png",
                        help="exact match per task and method ('' for none)")
    parser.add_argument("--out", default="loadtest/results/eval_router.json")
    parser.add_argument("--plot", default="docs/figures/router_no_expert.png", help="trade-off plot ('' for none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("loramux").setLevel(logging.WARNING)

    engine = Engine(EngineConfig(
        model=ModelConfig(), cache=CacheConfig(num_blocks=1024),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=1024),
        store=StoreConfig(max_loras=16, adapter_dirs=[args.experts_dir], max_composite_members=16),
        router=RouterConfig(max_fused=1024)))  # every fusion is built before the runs: none may be evicted
    items = heldout_set(args.per_task, args.seed, args.phrasings)
    general = load_prompts("general_heldout.txt")
    experts = sorted(engine.store.records)
    report: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                               f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                    "experts": experts, "prompts": len(items), "general_prompts": len(general),
                    "per_task": args.per_task, "seed": args.seed, "phrasings": args.phrasings,
                    "routing": {}, "tasks": {}}
    logger.info("%d experts, %d held-out prompts", len(experts), len(items))

    routers = {}
    for kind in args.embedders.split(","):
        start = time.perf_counter()
        routers[kind] = Router(build_embedder(kind, engine), RouterConfig(embedder=kind), engine.store.records)
        engine.store.change_listeners.append(routers[kind].queue_update)
        routers[kind].wait_for_updates(None)
        report["routing"][kind] = evaluate_routing(routers[kind], items, general)
        report["routing"][kind]["index_seconds"] = time.perf_counter() - start
        logger.info("routing %s: %.3f", kind, report["routing"][kind]["accuracy"])
    main_router = routers[args.embedders.split(",")[0]]
    report["no_expert_rules"] = compare_rules(main_router, engine.store.records, items, general)
    if args.plot:
        plot_tradeoff(report["no_expert_rules"]["sweep"], main_router.config.margin, Path(args.plot))
    if args.latency_experts:
        records = {**engine.store.records, **synthetic_records(args.latency_experts - len(experts), args.seed)}
        report["latency"] = benchmark_latency(main_router.embedder, records,
                                              [p for _, p, _ in items] + general, repeats=2)
        logger.info("latency with %d experts: %s", len(records), report["latency"])

    if not args.skip_generation:
        composites = register_composites(engine, {kind: getattr(args, kind) for kind in COMPOSITE_KINDS})
        report["composites"] = composites
        # LoraRetriever's strategies route among the experts alone; the composite rows use a second router
        # (same embedder) that also indexes the composites, as the server's does.
        routers = {"experts": main_router,
                   "composites": Router(main_router.embedder, main_router.config, engine.store.records,
                                        engine.composites.records)}
        wanted = set(args.runs.split(","))
        report["tasks"] = evaluate_generation(engine, routers, items, composites, True, wanted, args.max_tokens)
        two_task = two_task_set(args.two_task_per_kind, args.seed)
        report["two_task"] = evaluate_generation(engine, routers, two_task, composites, False, wanted,
                                                 args.max_tokens) if two_task else {}
        report["two_task_prompts"] = len(two_task)
        if args.methods_plot:
            from loadtest.plots import accuracy_by_group

            panels = [(f"held-out phrasings, {args.per_task} per task",
                       {run: r["per_task"] for run, r in report["tasks"].items()})]
            if report["two_task"]:
                panels.append((f"two-task prompts, {args.two_task_per_kind} per kind",
                               {run: r["per_task"] for run, r in report["two_task"].items()}))
            accuracy_by_group(panels, Path(args.methods_plot))

    if args.distractors:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            register_distractors(engine, args.distractors, Path(tmp), args.seed)
            report["distractors"] = {"count": args.distractors, "register_seconds": time.perf_counter() - start}
            for kind, router in routers.items():  # their indexes took the distractors in as they registered
                router.wait_for_updates(None)
                report["distractors"][f"{kind}_index_seconds"] = time.perf_counter() - start
                report["distractors"][kind] = evaluate_routing(router, items, general)
                logger.info("routing %s with %d distractors: %.3f", kind, args.distractors,
                            report["distractors"][kind]["accuracy"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))


def format_report(report: dict) -> str:
    """Markdown tables: routing accuracy/latency per embedder, task accuracy per configuration."""
    tasks = [task.name for task in TASKS]
    lines = [f"machine: {report['machine']}; {report['prompts']} held-out prompts ({report['per_task']} per task)", "",
             "| embedder | routing top-1 | task prompts routed right | general prompts to base | "
             "latency mean / p99 (ms) | with distractors: top-1, routed right, p99 (ms) |", "|---|---|---|---|---|---|"]
    for kind, r in report["routing"].items():
        d = report.get("distractors", {}).get(kind)
        with_d = "-" if d is None else (f"{d['accuracy']:.3f}, {d['task_routed_right']:.3f}, "
                                        f"{d['latency_ms']['p99']:.1f}")
        lines.append(f"| {kind} | {r['accuracy']:.3f} | {r['task_routed_right']:.3f} | {r['general_to_base']:.3f} | "
                     f"{r['latency_ms']['mean']:.1f} / {r['latency_ms']['p99']:.1f} | {with_d} |")
    if "latency" in report:
        lat = report["latency"]
        lines += ["", f"router latency, {lat['experts']} experts, {lat['requests']} requests, 1 torch thread: "
                      f"wall p50 {lat['wall_ms']['p50']:.1f} ms, p99 {lat['wall_ms']['p99']:.1f} ms; "
                      f"CPU p50 {lat['cpu_ms']['p50']:.1f} ms, p99 {lat['cpu_ms']['p99']:.1f} ms"]
    lines += ["", "| rule | best setting | task prompts routed right | general prompts to base |", "|---|---|---|---|"]
    for rule, p in report["no_expert_rules"]["best"].items():
        lines.append(f"| {rule} | {p['setting']:g} | {p['task_routed_right']:.3f} | {p['general_to_base']:.3f} |")
    for key, groups in (("tasks", tasks), ("two_task", [kind.name for kind in TWO_TASK_KINDS])):
        results = report.get(key)
        if results:
            lines += ["", accuracy_table(results, groups)]
    return "\n".join(lines)


def accuracy_table(results: dict, groups: list[str]) -> str:
    """Exact match per group (task or two-task kind) and overall, one column per run, then tokens/s."""
    runs = list(results)
    lines = ["| task | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for group in groups:
        lines.append(f"| {group} | " + " | ".join(f"{results[r]['per_task'][group]:.2f}" for r in runs) + " |")
    lines.append("| **all** | " + " | ".join(f"**{results[r]['accuracy']:.3f}**" for r in runs) + " |")
    lines.append("| tokens/s | " + " | ".join(f"{results[r]['tokens_per_second']:.1f}" for r in runs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
