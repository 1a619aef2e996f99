"""Synthetic traffic: when requests arrive, which adapters they name, how long they are.

Every generator takes a `random.Random`, so a seed fixes the whole run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def poisson_arrivals(rate: float, count: int, rng: random.Random) -> list[float]:
    """Send times (seconds from the start) of `count` requests arriving as a Poisson process of `rate` per second."""
    times, now = [], 0.0
    for _ in range(count):
        now += rng.expovariate(rate)
        times.append(now)
    return times


class AdapterPopularity:
    """Draws adapter names: "uniform", "zipf" (weight 1 / rank^alpha) or "single" (always the first)."""

    def __init__(self, kind: str, names: list[str], alpha: float = 1.0):
        if kind not in ("uniform", "zipf", "single"):
            raise ValueError(f"popularity must be uniform, zipf or single, got {kind!r}")
        if not names:
            raise ValueError("adapter popularity needs at least one adapter name")
        self.names = names
        self.weights = {"uniform": [1.0] * len(names),
                        "zipf": [1 / (i + 1) ** alpha for i in range(len(names))],
                        "single": [1.0] + [0.0] * (len(names) - 1)}[kind]

    def draw(self, rng: random.Random, k: int = 1) -> list[str]:
        """k distinct names."""
        chosen: list[str] = []
        while len(chosen) < min(k, len(self.names)):
            name = rng.choices(self.names, self.weights)[0]
            if name not in chosen:
                chosen.append(name)
        return chosen


@dataclass
class LengthSpec:
    """A fixed length, or uniform in [low, high]."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> "LengthSpec":
        low, _, high = text.partition(":")
        spec = cls(int(low), int(high or low))
        if not 1 <= spec.low <= spec.high:
            raise ValueError(f"length {text!r} must be N or LOW:HIGH with 1 <= LOW <= HIGH")
        return spec

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass
class TrafficSpec:
    base_model: str
    adapters: list[str]
    popularity: str = "zipf"
    zipf_alpha: float = 1.0
    auto_share: float = 0.0  # requests with model "auto" (the router)
    mixture_share: float = 0.0  # requests naming two adapters with weights
    prompt_len: LengthSpec = field(default_factory=lambda: LengthSpec(32, 32))
    output_len: LengthSpec = field(default_factory=lambda: LengthSpec(32, 32))
    prompts: list[str] | None = None  # sampled instead of synthetic prompts when given


@dataclass
class PlannedRequest:
    body: dict
    adapters: tuple[str, ...]  # what the request named ("auto" for the router)


def plan_requests(spec: TrafficSpec, count: int, rng: random.Random) -> list[PlannedRequest]:
    """`count` completion bodies (streaming, usage reported) following the traffic spec."""
    popularity = AdapterPopularity(spec.popularity, spec.adapters, spec.zipf_alpha) if spec.adapters else None
    planned = []
    for _ in range(count):
        prompt = (rng.choice(spec.prompts) if spec.prompts
                  else " ".join(rng.choice(WORDS) for _ in range(spec.prompt_len.draw(rng))))
        body = {"prompt": prompt, "max_tokens": spec.output_len.draw(rng), "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        roll = rng.random()
        if roll < spec.auto_share:
            body["model"], names = "auto", ("auto",)
        elif popularity is not None and roll < spec.auto_share + spec.mixture_share and len(spec.adapters) > 1:
            pair = popularity.draw(rng, 2)
            weight = round(rng.uniform(0.2, 0.8), 2)
            body["model"] = spec.base_model
            body["adapters"] = [{"name": pair[0], "weight": weight}, {"name": pair[1], "weight": 1 - weight}]
            names = tuple(pair)
        elif popularity is not None:
            names = tuple(popularity.draw(rng))
            body["model"] = names[0]
        else:
            body["model"], names = spec.base_model, ()
        planned.append(PlannedRequest(body, names))
    return planned
