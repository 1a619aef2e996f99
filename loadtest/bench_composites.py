"""Composite experts batched with plain adapters: decode step time against plain-only batches (not a test).

The bundled SmolLM2-135M on the CPU (or `--model`), 32 concurrent requests,
`--prompt-tokens` prompts, `--new-tokens` greedy tokens. Measured in one run,
each batch on the same engine:
  plain r16        32 requests over 16 random rank-16 adapters (all seven projections)
  plain r8         the same with rank-8 adapters
  + MoLE           16 plain r16 + 16 MoLE over 4 rank-16 members
  + MoR            16 plain r16 + 16 MoR, 8 experts at rank 16
  plain r8 + 4    16 plain r8 + 16 requests over 4 more rank-8 adapters
  + MoRE           16 plain r8  + 16 MoRE at rank 8 (4 tasks, rank choices 2/4/8)
  all mixed        8 plain r16 + 8 MoLE + 8 MoR + 8 MoRE
MoRE's reference is `plain r8 + 4`: the same batch with each task's member
replaced by a plain rank-8 adapter, so both read 20 adapter slots and the
ratio is the cost of MoRE itself; MoLE, MoR and all mixed compare with
`plain r16`. Each batch's figure is the median time of its decode-only steps
(every request past its prompt). `--rounds` runs every batch once per round,
in turn, so a change in the machine's load hits them alike; a ratio is taken
within each round, and the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_common import machine_description

from loramux.adapters_store.synthetic import write_random_adapter
from loramux.composites.synthetic import write_random_mole, write_random_mor, write_random_more
from loramux.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, StoreConfig
from loramux.engine import Engine, SamplingParams

logger = logging.getLogger("bench_composites")
NUM_REQUESTS = 32
MORE_TASKS = ["t0", "t1", "t2", "t3"]


def decode_step_seconds(engine: Engine, prompts: list[list[int]], mixes: list, new_tokens: int) -> float:
    """Median duration of the steps in which every request decodes."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i, (prompt, mix) in enumerate(zip(prompts, mixes)):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt, params, mix)
    durations = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - start
        if engine.last_step_num_tokens == len(prompts):  # one token per request: a pure decode step
            durations.append(seconds)
    return statistics.median(durations)


