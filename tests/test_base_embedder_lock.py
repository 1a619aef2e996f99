"""`--router-embedder base` runs the served model on request threads: never while a step (or the graph
capture inside one) is running on the engine thread, and no step starts while an embedding runs."""

from __future__ import annotations

import asyncio
import threading

import pytest
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


@pytest.mark.parametrize("first", ["step", "embed"])
def test_a_step_and_an_embedding_never_overlap(tiny_llama_dir, first):
    """Whichever starts first, the other waits until it has ended."""
    second = "embed" if first == "step" else "step"
    engine = make_engine(tiny_llama_dir)
    embedder = build_embedder("base", engine)
    timeline = Timeline(engine)
    timeline.release[second].set()
    client = Client(AsyncEngine(engine))
    embedding = threading.Thread(target=embedder.embed, args=(["route me"],))
    start = {"step": client.submit, "embed": embedding.start}
    try:
        start[first]()
        assert timeline.entered[first].wait(10)
        start[second]()
        assert not timeline.entered[second].wait(0.5)  # blocked while the first one runs
        timeline.release[first].set()
        assert timeline.entered[second].wait(10)
        embedding.join(10)
    finally:
        timeline.release[first].set()
        assert len(client.finish()) == 2
    # Never overlapping: every start is followed by its own end (the engine may step again before the embedding).
    events = timeline.events
    assert events[:2] == [f"{first} start", f"{first} end"] and "embed end" in events
    assert all(events[i] == f"{events[i].split()[0]} start" and events[i + 1] == f"{events[i].split()[0]} end"
               for i in range(0, len(events), 2))
