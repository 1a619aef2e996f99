"""AsyncEngine over an engine built on its own loop thread, and the app's lifespan around a running loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from conftest import make_engine
from loramux.config import ServerConfig
from loramux.engine import SamplingParams
from loramux.engine.async_engine import AsyncEngine, EngineDeadError
from loramux.server import create_app


def test_a_failed_build_is_raised_to_the_caller_and_ends_the_thread():
    def build():
        raise RuntimeError("no weights here")

    with pytest.raises(RuntimeError, match="no weights here"):
        AsyncEngine(build)
    assert not any(t.name == "loramux-engine" and t.is_alive() for t in threading.enumerate())


def test_the_engine_is_built_and_called_on_the_loop_thread(tiny_llama_dir):
    built_on = []

    def build():
        built_on.append(threading.current_thread())
        return make_engine(tiny_llama_dir)

    async_engine = AsyncEngine(build)
    try:
        called_on = asyncio.run(async_engine.call(lambda engine: threading.current_thread()))
        assert built_on == [called_on] and called_on is not threading.main_thread()
        assert async_engine.engine.model_id
    finally:
        async_engine.shutdown()


def test_the_app_uses_the_running_loop_once_and_starts_a_new_one_after(tiny_llama_dir):
    started = AsyncEngine(lambda: make_engine(tiny_llama_dir))
    app = create_app(started.engine, ServerConfig(), async_engine=started)
    state = app.state.loramux

    async def run_lifespan():
        async with app.router.lifespan_context(app):
            return state.async_engine

    assert asyncio.run(run_lifespan()) is started
    assert not started._thread.is_alive()  # the first shutdown stopped it
    second = asyncio.run(run_lifespan())
    assert second is not started and not second._thread.is_alive()


async def _finished(async_engine: AsyncEngine, request_id: str) -> None:
    """Wait (between engine steps) until the request has produced every output."""
    while await async_engine.call(lambda engine: engine.is_request_active(request_id)):
        pass


def test_outputs_queued_while_the_consumer_was_away_come_in_one_batch_in_order(tiny_llama_dir):
    async_engine = AsyncEngine(lambda: make_engine(tiny_llama_dir))
    sampling = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def run():
        streamed = [out async for out in await async_engine.submit("one-by-one", [5, 6, 7], sampling)]
        stream = await async_engine.submit("behind", [5, 6, 7], sampling)
        await _finished(async_engine, "behind")
        return streamed, [batch async for batch in stream.batches()]

    try:
        streamed, batches = asyncio.run(run())
    finally:
        async_engine.shutdown()
    assert len(batches) == 1
    assert [out.new_token_ids for out in batches[0]] == [out.new_token_ids for out in streamed]
    assert [out.num_output_tokens for out in batches[0]] == [1, 2, 3, 4, 5, 6]
    assert batches[0][-1].finish_reason == "length"


def test_a_request_error_comes_after_the_outputs_queued_before_it(tiny_llama_dir):
    async_engine = AsyncEngine(lambda: make_engine(tiny_llama_dir))
    error = EngineDeadError("stopping")

    async def run():
        # far from finishing when the abort comes, whatever the machine's speed (the model's context is 1024)
        stream = await async_engine.submit("long", [5, 6, 7], SamplingParams(max_tokens=1000, temperature=0,
                                                                             ignore_eos=True))
        batches = stream.batches()
        outputs = list(await anext(batches))  # at least one step ran; how many more does not matter
        await async_engine.abort_all(error)
        with pytest.raises(EngineDeadError) as raised:
            async for batch in batches:
                outputs += batch
        return outputs, raised.value

    try:
        outputs, raised = asyncio.run(run())
    finally:
        async_engine.shutdown()
    assert raised is error
    assert [out.num_output_tokens for out in outputs] == list(range(1, len(outputs) + 1))
    assert all(out.finish_reason is None for out in outputs)
