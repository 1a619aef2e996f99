"""The streaming response over a real engine: outputs that queued up while the response was away go out in one
write, each still its own SSE event."""

from __future__ import annotations

import asyncio

import orjson

from conftest import make_engine
from loramux.config import ServerConfig
from loramux.engine import SamplingParams
from loramux.server import create_app
from loramux.server.generation import Generation, RequestRecord
from loramux.server.openai_format import ResponseContext


def test_outputs_that_queued_up_go_out_in_one_write_of_one_event_each(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    app = create_app(engine, ServerConfig())
    state = app.state.loramux
    prompt, sampling = [5, 6, 7], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def run():
        async with app.router.lifespan_context(app):
            stream = await state.async_engine.submit("cmpl-queued", prompt, sampling)
            while await state.async_engine.call(lambda e: e.is_request_active("cmpl-queued")):
                pass  # every output is queued on the stream once the request is gone from the engine
            ctx = ResponseContext("cmpl-queued", "tiny", False, (), engine.tokenizer, False)
            return [write async for write in Generation(state).stream_events(stream, ctx, RequestRecord(), True)]

    writes = asyncio.run(run())
    reference = engine.generate([prompt], sampling)[0][0]  # the same greedy completion, merged by the engine
    assert len(writes) == 2  # the six outputs, then usage and [DONE]
    events = [orjson.loads(line.removeprefix(b"data: ")) for line in writes[0].split(b"\n\n") if line]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None] * 5 + ["length"]
    assert "".join(e["choices"][0]["text"] for e in events) == reference.new_text
    assert reference.new_text == engine.tokenizer.decode(reference.new_token_ids, skip_special_tokens=True)
    usage, done = writes[1].split(b"\n\n")[:2]
    assert orjson.loads(usage.removeprefix(b"data: "))["usage"]["completion_tokens"] == 6
    assert done == b"data: [DONE]"
