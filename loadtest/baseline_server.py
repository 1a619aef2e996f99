"""The alternative a user would otherwise deploy: FastAPI around transformers + PEFT mixed-batch `generate`.

    python loadtest/baseline_server.py --model HF_FOLDER --adapter-dir DIR --port 8001

Requests arriving within --batch-window seconds are batched (up to
--max-batch) into one `generate(adapter_names=...)` call, greedy, with every
request's own adapter. Streaming answers send the whole text in one chunk when
the batch ends, which is what `generate` allows. Only what the load generator
uses is implemented: /v1/models and /v1/completions with one adapter or none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

logger = logging.getLogger("baseline")
BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


def build_app(model_folder: Path, adapter_dir: Path, max_batch: int, window: float) -> FastAPI:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    tokenizer.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    names = sorted(p.name for p in adapter_dir.iterdir() if (p / "adapter_config.json").is_file())
    model = PeftModel.from_pretrained(base, adapter_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dir / name, adapter_name=name)
    model.eval()
    model_id = model_folder.name
    queue: asyncio.Queue = asyncio.Queue()

    def generate(batch: list[tuple[dict, asyncio.Future]]) -> list[tuple[str, int]]:
        prompts = [body["prompt"] for body, _ in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        new = max(body.get("max_tokens") or 16 for body, _ in batch)
        with torch.inference_mode():
            out = model.generate(**encoded, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or 0,
                                 adapter_names=[BASE if body["model"] == model_id else body["model"]
                                                for body, _ in batch])
        results = []
        for (body, _), row in zip(batch, out[:, encoded["input_ids"].shape[1]:]):
            tokens = row[:body.get("max_tokens") or 16].tolist()
            results.append((tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)))
        return results

    async def batcher() -> None:
        while True:
            batch = [await queue.get()]
            deadline = time.monotonic() + window
            while len(batch) < max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            try:
                results = await asyncio.to_thread(generate, batch)
            except Exception as exc:  # reported to every request of the batch
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.get_running_loop().create_task(batcher())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "parent": None}] +
                [{"id": n, "object": "model", "parent": model_id} for n in names]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body.get("model") not in names + [model_id] or body.get("adapters"):
            return JSONResponse({"error": {"message": "only one known adapter or the base model per request",
                                           "type": "invalid_request_error", "param": "model", "code": None}}, 400)
        future = asyncio.get_running_loop().create_future()
        await queue.put((body, future))
        result = await future
        if isinstance(result, Exception):
            return JSONResponse({"error": {"message": str(result), "type": "server_error", "param": None,
                                           "code": None}}, 500)
        text, tokens = result
        rid, prompt_tokens = f"cmpl-{uuid.uuid4().hex}", len(tokenizer.encode(body["prompt"]))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        if not body.get("stream"):
            return {"id": rid, "object": "text_completion", "model": body["model"], "choices": [choice],
                    "usage": usage}

        async def events():
            yield f"data: {json.dumps({'id': rid, 'object': 'text_completion', 'choices': [choice]})}\n\n"
            yield f"data: {json.dumps({'id': rid, 'object': 'text_completion', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="HF folder")
    parser.add_argument("--adapter-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-window", type=float, default=0.05)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app = build_app(args.model, args.adapter_dir, args.max_batch, args.batch_window)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
