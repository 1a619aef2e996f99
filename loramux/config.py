"""One dataclass tree for every setting of the engine.

Every part takes its piece of `EngineConfig`; nothing reads environment
variables at import time. Validation lives in `__post_init__` so that a bad
value fails at start-up with a message that names the flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("auto", "float32", "float16", "bfloat16")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


ATTENTION_BACKENDS = ("auto", "triton", "cpu", "sdpa", "torch")


@dataclass
class ModelConfig:
    """Which base model to load and how.

    `model` is a local Hugging Face folder (config.json + safetensors) or a
    `.gguf` file; None means the bundled SmolLM2-135M-Instruct GGUF.
    """

    model: str | None = None
    dtype: str = "auto"  # bfloat16 on CUDA and on CPUs with native bfloat16 (avx512_bf16, AMX), else float32
    device: str = "auto"  # cuda if available, else cpu
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    served_model_name: str | None = None
    enforce_eager: bool = False  # no CUDA graphs for decode
    attention_backend: str = "auto"  # triton on CUDA; on the CPU cpu for bfloat16 where it builds, else sdpa
    cache_dir: str | None = None  # where converted GGUF checkpoints go; None: ~/.cache/loramux/models

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.max_model_len is None or self.max_model_len > 0, "--max-model-len must be positive")
        _require(self.attention_backend in ATTENTION_BACKENDS,
                 f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")


@dataclass
class CacheConfig:
    """Paged KV cache: fixed-size blocks out of a memory budget."""

    block_size: int = 16
    num_blocks: int | None = None  # explicit count; overrides the memory budget
    kv_cache_memory_gib: float | None = None  # None: 1 GiB on CPU; on CUDA what gpu_memory_utilization leaves
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights, adapter slots and KV cache together
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
                 "--block-size must be a power of two")
        _require(self.num_blocks is None or self.num_blocks > 0, "--num-kv-blocks must be positive")
        _require(self.kv_cache_memory_gib is None or self.kv_cache_memory_gib > 0,
                 "--kv-cache-memory-gib must be positive")
        _require(0 < self.gpu_memory_utilization <= 1, "--gpu-memory-utilization must be in (0, 1]")


@dataclass
class SchedulerConfig:
    """Continuous batching limits for one engine step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_loras_per_batch: int = 16

    def __post_init__(self) -> None:
        _require(self.max_num_seqs > 0, "--max-num-seqs must be positive")
        _require(self.max_num_batched_tokens >= self.max_num_seqs,
                 "--max-num-batched-tokens must be at least --max-num-seqs so every running "
                 "sequence can decode in one step")
        _require(self.max_loras_per_batch > 0, "--max-loras-per-batch must be positive")


@dataclass
class StoreConfig:
    """LoRA adapters: the store's tiers, limits and start-up sources."""

    max_loras: int = 32  # GPU (device) slots
    max_cpu_loras: int = 128  # parsed adapters kept in (pinned) CPU memory
    max_lora_rank: int = 16  # as vLLM; slots are padded to it, so it sizes the slot memory
    max_adapter_bytes: int = 512 * 2**20  # adapter_model.safetensors size limit
    lora_backend: str = "auto"  # triton on CUDA, torch elsewhere (with the C++ decode kernel for bf16 on the CPU)
    store_dir: str | None = None  # where uploads are written; None: uploads refused
    adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT folder
    adapter_dirs: list[str] = field(default_factory=list)  # every PEFT folder inside is registered
    max_composites: int = 8  # gated composite experts (MoLE, MoR) whose gates live on the device
    max_composite_members: int = 9  # members (experts) per gated composite; sizes the gate tensors (9: the
    # bundled MoLE and MoR composites gate over the nine demo tasks)
    max_mor_experts: int | None = None  # rows of the MoR scaling-vector pools, all MoR composites together;
    # None: max_composites * max_composite_members (every gated composite a MoR of the most experts)

    @property
    def mor_expert_rows(self) -> int:
        return self.max_composites * self.max_composite_members if self.max_mor_experts is None \
            else self.max_mor_experts

    def __post_init__(self) -> None:
        _require(self.max_loras > 0, "--max-loras must be positive")
        _require(self.max_cpu_loras > 0, "--max-cpu-loras must be positive")
        _require(self.max_adapter_bytes > 0, "--max-adapter-bytes must be positive")
        _require(self.max_lora_rank > 0, "--max-lora-rank must be positive")
        _require(self.max_composites > 0, "--max-composites must be positive")
        _require(self.max_composite_members >= 2, "--max-composite-members must be at least 2")
        _require(self.max_mor_experts is None or self.max_mor_experts >= 0, "--max-mor-experts must not be negative")
        _require(self.lora_backend in ("auto", "torch", "triton"),
                 f"--lora-backend must be auto, torch or triton, got {self.lora_backend!r}")


