"""`--router-embedder base` runs the served model on request threads: never while a step (or the graph
capture inside one) is running on the engine thread, and no step starts while an embedding runs."""

from __future__ import annotations

import asyncio
import threading

from loramux.engine import SamplingParams
from loramux.engine.async_engine import AsyncEngine
from loramux.router.embedders import build_embedder
from tests.conftest import make_engine


class Timeline:
    """Wraps the engine's step and the model's embedding pass: records their order, can hold either open."""

    def __init__(self, engine):
        self.events: list[str] = []
        self.entered = {"step": threading.Event(), "embed": threading.Event()}
        self.release = {"step": threading.Event(), "embed": threading.Event()}
        engine.step = self._wrap("step", engine.step)
        engine.model.final_hidden_states = self._wrap("embed", engine.model.final_hidden_states)

    def _wrap(self, name, fn):
        def wrapped(*args):
            self.events.append(f"{name} start")
            self.entered[name].set()
            assert self.release[name].wait(10)
            result = fn(*args)
            self.events.append(f"{name} end")
            return result
        return wrapped


class Client:
    """One request through the async engine, from an event loop this thread drives when it needs to."""

    def __init__(self, async_engine: AsyncEngine):
        self.async_engine = async_engine
        self.loop = asyncio.new_event_loop()
        self.stream = None

    def submit(self) -> None:
        self.stream = self.loop.run_until_complete(
            self.async_engine.submit("r", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0)))

    def finish(self) -> list[int]:
        async def drain():
            return [token async for out in self.stream for token in out.new_token_ids]
        tokens = self.loop.run_until_complete(asyncio.wait_for(drain(), 10))
        self.async_engine.shutdown()
        self.loop.close()
        return tokens


def test_embedding_waits_for_the_step_in_progress(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    embedder = build_embedder("base", engine)
    timeline = Timeline(engine)
    timeline.release["embed"].set()
    client = Client(AsyncEngine(engine))
    try:
        client.submit()
        assert timeline.entered["step"].wait(10)
        thread = threading.Thread(target=embedder.embed, args=(["route me"],))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive() and timeline.events == ["step start"]  # blocked while the step runs
        timeline.release["step"].set()
        thread.join(10)
        assert timeline.events[:3] == ["step start", "step end", "embed start"]
    finally:
        timeline.release["step"].set()
        assert len(client.finish()) == 2


def test_step_waits_for_the_embedding_in_progress(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    embedder = build_embedder("base", engine)
    timeline = Timeline(engine)
    timeline.release["step"].set()
    client = Client(AsyncEngine(engine))
    try:
        thread = threading.Thread(target=embedder.embed, args=(["route me"],))
        thread.start()
        assert timeline.entered["embed"].wait(10)
        client.submit()
        assert not timeline.entered["step"].wait(0.5)  # the engine thread waits for the embedding
        timeline.release["embed"].set()
        thread.join(10)
        assert timeline.entered["step"].wait(10)
        assert timeline.events[:3] == ["embed start", "embed end", "step start"]
    finally:
        timeline.release["embed"].set()
        assert len(client.finish()) == 2
