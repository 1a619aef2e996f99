"""OpenAI inference routes: /v1/completions, /v1/chat/completions and /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Request

from loramux.server.errors import APIError
from loramux.server.generation import Generation, Prompt
from loramux.server.schemas import ChatCompletionRequest, CompletionRequest
from loramux.server.state import ServerState


def inference_router(state: ServerState) -> APIRouter:
    api = APIRouter()
    engine = state.engine
    tokenizer = engine.tokenizer
    generation = Generation(state)

    @api.get("/v1/models")
    async def models():
        records, composites = await state.running_engine().call(
            lambda e: (list(e.store.records.values()), list(e.composites.records.values())))
        base = {"id": engine.model_id, "object": "model", "created": state.started, "owned_by": "loramux",
                "root": engine.model_id, "parent": None, "max_model_len": engine.max_model_len}
        adapters = [{"id": r.name, "object": "model", "created": int(r.created), "owned_by": "loramux",
                     "root": r.name, "parent": engine.model_id} for r in records]
        adapters += [{"id": r.name, "object": "model", "created": int(r.created), "owned_by": "loramux",
                      "root": r.name, "parent": engine.model_id, "composite": {"type": r.type, "members": r.members,
                                                                               "tasks": r.tasks}}
                     for r in composites]
        return {"object": "list", "data": [base] + adapters}

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.echo or body.suffix is not None:
            raise APIError(400, "echo and suffix are not supported", "echo" if body.echo else "suffix",
                           "unsupported_parameter")
        text_or_ids = body.prompt
        if isinstance(text_or_ids, str):
            prompt = Prompt(len(text_or_ids), lambda: tokenizer.encode(text_or_ids, add_special_tokens=False),
                            lambda: text_or_ids)
        else:  # token ids: the router reads their text; bad ids are refused by the engine
            prompt = Prompt(0, lambda: text_or_ids, lambda: tokenizer.decode(
                [t for t in text_or_ids if 0 <= t < engine.shape.vocab_size]))
        return await generation.generate(request, body, prompt, False, body.max_tokens, body.logprobs)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content or ""
            if isinstance(content, list):
                if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                    raise APIError(400, "only text content parts are supported", f"messages.{i}.content")
                content = "".join(part["text"] for part in content)
                if not content.isascii():  # parts are plain dicts: the schema's surrogate check did not see them
                    try:
                        content.encode("utf-8")
                    except UnicodeEncodeError:
                        raise APIError(400, "the text contains an unpaired UTF-16 surrogate",
                                       f"messages.{i}.content") from None
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})

        def token_ids() -> list[int]:
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # the template's own errors (e.g. role order) are the client's to fix
                raise APIError(400, f"the chat template rejected the messages: {exc}", "messages") from exc
            return tokenizer.encode(text, add_special_tokens=False)

        prompt = Prompt(sum(len(m["content"]) for m in messages), token_ids,
                        lambda: "\n".join(m["content"] for m in messages if m["role"] == "user"), "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await generation.generate(request, body, prompt, True, body.max_completion_tokens or body.max_tokens,
                                         logprobs)

    return api
