"""`loramux serve-cluster`: engine replicas on Ray Serve behind one OpenAI-compatible ingress."""

from __future__ import annotations

import logging
from pathlib import Path

from loramux.config import ClusterConfig, EngineConfig, S3StoreConfig, ServerConfig

logger = logging.getLogger(__name__)

APP_NAME = "loramux"
REPLICA_DEPLOYMENT = "loramux-engine"
INGRESS_CPUS = 0.1


def build_cluster_app(engine_config: EngineConfig, server_config: ServerConfig, cluster_config: ClusterConfig,
                      s3_config: S3StoreConfig | None = None, app_name: str = APP_NAME):
    """The Ray Serve application: `num_replicas` engine replicas and the ingress in front of them."""
    from ray import serve

    from loramux.cluster.ingress import ClusterIngress
    from loramux.cluster.replica import INGRESS_DEPLOYMENT, replica_class

    max_adapters = cluster_config.max_adapters_per_replica or engine_config.store.max_loras
    replica = serve.deployment(
        replica_class(max_adapters), name=REPLICA_DEPLOYMENT, num_replicas=cluster_config.num_replicas,
        max_ongoing_requests=server_config.max_concurrent_requests,
        ray_actor_options={"num_cpus": cluster_config.num_cpus_per_replica,
                           "num_gpus": cluster_config.num_gpus_per_replica})
    ingress = serve.deployment(ClusterIngress, name=INGRESS_DEPLOYMENT, num_replicas=1,
                               max_ongoing_requests=100_000, ray_actor_options={"num_cpus": INGRESS_CPUS})
    replicas = replica.bind(engine_config, server_config, cluster_config, s3_config, app_name)
    return ingress.bind(replicas, engine_config.router, cluster_config, s3_config is not None)


def start_cluster(engine_config: EngineConfig, server_config: ServerConfig, cluster_config: ClusterConfig,
                  s3_config: S3StoreConfig | None = None, num_cpus: float | None = None) -> str:
    """Start (or join) Ray, then Serve on host:port, and deploy the app; returns the base URL.

    Workers import loramux from this checkout: its folder goes on their PYTHONPATH.
    """
    import ray
    from ray import serve

    from loramux.server.state import is_loopback

    if not ray.is_initialized():
        root = str(Path(__file__).resolve().parents[2])
        local = {}
        if cluster_config.ray_address is None and is_loopback(server_config.host):
            local["_node_ip_address"] = "127.0.0.1"  # a local cluster for a loopback server listens on loopback only
        ray.init(address=cluster_config.ray_address, num_cpus=num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": root}}, **local)
    serve.start(http_options={"host": server_config.host, "port": server_config.port})
    app = build_cluster_app(engine_config, server_config, cluster_config, s3_config)
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{server_config.host}:{server_config.port}"
    logger.info("loramux cluster: %d replicas at %s/v1", cluster_config.num_replicas, url)
    return url


def stop_cluster() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
