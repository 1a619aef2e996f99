"""The cluster's HTTP entry: route `auto`, pick the replica by adapter, relay the replica's response.

Placement: a request naming an adapter (model, or the first of `adapters`)
goes through the replica handle with that name as the multiplexed model id,
so Ray Serve sends it to a replica that served the adapter lately, else to
the least loaded one. `auto` requests are routed here first, with the same
router and cards as the replicas, and placed by the chosen expert; the
replica routes them again (the same decision: same cards, same embedder)
so that its response reports the decision as on one server. Base-model
requests go to the least loaded replica.

Failures: a replica that dies before its response starts (every
non-streamed request, and streams that had not begun) is retried on
another replica; a stream cut mid-way ends with an OpenAI-shaped error
event. `/metrics` merges what every live replica reported in the last few
seconds (each sample labelled with its replica) with the ingress's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from ray.exceptions import RayError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from loramux.cluster.asgi_call import ResponseHead
from loramux.config import ClusterConfig, RouterConfig

logger = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
ATTEMPTS = 3  # a request whose replica died before answering is tried this many times in all
REFRESH_SECONDS = 5.0  # how often the ingress re-reads the adapters' cards for routing
HOP_HEADERS = ("host", "content-length", "transfer-encoding", "connection")


def error_body(status: int, message: str, code: str) -> bytes:
    kind = {400: "invalid_request_error", 503: "service_unavailable_error"}.get(status, "internal_server_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


def router_text(path: str, body: dict) -> str | None:
    """What the router reads, as the server's handlers read it (None: token-id prompts)."""
    if path == "/v1/completions":
        return body.get("prompt") if isinstance(body.get("prompt"), str) else None
    messages = body.get("messages") or []
    return "\n".join(m["content"] for m in messages
                     if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str))


