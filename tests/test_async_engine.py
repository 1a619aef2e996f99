"""AsyncEngine over an engine built on its own loop thread, and the app's lifespan around a running loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from conftest import make_engine
from loramux.config import ServerConfig
from loramux.engine.async_engine import AsyncEngine
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
