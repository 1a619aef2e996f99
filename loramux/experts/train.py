"""Train the bundled demo experts: one PEFT LoRA per task on SmolLM2-135M-Instruct.

    python -m loramux.experts.train [--tasks uppercase,capital] [--out loramux/experts]

Each task brings its own steps and rank (loramux/experts/tasks.py: the word-
and number-reordering tasks and addition get rank 16 and 360-480 steps);
--steps and --rank override them for every task.

Fixed seeds and data generated here make every run the same on the same
machine. Prompts go through the model's chat template exactly as the server
renders a one-turn chat, and only the answer tokens (and the end-of-turn
token) carry loss. The logits are computed for those positions alone: the
49k-row output head would otherwise cost a fifth of each step. The frozen base
weights are held in bfloat16 by default (--base-dtype): on a CPU with native
bf16 a step takes 1.7 s instead of 2.5 s, while the LoRA factors and AdamW
state stay float32.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch

from loramux.engine.loader import load_checkpoint
from loramux.experts.tasks import TASKS, TASKS_BY_NAME, Task

logger = logging.getLogger(__name__)

EXPERTS_DIR = Path(__file__).resolve().parent
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
CARD_EXAMPLES = 12  # example prompts written to each card (distinct training phrasings); the router calibrates
# each expert from its card, so more examples give it a steadier margin


def encode_example(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) with labels = -100 everywhere but the answer and end-of-turn tokens."""
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
    answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return list(prompt_ids) + answer_ids, [-100] * len(prompt_ids) + answer_ids


def make_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, all [B, L]."""
    encoded = [encode_example(tokenizer, prompt, answer) for prompt, answer in pairs]
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), tokenizer.pad_token_id or 0, dtype=torch.long)
    labels = torch.full((len(encoded), length), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def answer_loss(causal_lm, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions only of a transformers causal LM (for a PEFT model its
    base model, whose LoRA layers PEFT has injected); hidden [B, L, d] -> logits [N, vocab]."""
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def train_expert(folder: Path, tokenizer, task: Task, out: Path, rank: int, steps: int, batch_size: int,
                 lr: float, seed: int, base_dtype: torch.dtype = torch.bfloat16) -> None:
    """Train one expert from a fresh copy of the base model and write its PEFT folder and card."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=base_dtype)
    # PEFT keeps the LoRA factors float32 over a half-precision base (autocast_adapter_dtype)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=TARGET_MODULES))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 10) * max(0.05, 1 - step / steps))
    model.train()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        loss = answer_loss(model.get_base_model(), make_batch(tokenizer, [task.sample(rng) for _ in range(batch_size)]))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            logger.info("%s step %d/%d loss %.4f", task.name, step + 1, steps, loss.item())
    wall_seconds, cpu_seconds = time.perf_counter() - start_wall, time.process_time() - start_cpu
    model = model.to(torch.float16)  # halves the shipped files; the store casts to the serving dtype
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's boilerplate model card; ours is loramux.json
    training = {"steps": steps, "batch_size": batch_size, "rank": rank, "lr": lr, "seed": seed,
                "base_dtype": str(base_dtype).removeprefix("torch."),
                "final_loss": round(loss.item(), 4), "cpu_seconds": round(cpu_seconds, 1),
                "wall_seconds": round(wall_seconds, 1)}
    write_card(task, out, training, seed)
    logger.info("%s trained in %.0f s (%.0f CPU s) -> %s", task.name, wall_seconds, cpu_seconds, out)


def write_card(task: Task, out: Path, training: dict, seed: int) -> None:
    """loramux.json: the description, one example per training phrasing (up to CARD_EXAMPLES), and how it was trained."""
    rng = random.Random(seed + 1)
    phrasings = rng.sample(task.train_phrasings, min(CARD_EXAMPLES, len(task.train_phrasings)))
    examples = [phrasing.format(x=task.make_input(rng)[0]) for phrasing in phrasings]
    card = {"description": task.description, "examples": examples, "training": training}
    (out / "loramux.json").write_text(json.dumps(card, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(task.name for task in TASKS))
    parser.add_argument("--out", default=str(EXPERTS_DIR))
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: each task's own)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: each task's own)")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="dtype of the frozen base weights while training (LoRA factors are float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cards-only", action="store_true",
                        help="rewrite the cards of already trained experts (keeps their training record)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cards_only:
        for name in args.tasks.split(","):
            task, out = TASKS_BY_NAME[name], Path(args.out) / name
            training = json.loads((out / "loramux.json").read_text())["training"]
            write_card(task, out, training, args.seed + TASKS.index(task))
        return
    checkpoint = load_checkpoint(None)
    for name in args.tasks.split(","):
        task = TASKS_BY_NAME[name]
        train_expert(checkpoint.folder, checkpoint.tokenizer, task, Path(args.out) / name,
                     rank=args.rank or task.rank, steps=args.steps or task.train_steps, batch_size=args.batch_size, lr=args.lr,
                     seed=args.seed + TASKS.index(task), base_dtype=getattr(torch, args.base_dtype))


if __name__ == "__main__":
    main()
