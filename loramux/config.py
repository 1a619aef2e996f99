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


@dataclass
class ModelConfig:
    """Which base model to load and how.

    `model` is a local Hugging Face folder (config.json + safetensors) or a
    `.gguf` file; None means the bundled SmolLM2-135M-Instruct GGUF.
    """

    model: str | None = None
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # cuda if available, else cpu
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    served_model_name: str | None = None
    cache_dir: str | None = None  # where converted GGUF checkpoints go; None: ~/.cache/loramux/models

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.max_model_len is None or self.max_model_len > 0, "--max-model-len must be positive")


@dataclass
class CacheConfig:
    """Paged KV cache: fixed-size blocks out of a memory budget."""

    block_size: int = 16
    num_blocks: int | None = None  # explicit count; overrides the memory budget
    kv_cache_memory_gib: float | None = None  # None: 1 GiB on CPU, 90% of free memory on CUDA
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
                 "--block-size must be a power of two")
        _require(self.num_blocks is None or self.num_blocks > 0, "--num-kv-blocks must be positive")
        _require(self.kv_cache_memory_gib is None or self.kv_cache_memory_gib > 0,
                 "--kv-cache-memory-gib must be positive")


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
    """LoRA adapters: slot pool size and limits."""

    max_loras: int = 32  # adapter slots resident next to the model
    max_lora_rank: int = 64
    lora_backend: str = "auto"  # triton on CUDA, torch elsewhere
    adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT folder

    def __post_init__(self) -> None:
        _require(self.max_loras > 0, "--max-loras must be positive")
        _require(self.max_lora_rank > 0, "--max-lora-rank must be positive")
        _require(self.lora_backend in ("auto", "torch", "triton"),
                 f"--lora-backend must be auto, torch or triton, got {self.lora_backend!r}")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    seed: int = 0