class ClusterIngress:
    def __init__(self, replicas, router_config: RouterConfig, cluster_config: ClusterConfig, shared_store: bool):
        self.replicas = replicas
        self.shared_store = shared_store  # an S3 store: adapter changes reach every replica
        self.router_config = router_config
        self.report_seconds = cluster_config.metrics_report_seconds
        self.affinity = cluster_config.adapter_affinity
        self.router = None
        self.model_id: str | None = None
        self._cards: dict[str, tuple] = {}  # adapter name -> (checksum, description, examples) it is keyed by
        self._refreshed = 0.0
        self._refresh_lock = asyncio.Lock()
        self.replica_metrics: dict[str, tuple[float, list]] = {}  # replica id -> (time received, families)
        self.registry = CollectorRegistry()
        self.retries = Counter("loramux_ingress_retries", "Requests retried after their replica failed",
                               registry=self.registry)
        self.failed = Counter("loramux_ingress_failures", "Requests no replica could serve, or cut by a failure",
                              ["kind"], registry=self.registry)
        self.registry.register(self)  # `collect` below: the replicas' reported families

    # ------------------------------------------------------------ routing state
    async def _refresh(self) -> None:
        """Keep the base model id and the router's keys as fresh as REFRESH_SECONDS."""
        if time.monotonic() - self._refreshed < REFRESH_SECONDS:
            return
        async with self._refresh_lock:
            if time.monotonic() - self._refreshed < REFRESH_SECONDS:
                return
            info = await self.replicas.ready.remote()
            self.model_id = info["model_id"]
            records = info["records"]
            if self.router_config.enabled and self.router_config.embedder != "base":
                await asyncio.to_thread(self._update_router, records)
            self._refreshed = time.monotonic()

    def _update_router(self, records: dict) -> None:
        from loramux.router import Router, build_embedder

        if self.router is None:
            self.router = Router(build_embedder(self.router_config.embedder, None), self.router_config, {})
        for name in set(self._cards) - set(records):
            self.router.update(name, None)
            del self._cards[name]
        for name, record in records.items():
            card = (record.checksum, record.description, tuple(record.examples))
            if self._cards.get(name) != card:  # a replace may change only the card: it re-keys too
                self.router.update(name, record)
                self._cards[name] = card

    async def placement(self, path: str, raw: bytes) -> str:
        """The adapter whose replica should serve this request ("" for none: least loaded)."""
        if path not in GENERATION_PATHS:
            return ""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return ""  # the replica answers with the proper 400
        if not isinstance(body, dict):
            return ""
        await self._refresh()
        model = body.get("model")
        if model == "auto" or body.get("router") is not None:
            return await self._routed_expert(path, body)
        adapters = body.get("adapters")
        if isinstance(adapters, list) and adapters:
            first = adapters[0]
            return first if isinstance(first, str) else str(first.get("name", "")) if isinstance(first, dict) else ""
        return model if isinstance(model, str) and model != self.model_id else ""

    async def _routed_expert(self, path: str, body: dict) -> str:
        text = router_text(path, body)
        if self.router is None or text is None:
            return ""
        options = body.get("router") if isinstance(body.get("router"), dict) else {}
        try:
            decision = await asyncio.to_thread(self.router.route, text, **options)
        except (TypeError, ValueError):
            return ""  # bad router options: the replica refuses them with a 400
        return decision.experts[0][0] if decision.experts else ""

    # ------------------------------------------------------------ requests
    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path == "/metrics":
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
        if path.startswith("/v1/adapters") and request.method != "GET" and not self.shared_store:
            return Response(error_body(400, "adding or deleting adapters in a cluster needs a shared adapter store "
                                            "(--adapter-store s3://...): one replica's change would not reach the "
                                            "others", "no_shared_store"),
                            status_code=400, media_type="application/json")
        raw = await request.body()
        try:
            adapter = await self.placement(path, raw)
        except RayError as exc:
            self.failed.labels(kind="unavailable").inc()
            return Response(error_body(503, f"no replica is ready: {exc}", "replica_unavailable"), status_code=503,
                            media_type="application/json", headers={"Retry-After": "5"})
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        headers.append(("content-length", str(len(raw))))
        handle = self.replicas.options(stream=True, multiplexed_model_id=adapter if self.affinity else "")
        last_error: Exception | None = None
        for attempt in range(ATTEMPTS):
            parts = handle.handle.remote(request.method, path, request.url.query, headers, raw)
            try:
                head = await parts.__anext__()
            except RayError as exc:  # the replica failed before its response started: nothing was sent yet
                last_error = exc
                logger.warning("replica failed before answering %s (attempt %d): %s", path, attempt + 1, exc)
                self.retries.inc()
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            assert isinstance(head, ResponseHead)
            out_headers = {k: v for k, v in head.headers if k.lower() not in HOP_HEADERS}
            out_headers["x-loramux-replica"] = head.replica
            return StreamingResponse(self._relay(parts, head), status_code=head.status, headers=out_headers)
        self.failed.labels(kind="unavailable").inc()
        return Response(error_body(503, f"no replica could serve the request after {ATTEMPTS} attempts: "
                                        f"{last_error}", "replica_unavailable"),
                        status_code=503, media_type="application/json", headers={"Retry-After": "5"})

    async def _relay(self, parts, head: ResponseHead):
        streaming = any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in head.headers)
        try:
            async for chunk in parts:
                yield chunk
        except RayError as exc:
            self.failed.labels(kind="cut").inc()
            logger.warning("replica %s failed mid-response: %s", head.replica, exc)
            if streaming:  # the client sees an error event, not a silently short completion
                yield b"data: " + error_body(503, f"the replica serving this request failed mid-stream "
                                                  f"({head.replica}); retry the request",
                                             "replica_failed") + b"\n\ndata: [DONE]\n\n"
            else:
                raise

    # ------------------------------------------------------------ metrics
    async def report_metrics(self, replica: str, families: list) -> None:
        self.replica_metrics[replica] = (time.monotonic(), families)

    def collect(self):
        """Every live replica's families, merged by name (replicas that stopped reporting drop out)."""
        cutoff = time.monotonic() - 3 * self.report_seconds
        merged: dict[str, object] = {}
        for replica, (received, families) in list(self.replica_metrics.items()):
            if received < cutoff:
                del self.replica_metrics[replica]
                continue
            for family in families:
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    family.samples = list(family.samples)
                    merged[family.name] = family
        yield from merged.values()
