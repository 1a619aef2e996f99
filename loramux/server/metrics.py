"""Prometheus metrics, prefix `loramux_`, in a registry of the server's own.

Request-level histograms are observed by the request handlers; engine and
store state is read at scrape time by `EngineCollector`, so the engine thread
never touches Prometheus objects. Label sets are bounded: per-adapter request
counters only with `--metrics-per-adapter`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from loramux.composites.registry import gate_entropy_buckets
from loramux.engine import Engine

MAX_ROUTED_ADAPTER_LABELS = 64  # routing counters beyond this many adapters are counted as "other"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class EngineCollector:
    """Gauges and counters read from the engine and the adapter store when scraped."""

    def __init__(self, engine: Engine, last_batch_size):
        self.engine = engine
        self.last_batch_size = last_batch_size

    def collect(self):
        e, stats = self.engine, self.engine.store.stats

        def gauge(name, doc, value):
            return GaugeMetricFamily(f"loramux_{name}", doc, value=value)

        def counter(name, doc, value):
            return CounterMetricFamily(f"loramux_{name}", doc, value=value)

        yield gauge("requests_running", "Sequences running in the engine", len(e.scheduler.running))
        yield gauge("requests_waiting", "Sequences waiting to be scheduled", len(e.scheduler.waiting))
        yield gauge("kv_blocks_used", "KV-cache blocks in use", e.blocks.num_used)
        yield gauge("kv_blocks_total", "KV-cache blocks", e.blocks.num_blocks)
        yield gauge("gpu_adapter_slots_used", "Adapter slots holding an adapter", len(e.slots.slot_of))
        yield gauge("gpu_adapter_slots_total", "Adapter slots", e.slots.num_slots)
        yield gauge("cpu_adapters_cached", "Adapters held in CPU memory", e.store.num_in_cpu)
        yield gauge("adapters_registered", "Adapters in the registry", len(e.store.records))
        yield gauge("batch_size", "Tokens in the last engine step", self.last_batch_size())
        yield counter("adapter_loads", "Adapters read from disk into CPU memory", stats.disk_loads)
        yield counter("adapter_page_ins", "Adapters copied into a device slot", stats.page_ins)
        evictions = CounterMetricFamily("loramux_adapter_evictions", "Adapters evicted, by tier", labels=["tier"])
        evictions.add_metric(["gpu"], stats.gpu_evictions)
        evictions.add_metric(["cpu"], stats.cpu_evictions)
        yield evictions
        hits = CounterMetricFamily("loramux_adapter_hits", "Adapter look-ups served by a tier", labels=["tier"])
        hits.add_metric(["gpu"], stats.gpu_hits)
        hits.add_metric(["cpu"], stats.cpu_hits)
        yield hits
        yield counter("adapter_uploads", "Adapters uploaded", stats.uploads)
        yield counter("adapter_deletions", "Adapters deleted", stats.deletions)
        yield counter("prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                      e.blocks.prefix_hit_tokens)
        yield counter("preemptions", "Sequences preempted for KV-cache space", e.scheduler.num_preemptions)


class ServerMetrics:
    def __init__(self, engine: Engine, last_batch_size, per_adapter: bool):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("loramux_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("loramux_time_per_output_token_seconds", "Time per output token after the first",
                              registry=r, buckets=FAST_BUCKETS)
        self.e2e = Histogram("loramux_e2e_request_latency_seconds", "End-to-end request latency", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.queue_wait = Histogram("loramux_queue_wait_seconds", "Arrival to first scheduled step", registry=r,
                                    buckets=LATENCY_BUCKETS)
        self.step = Histogram("loramux_step_duration_seconds", "Engine step duration", registry=r,
                              buckets=FAST_BUCKETS)
        self.page_in = Histogram("loramux_adapter_page_in_seconds", "Adapter page-in time (host side)",
                                 registry=r, buckets=FAST_BUCKETS)
        self.admitted = Gauge("loramux_requests_admitted", "HTTP requests admitted and not yet answered in full",
                              registry=r)
        self.requests = Counter("loramux_requests", "Requests by final status", ["status"], registry=r)
        self.prompt_tokens = Counter("loramux_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("loramux_generation_tokens", "Tokens generated", registry=r)
        self.adapter_requests = (Counter("loramux_adapter_requests", "Requests per adapter", ["adapter"], registry=r)
                                 if per_adapter else None)
        self.router_decisions = Counter(
            "loramux_router_decisions", "Routed requests by chosen expert ('none': the base model answered; "
            "'other': beyond the label limit) and strategy", ["adapter", "strategy"], registry=r)
        self.router_latency = Histogram("loramux_router_latency_seconds", "Time to embed a request and pick experts",
                                        registry=r, buckets=FAST_BUCKETS)
        self.composite_requests = Counter("loramux_composite_requests", "Finished completions of composite "
                                          "experts, by type (mole, mor, more)", ["type"], registry=r)
        self.gate_entropy = Histogram("loramux_composite_gate_entropy", "Mean gate entropy (nats) per finished "
                                      "MoLE/MoR completion", registry=r,
                                      buckets=gate_entropy_buckets(engine.config.store.max_composite_members))
        self._routed_labels: set[str] = set()
        r.register(EngineCollector(engine, last_batch_size))
        engine.store.page_in_listeners.append(self.page_in.observe)

    def observe_composite(self, report: dict) -> None:
        """A finished composite completion's `loramux.composite` report."""
        self.composite_requests.labels(type=report["type"]).inc()
        if "gate_entropy" in report:
            self.gate_entropy.observe(report["gate_entropy"])

    def observe_routing(self, decision) -> None:
        """Count a router decision per chosen expert (bounded label set) and its latency."""
        self.router_latency.observe(decision.seconds)
        for name in [name for name, _, _ in decision.experts] or ["none"]:
            if name not in self._routed_labels and len(self._routed_labels) >= MAX_ROUTED_ADAPTER_LABELS:
                name = "other"
            self._routed_labels.add(name)
            self.router_decisions.labels(adapter=name, strategy=decision.strategy).inc()
