"""The server's own view: its Prometheus metrics scraped before and after a run."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPORTED = {  # sample name -> label in the report
    "loramux_requests_total": "requests",
    "loramux_prompt_tokens_total": "prompt tokens",
    "loramux_generation_tokens_total": "generated tokens",
    "loramux_adapter_loads_total": "adapter loads (disk)",
    "loramux_adapter_page_ins_total": "adapter page-ins",
    "loramux_adapter_evictions_total": "adapter evictions",
    "loramux_adapter_page_in_seconds_sum": "page-in seconds",
    "loramux_step_duration_seconds_count": "engine steps",
    "loramux_preemptions_total": "preemptions",
}


def scrape(client: httpx.Client) -> dict[str, float]:
    """Every sample, keyed by name{labels}; empty for a server without /metrics (the baseline)."""
    response = client.get("/metrics")
    if response.status_code != 200:
        return {}
    text = response.text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def scrape_when_counted(client: httpx.Client, before: dict[str, float], requests: int,
                        timeout_s: float = 5.0) -> dict[str, float]:
    """`scrape` once the server has counted the run's `requests` in loramux_requests_total (it counts a
    streamed response as the response closes, just after the client has read its end), or after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = scrape(client)
        counted = sum(value - before.get(key, 0.0) for key, value in after.items()
                      if key.startswith("loramux_requests_total{"))
        if not after or counted >= requests or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def server_view(before: dict[str, float], after: dict[str, float]) -> dict:
    """What changed on the server during the run, for the counters worth reporting."""
    view = {}
    for key, value in after.items():
        name = key.split("{")[0]
        if name in REPORTED:
            view[key] = value - before.get(key, 0.0)
    steps = view.get("loramux_step_duration_seconds_count", 0)
    if steps:
        tokens = view.get("loramux_prompt_tokens_total", 0) + view.get("loramux_generation_tokens_total", 0)
        view["mean batch (tokens per step)"] = tokens / steps
    return view