def build_engine(model: str | None, folder: Path, threads_note: str) -> Engine:
    engine = Engine(EngineConfig(
        model=ModelConfig(model=model),
        cache=CacheConfig(num_blocks=1024, block_size=16),
        scheduler=SchedulerConfig(max_num_seqs=NUM_REQUESTS, max_num_batched_tokens=4096, max_loras_per_batch=64),
        store=StoreConfig(max_loras=64, max_lora_rank=16, max_composites=4, max_composite_members=8)))
    shape = engine.shape
    shapes, layers, hidden = shape.lora_target_shapes(), shape.num_layers, shape.hidden_size
    for rank, count in ((16, 16), (8, 20)):
        for i in range(count):
            name = f"r{rank}-{i}"
            engine.add_adapter(name, str(write_random_adapter(folder / name, shapes, layers, rank, seed=rank * 100 + i)))
    write_random_mole(folder / "mole", ["r16-0", "r16-1", "r16-2", "r16-3"], layers, hidden, seed=1)
    write_random_mor(folder / "mor", shapes, layers, hidden, num_experts=8, rank=16, seed=2,
                     targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    write_random_more(folder / "more", shapes, layers, rank=8, rank_choices=[2, 4, 8], tasks=MORE_TASKS, seed=3,
                      targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    for name in ("mole", "mor", "more"):
        engine.add_adapter(name, str(folder / name))
    logger.info("machine: %s (%s)", machine_description(engine.device.type), threads_note)
    return engine


def slot_mib(engine: Engine) -> float:
    """Device memory of one adapter slot across every LoRA-aware projection."""
    return sum(m.lora_a[0].nbytes + m.lora_b[0].nbytes for _, m in engine.model.lora_linears()) / 2**20


def scale_row_mib(engine: Engine) -> float:
    """Device memory of one row of the MoR scaling-vector pools (one expert) across every LoRA-aware projection."""
    return sum(m.rank_scale[0].nbytes + m.out_scale[0].nbytes for _, m in engine.model.lora_linears()) / 2**20


def batches() -> tuple[dict[str, list], dict[str, str]]:
    """Batch label -> one mix per request, and batch label -> the label of its reference batch."""
    def plain(rank: int, n: int, first: int = 0, distinct: int = 16) -> list:
        return [[f"r{rank}-{first + i % distinct}"] for i in range(n)]

    more = [[{"name": "more", "task": MORE_TASKS[i % 4]}] for i in range(16)]
    mixes = {
        "plain r16": plain(16, 32),
        "plain r8": plain(8, 32),
        "plain r8 + 4": plain(8, 16) + plain(8, 16, first=16, distinct=len(MORE_TASKS)),
        "+ MoLE (4 members)": plain(16, 16) + [["mole"]] * 16,
        "+ MoR (8 experts, r16)": plain(16, 16) + [["mor"]] * 16,
        "+ MoRE (r8)": plain(8, 16) + more,
        "all mixed": plain(16, 8) + [["mole"]] * 8 + [["mor"]] * 8 + more[:8],
    }
    references = {"plain r8": "plain r8", "plain r8 + 4": "plain r8", "+ MoRE (r8)": "plain r8 + 4"}
    return mixes, {label: references.get(label, "plain r16") for label in mixes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="HF folder or id (default: the bundled SmolLM2-135M)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--note", default="shared machine", help="what else ran on the machine")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load_before = os.getloadavg()[0]
    mixes, references = batches()
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(args.model, Path(tmp), args.note)
        prompts = [[(7 * i + j) % 1000 + 100 for j in range(args.prompt_tokens)] for i in range(NUM_REQUESTS)]
        for label in mixes:  # warm-up: every adapter and composite member paged in and slotted once
            decode_step_seconds(engine, prompts, mixes[label], 2)
        seconds: dict[str, list[float]] = {label: [] for label in mixes}
        for round_index in range(args.rounds):
            for label, batch in mixes.items():
                seconds[label].append(decode_step_seconds(engine, prompts, batch, args.new_tokens))
                logger.info("round %d, %s: decode step %.1f ms", round_index + 1, label, seconds[label][-1] * 1e3)
        per_slot, per_row = slot_mib(engine), scale_row_mib(engine)
    logger.info("%-24s %14s %10s %24s", "batch (32 requests)", "decode step ms", "vs ref", "reference")
    rows = []
    for label, times in seconds.items():
        reference = references[label]
        ratios = [t / r for t, r in zip(times, seconds[reference])]
        rows.append({"batch": label, "reference": reference,
                     "decode_step_ms": round(statistics.median(times) * 1e3, 2),
                     "ratio": round(statistics.median(ratios), 3),
                     "round_ratios": [round(r, 3) for r in ratios]})
        logger.info("%-24s %14.1f %10.2f %24s", label, rows[-1]["decode_step_ms"], rows[-1]["ratio"], reference)
    load_after = os.getloadavg()[0]
    logger.info("load average (1 min): %.1f at the start, %.1f at the end", load_before, load_after)
    logger.info("one slot (rank 16 padded, all projections): %.2f MiB; MoR holds one slot and 8 pool rows of "
                "%.3f MiB (%.2f MiB in all), MoRE one slot per task in use", per_slot, per_row, per_slot + 8 * per_row)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_description(engine.device.type), "note": args.note,
                                         "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                                         "rounds": args.rounds,
                                         "load_average": [round(load_before, 2), round(load_after, 2)],
                                         "rows": rows, "slot_mib": round(per_slot, 3),
                                         "scale_row_mib": round(per_row, 4)}, indent=2))


if __name__ == "__main__":
    main()
