"""One Ray Serve replica: a loramux engine serving the same HTTP app as `loramux serve`.

Requests come from the ingress through a deployment handle with the
adapter's name as the multiplexed model id. `load_adapter` is what Ray
Serve's model multiplexing tracks: the replica advertises the adapters it
served last (up to `max_adapters`, LRU), and Serve sends requests for them
here. The engine itself pages adapters between its tiers as on one server.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client.core import GaugeMetricFamily
from ray import serve

from loramux.cluster.asgi_call import ResponseHead, asgi_request
from loramux.config import ClusterConfig, EngineConfig, S3StoreConfig, ServerConfig

logger = logging.getLogger(__name__)

INGRESS_DEPLOYMENT = "loramux-ingress"


def replica_metric_families(registry, replica_id: str, engine) -> list:
    """The replica's metrics with a `replica` label, plus which adapters hold its device slots.

    Residency labels are bounded by the slot count (`--max-loras`) per replica.
    """
    families = []
    for family in registry.collect():
        family.samples = [s._replace(labels={**s.labels, "replica": replica_id}) for s in family.samples]
        families.append(family)
    resident = GaugeMetricFamily("loramux_adapter_resident", "1 for each adapter in a device slot of the replica",
                                 labels=["replica", "adapter"])
    for name in sorted(engine.slots.slot_of):
        resident.add_metric([replica_id, name], 1)
    families.append(resident)
    return families


class EngineReplica:
    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig, cluster_config: ClusterConfig,
                 s3_config: S3StoreConfig | None, app_name: str):
        from loramux.engine.async_engine import AsyncEngine
        from loramux.router import attach_router
        from loramux.server import create_app

        async_engine = AsyncEngine.for_serving(engine_config)  # one OpenMP team per replica, as in `serve`
        self.engine = async_engine.engine
        router = attach_router(self.engine) if engine_config.router.enabled else None
        self.app = create_app(self.engine, server_config, router, async_engine)
        if s3_config is not None:
            from loramux.adapters_store.s3_store import S3AdapterStore
            from loramux.server.s3_adapters import attach_s3_store

            store = S3AdapterStore(s3_config.url, s3_config.cache_dir, endpoint_url=s3_config.endpoint_url)
            attach_s3_store(self.app, store, s3_config.poll_seconds)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.app_name = app_name
        self.report_seconds = cluster_config.metrics_report_seconds
        self._lifespan = None
        self._start_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        logger.info("replica %s: %s on %s, %d adapters", self.replica_id, self.engine.model_id, self.engine.device,
                    len(self.engine.store.records))

    async def _started(self) -> None:
        """Enter the app's lifespan (engine loop, S3 mirror) once, on the replica's event loop."""
        async with self._start_lock:
            if self._lifespan is None:
                lifespan = self.app.router.lifespan_context(self.app)
                await lifespan.__aenter__()
                self._lifespan = lifespan
                self._tasks.append(asyncio.create_task(self._report_metrics()))

    async def _report_metrics(self) -> None:
        ingress = serve.get_deployment_handle(INGRESS_DEPLOYMENT, self.app_name)
        registry = self.app.state.loramux.metrics.registry
        while True:
            try:
                families = replica_metric_families(registry, self.replica_id, self.engine)
                await ingress.report_metrics.remote(self.replica_id, families)
            except Exception as exc:  # the ingress restarting must not stop the reports
                logger.warning("replica %s: metrics report failed: %s", self.replica_id, exc)
            await asyncio.sleep(self.report_seconds)

    async def ready(self) -> dict:
        """The base model id and the adapters' records (the ingress routes `auto` over their cards)."""
        await self._started()
        records = await self.app.state.loramux.running_engine().call(lambda e: dict(e.store.records))
        return {"model_id": self.engine.model_id, "replica": self.replica_id,
                "records": {n: r for n, r in records.items() if not r.in_memory}}

    async def load_adapter(self, adapter: str) -> str:
        """Ray Serve's multiplexed 'model': the adapter's name (the engine pages it in when a request runs)."""
        return adapter

    async def handle(self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes):
        """Run one HTTP request through the app; yields a ResponseHead (with this replica's id), then bytes."""
        await self._started()
        adapter = serve.get_multiplexed_model_id()
        if adapter:
            await self.load_adapter(adapter)
        async for part in asgi_request(self.app, method, path, query, headers, body):
            if isinstance(part, ResponseHead):
                part.replica = self.replica_id
            yield part

    async def __del__(self):
        for task in self._tasks:
            task.cancel()
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)


def replica_class(max_adapters: int) -> type:
    """EngineReplica with `load_adapter` multiplexed over at most `max_adapters` adapters."""
    return type("EngineReplica", (EngineReplica,), {
        "load_adapter": serve.multiplexed(max_num_models_per_replica=max_adapters)(EngineReplica.load_adapter)})
