"""The container files parse and point at the right ports and paths (no Docker engine runs here)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from loramux.cli import build_parser
from loramux.server.state import is_loopback

ROOT = Path(__file__).resolve().parent.parent


def test_compose_and_prometheus_agree_with_the_server():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    server, prom = compose["services"]["loramux"], compose["services"]["prometheus"]
    assert "8000:8000" in server["ports"]
    assert any(v.endswith(":/adapters") for v in server["volumes"])
    config_mount = next(v for v in prom["volumes"] if v.endswith("/etc/prometheus/prometheus.yml:ro"))
    prometheus = yaml.safe_load((ROOT / config_mount.split(":")[0]).read_text())
    [job] = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["loramux:8000"]


def test_dockerfile_runs_serve_as_non_root_with_volumes_and_healthcheck():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert any(line.startswith("USER ") and line != "USER root" for line in lines)
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert any("curl -fsS http://127.0.0.1:8000/health" in line for line in lines)
    assert 'VOLUME ["/models", "/adapters"]' in lines
    entry = next(line for line in lines if line.startswith("ENTRYPOINT"))
    args = json.loads(entry.removeprefix("ENTRYPOINT"))
    assert args[:2] == ["loramux", "serve"]
    parsed = build_parser().parse_args(args[1:])  # every flag it passes exists
    assert (parsed.host, parsed.port, parsed.adapter_store) == ("0.0.0.0", 8000, "/adapters")
    # A public address and no opt-out: without a key in the environment, adapter writes are refused.
    assert not parsed.allow_unauthenticated_admin and not is_loopback(parsed.host)


def test_cluster_profile_runs_two_replicas_on_minio_scraped_by_prometheus():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    cluster = services["loramux-cluster"]
    assert all("cluster" in services[name]["profiles"]
               for name in ("loramux-cluster", "minio", "minio-init", "prometheus-cluster"))
    args = build_parser().parse_args(cluster["entrypoint"][1:])
    assert args.command == "serve-cluster" and args.num_replicas == 2 and args.num_gpus_per_replica == 1
    assert args.adapter_store.startswith("s3://loramux-adapters/") and args.s3_endpoint_url == "http://minio:9000"
    assert "mc mb --ignore-existing store/loramux-adapters" in services["minio-init"]["entrypoint"][-1]
    assert cluster["environment"]["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    config_mount = next(v for v in services["prometheus-cluster"]["volumes"] if v.endswith("prometheus.yml:ro"))
    [job] = yaml.safe_load((ROOT / config_mount.split(":")[0]).read_text())["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["loramux-cluster:8000"]