@dataclass
class S3StoreConfig:
    """An S3-compatible adapter store (`--adapter-store s3://bucket/prefix`) shared by servers and replicas."""

    url: str  # s3://bucket/prefix
    endpoint_url: str | None = None  # MinIO and others; None: AWS (or AWS_ENDPOINT_URL)
    cache_dir: str | None = None  # verified local copies; None: ~/.cache/loramux/s3/<bucket>/<prefix>
    poll_seconds: float = 5.0  # how often the bucket is listed: the bound on how late a server sees a change

    def __post_init__(self) -> None:
        _require(self.url.startswith("s3://") and len(self.url) > 5, "an S3 adapter store is s3://BUCKET[/PREFIX]")
        _require(self.poll_seconds > 0, "--adapter-store-poll-seconds must be positive")


@dataclass
class ClusterConfig:
    """`loramux serve-cluster`: Ray Serve replicas of the engine behind one ingress."""

    num_replicas: int = 2
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0  # 1 on a GPU machine: one replica per GPU
    max_adapters_per_replica: int | None = None  # adapters a replica advertises for affinity; None: --max-loras
    ray_address: str | None = None  # None: start a local Ray cluster (or join RAY_ADDRESS)
    metrics_report_seconds: float = 2.0  # replicas push their metrics to the ingress this often
    adapter_affinity: bool = True  # False: place every request on the least loaded replica (for comparison)

    def __post_init__(self) -> None:
        _require(self.num_replicas > 0, "--num-replicas must be positive")
        _require(self.num_cpus_per_replica >= 0 and self.num_gpus_per_replica >= 0,
                 "replica resources must not be negative")
        _require(self.max_adapters_per_replica is None or self.max_adapters_per_replica > 0,
                 "--max-adapters-per-replica must be positive")
        _require(self.metrics_report_seconds > 0, "metrics_report_seconds must be positive")


ROUTER_STRATEGIES = ("select", "mixture", "fusion", "mole", "mor", "more")  # the last three: composite types


@dataclass
class RouterConfig:
    """Expert routing for `model: "auto"` requests; per-request `router` fields override these."""

    enabled: bool = True
    embedder: str = "minilm"  # minilm, base, or a local sentence-encoder folder
    embedder_dtype: str = "float32"  # the sentence encoder's: float32 or bfloat16
    strategy: str = "select"  # select, mixture, fusion, or a composite type (mole, mor, more)
    top_k: int = 2  # experts blended by mixture and fusion
    temperature: float = 0.1  # softmax temperature over similarities
    threshold: float | None = None  # a plain cosine threshold instead of the calibrated rule
    margin: float = 0.08  # calibrated rule: how far an expert must beat generic prompts (loramux/router/calibration.py)
    max_fused: int = 16  # fusions cached in the store

    def __post_init__(self) -> None:
        _require(self.strategy in ROUTER_STRATEGIES,
                 f"--router-strategy must be one of {', '.join(ROUTER_STRATEGIES)}, got {self.strategy!r}")
        _require(self.top_k > 0, "--router-top-k must be positive")
        _require(self.temperature > 0, "--router-temperature must be positive")
        _require(self.threshold is None or -1.0 <= self.threshold <= 1.0,
                 "--router-threshold is a cosine similarity in [-1, 1]")
        _require(-1.0 <= self.margin <= 1.0, "--router-margin is a difference of cosines in [-1, 1]")
        _require(self.max_fused > 0, "--router-max-fused must be positive")
        _require(self.embedder_dtype in ("float32", "bfloat16"), "--router-embedder-dtype must be float32 or bfloat16")


@dataclass
class ServerConfig:
    """HTTP server settings (`loramux serve`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # also LORAMUX_API_KEY
    admin_api_key: str | None = None  # adapter management; falls back to api_key
    max_body_bytes: int = 4 * 2**20  # JSON bodies; uploads are limited by max_adapter_bytes
    max_prompt_tokens: int | None = None  # None: the model's context length
    max_completion_tokens: int = 4096
    default_max_tokens: int = 256
    max_concurrent_requests: int = 256
    adapter_load_root: str | None = None  # POST /v1/adapters/load only reads under this folder
    metrics_per_adapter: bool = False  # per-adapter request counters (bounded by the registry size)
    graceful_shutdown_seconds: float = 30.0  # after SIGTERM; then open streams get an error event and [DONE]
    allow_unauthenticated_admin: bool = False  # adapter writes without a key on a non-loopback address

    def __post_init__(self) -> None:
        _require(0 < self.port < 65536, "--port must be in 1..65535")
        _require(self.max_body_bytes > 0, "--max-body-bytes must be positive")
        _require(self.max_prompt_tokens is None or self.max_prompt_tokens > 0, "--max-prompt-tokens must be positive")
        _require(0 < self.default_max_tokens <= self.max_completion_tokens,
                 "--default-max-tokens must be in 1..--max-completion-tokens")
        _require(self.max_concurrent_requests > 0, "--max-concurrent-requests must be positive")
        _require(self.graceful_shutdown_seconds >= 0, "--graceful-shutdown-seconds must be >= 0")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    seed: int = 0
