"""Engine configuration: one frozen dataclass per subsystem.

Values a user can get wrong are validated in ``__post_init__`` with a
``ValueError`` naming the field; a platform adjusts a config by returning a
changed copy (``dataclasses.replace``), never by editing it in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_DTYPES = ("auto", "float32", "float16", "bfloat16")
# KV-cache storage (vLLM's names): "auto" keeps the model dtype; "fp8" is the
# platform's e4m3 flavour (OCP e4m3fn on NVIDIA, e4m3fnuz on MI300).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None  # folder, .gguf file, or None for the default model
    tokenizer: str | None = None
    dtype: str = "auto"  # resolved against the platform's capabilities
    max_model_len: int | None = None  # None: the model's own context length
    seed: int = 0
    served_model_name: str | None = None
    chat_template: str | None = None  # a Jinja template, or a path to one

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {', '.join(_DTYPES)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: the platform decides
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_blocks_override: int | None = None  # for tests: exactly this many blocks
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES, resolved against the platform

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_blocks_override is not None and self.num_blocks_override < 1:
            raise ValueError(f"num_blocks_override must be >= 1, got {self.num_blocks_override}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "auto"
    enforce_eager: bool = False  # no graph capture / compilation of the decode step
    num_threads: int | None = None  # CPU: torch intra-op threads (None: all cores)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)


def parse_memory(value: str | int | None) -> int | None:
    """``"4GiB"``, ``"512MB"``, ``"1e9"`` or an int -> bytes."""
    if value is None or isinstance(value, int):
        return value
    text = value.strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6,
             "gb": 10**9, "k": 2**10, "m": 2**20, "g": 2**30, "b": 1}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        number, scale = text, 1
    try:
        return int(float(number) * scale)
    except ValueError:
        raise ValueError(f"kv_cache_memory={value!r} is not a size like '2GiB' or '512MB'") from None
