"""Engine configuration: one frozen dataclass per subsystem.

Values a user can get wrong are validated in ``__post_init__`` with a
``ValueError`` naming the field; a platform adjusts a config by returning a
changed copy (``dataclasses.replace``), never by editing it in place.

Some fields start as "decide for me" (``dtype="auto"``, ``max_model_len``
and ``block_size`` of None, ``kv_cache_dtype="fp8"``) and are resolved once,
against the platform and the model, by ``pllm.core.resolve`` when the engine
starts; after that ``EngineConfig.resolved`` holds and the concrete values
(``ModelConfig.torch_dtype``, ``CacheConfig.torch_cache_dtype``) are read
from the config instead of being passed around.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

_DTYPES = ("auto", "float32", "float16", "bfloat16")
# What a resolved cache dtype may be: a model dtype, or an 8-bit float format.
_CACHE_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz",
                 "float8_e5m2")
# KV-cache storage (vLLM's names): "auto" keeps the model dtype; "fp8" is the
# platform's e4m3 flavour (OCP e4m3fn on NVIDIA, e4m3fnuz on MI300).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
# Weight formats (--quantization): "gguf" keeps a .gguf file's quantized
# tensors in their block formats, multiplied by the platform's kernels;
# "none" dequantizes them at load; "auto" is "gguf" for a .gguf file on a
# platform that multiplies its formats, unless --dtype is given. "int8":
# every linear weight and the embedding rounded to int8 at load with one
# scale per output channel (weight-only; GGUF blocks dequantized first).
QUANTIZATIONS = ("auto", "none", "gguf", "int8", "fp8")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None  # folder, .gguf file, or None for the default model
    tokenizer: str | None = None
    dtype: str = "auto"  # resolved against the platform's capabilities
    max_model_len: int | None = None  # None: the model's own context length (resolved)
    seed: int = 0
    served_model_name: str | None = None
    chat_template: str | None = None  # a Jinja template, or a path to one
    quantization: str = "auto"  # one of QUANTIZATIONS; resolved to one of them but "auto"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {', '.join(_DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={self.quantization!r} is not one of "
                             f"{', '.join(QUANTIZATIONS)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The weights' and activations' dtype (once resolved: not "auto")."""
        if self.dtype == "auto":
            raise RuntimeError("ModelConfig.dtype is still 'auto': resolve the config first")
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int | None = None  # None: the platform's default_block_size (resolved)
    kv_cache_memory: int | None = None  # bytes; None: the platform decides
    # The fraction of the device's memory the KV-cache budget derives from when
    # kv_cache_memory is unset; each platform's allocator says how (GPUs: of
    # all memory, less weights and activations; the CPU: of the RAM available,
    # capped at 4 GiB). None: the platform's default.
    memory_utilization: float | None = None
    enable_prefix_caching: bool = True
    num_blocks_override: int | None = None  # exactly this many blocks (the core applies it)
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES (the user's choice)
    cache_dtype: str | None = None  # the resolved storage dtype's torch name
    # vLLM's spelling of memory_utilization, kept as an alias.
    gpu_memory_utilization: float | None = None

    def __post_init__(self) -> None:
        if self.gpu_memory_utilization is not None:
            if self.memory_utilization not in (None, self.gpu_memory_utilization):
                raise ValueError("give memory_utilization or its alias gpu_memory_utilization, "
                                 "not both")
            object.__setattr__(self, "memory_utilization", self.gpu_memory_utilization)
            object.__setattr__(self, "gpu_memory_utilization", None)
        if self.cache_dtype is not None and self.cache_dtype not in _CACHE_DTYPES:
            raise ValueError(f"cache_dtype={self.cache_dtype!r} is not one of "
                             f"{', '.join(_CACHE_DTYPES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}"
            )
        if self.block_size is not None and (self.block_size < 1
                                            or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if self.memory_utilization is not None and not 0.0 < self.memory_utilization <= 1.0:
            raise ValueError(
                f"memory_utilization must be in (0, 1], got {self.memory_utilization}"
            )
        if self.num_blocks_override is not None and self.num_blocks_override < 1:
            raise ValueError(f"num_blocks_override must be >= 1, got {self.num_blocks_override}")

    @property
    def torch_cache_dtype(self) -> torch.dtype:
        """What K/V are stored as (once resolved)."""
        if self.cache_dtype is None:
            raise RuntimeError("CacheConfig.cache_dtype is unresolved: resolve the config first")
        return getattr(torch, self.cache_dtype)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    enable_chunked_prefill: bool = True
    # While requests are decoding, size each step's prefill work from measured
    # step times so that a step takes about this long (the inter-token latency
    # streams see); None: every step may carry max_num_batched_tokens.
    target_step_latency_s: float | None = None

    def __post_init__(self) -> None:
        if self.target_step_latency_s is not None and not self.target_step_latency_s > 0:
            raise ValueError(f"target_step_latency_s must be > 0 seconds, got "
                             f"{self.target_step_latency_s}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


EXECUTOR_BACKENDS = ("mp", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    # Stages the layers are split into (the embedding in the first, the norm
    # and LM head in the last), each stage tensor_parallel_size ranks:
    # world_size = tensor_parallel_size * pipeline_parallel_size ranks, rank
    # r in stage r // tensor_parallel_size (``pllm.core.pipeline``).
    pipeline_parallel_size: int = 1
    # How ranks 1..N-1 run: "mp" (a process each on this machine) or "ray"
    # (a Ray actor each, anywhere in a Ray cluster); vLLM's names.
    distributed_executor_backend: str = "mp"
    # The Ray cluster to join (else RAY_ADDRESS, else a local one is started).
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(
                f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}")
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend={self.distributed_executor_backend!r}"
                             f" is not one of {', '.join(EXECUTOR_BACKENDS)}")

    @property
    def world_size(self) -> int:
        """Every rank: the tensor-parallel group of each pipeline stage."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "auto"
    enforce_eager: bool = False  # no graph capture / compilation of the decode step
    # torch intra-op threads per rank, for platforms that compute on the host
    # (the CPU platform's setup_process applies it; None: the cores split over
    # the tensor-parallel ranks).
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")


SPECULATIVE_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's ``speculative_config`` keys): a proposer
    guesses ``num_speculative_tokens`` tokens per decoding sequence and the
    step checks them all in one forward pass.

    ``ngram``: prompt lookup, the longest suffix of the sequence
    (``prompt_lookup_max`` down to ``prompt_lookup_min`` tokens) found
    earlier in its prompt or output proposes what followed it there (as in
    vLLM, one bound given sets both; neither: 5).

    ``draft_model``: ``model`` (a folder or .gguf file, with the target's
    vocabulary) runs on the same platform, with the same dtype and tensor
    parallelism, and proposes its greedy continuation; its K/V live in a
    cache of its own that shares the target's block tables."""

    method: str = "ngram"
    num_speculative_tokens: int | None = None  # required
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None  # draft_model's
    # No drafts in a step that starts with this many sequences running, or
    # more (vLLM's key): where a step is compute-bound, rejected drafts cost
    # more than accepted ones save. None: speculate at every batch size.
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be >= 1, got {self.disable_by_batch_size}")
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method {self.method!r} is not one of "
                             f"{', '.join(SPECULATIVE_METHODS)}")
        if self.num_speculative_tokens is None:
            raise ValueError("speculative_config needs num_speculative_tokens")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got "
                             f"{self.num_speculative_tokens}")
        if self.method == "draft_model":
            if not self.model:
                raise ValueError("speculative method 'draft_model' needs model: the draft "
                                 "model's folder or .gguf file")
            for key in ("prompt_lookup_min", "prompt_lookup_max"):
                if getattr(self, key) is not None:
                    raise ValueError(f"speculative_config: {key} is the ngram method's, not "
                                     f"draft_model's")
            return
        if self.model is not None:
            raise ValueError("speculative_config: model is the draft_model method's; the ngram "
                             "method looks up the request's own tokens")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None and hi is None:
            lo = hi = 5
        lo, hi = (hi if lo is None else lo), (lo if hi is None else hi)
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")

    @classmethod
    def from_dict(cls, value: dict | str | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From vLLM's JSON object (a dict, or its text); unknown keys are refused by name."""
        import json

        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        for key in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                    "disable_by_batch_size"):
            if key in value and (not isinstance(value[key], int) or isinstance(value[key], bool)):
                raise ValueError(f"speculative_config: {key} must be an integer, got {value[key]!r}")
        if "method" not in value and value.get("model") is not None:
            value = {**value, "method": "draft_model"}  # vLLM: a model and no method is a draft
        for key in ("method", "model"):
            if key in value and not isinstance(value[key], str):
                raise ValueError(f"speculative_config: {key} must be a string, got {value[key]!r}")
        return cls(**value)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    speculative: SpeculativeConfig | None = None

    @property
    def resolved(self) -> bool:
        """Whether every "decide for me" value has been decided."""
        return (self.model.dtype != "auto" and self.model.max_model_len is not None
                and self.cache.block_size is not None and self.cache.cache_dtype is not None)


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
    except (ValueError, OverflowError):  # OverflowError: "inf"
        raise ValueError(f"kv_cache_memory={value!r} is not a size like '2GiB' or '512MB'") from None
