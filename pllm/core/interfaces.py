"""The contracts between pllm's device-agnostic core and a hardware platform.

A platform supplies three things and nothing else:

* an :class:`AttentionBackend`: how K/V are written into the paged cache and
  how attention reads them back (the backend owns the cache layout);
* a :class:`KVCacheAllocator`: how many blocks fit in memory and the physical
  per-layer cache tensors on its device;
* a :class:`Communicator`: the collectives used by tensor parallelism.

Everything the core needs to know about a chip beyond that is data:
:class:`PlatformCapabilities`. The core never asks "is this CUDA?".
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from pllm.core.config import CacheConfig, EngineConfig


@dataclass(frozen=True)
class Detection:
    """Whether a platform can run here. ``score == 0`` means unavailable;
    ``reason`` always says why, in words a user can act on."""

    score: int
    reason: str

    def __post_init__(self) -> None:
        if self.score < 0:
            raise ValueError(f"Detection score must be >= 0, got {self.score}")

    @property
    def available(self) -> bool:
        return self.score > 0


@dataclass(frozen=True)
class PlatformCapabilities:
    """What a platform can do, as data. The core reads every field (where is
    listed in ``docs/plugins.md``) instead of checking which platform it
    runs on."""

    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    default_dtype: torch.dtype = torch.float32
    block_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    # What --block-size is when not given (the one of block_sizes nearest 16
    # when 16 is not among them).
    default_block_size: int = 16
    head_dims: tuple[int, ...] | None = None  # None: any head_dim
    # Whether attention takes ``sliding_window``; a model with one is refused otherwise.
    supports_sliding_window: bool = True
    # Whether attention takes ``soft_cap`` (Gemma 2's attention logit
    # soft-capping); a model with one is refused otherwise.
    supports_soft_cap: bool = False
    # 8-bit float formats the attention backend can store K/V in (scaled,
    # besides the model dtype): ``--kv-cache-dtype fp8`` picks from these.
    kv_cache_dtypes: tuple[torch.dtype, ...] = ()
    # Weight formats the platform multiplies as they are: GGUF block formats
    # (type names: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) and F8_E4M3 (fp8
    # with one scale per output channel). ``--quantization gguf`` keeps a
    # .gguf file's tensors in these formats, ``int8`` needs Q8_0, ``fp8``
    # F8_E4M3 (``pllm.models.quant``); the platform's ``prepare_model``
    # attaches its kernels to them. Tensors in other formats are dequantized.
    weight_formats: tuple[str, ...] = ()
    # The activation dtypes those kernels multiply with (a quantized model
    # runs in default_dtype when it is one of them, else in the first).
    weight_format_dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    # Whether ``Platform.make_decode_runner`` is worth asking (graph capture).
    supports_graphs: bool = False
    # Run one forward pass of a full token budget before sizing the KV cache,
    # so that the allocator's "free memory" already excludes peak activations.
    profiles_memory: bool = False
    # Static-shape devices (XLA) compile once per shape: the runner pads each
    # step's token count and sequence count up to these buckets, and block
    # tables to the width of ``max_model_len``. Empty: dynamic shapes.
    token_buckets: tuple[int, ...] = ()
    seq_buckets: tuple[int, ...] = ()
    # Whether the platform's tensors work under torch.inference_mode (XLA's
    # do not): the runner falls back to no_grad where they do not.
    inference_mode: bool = True
    # Tensor-parallel ranks may share one device (the host's cores); otherwise
    # each rank needs a device of its own (``device(rank)``).
    ranks_share_device: bool = False
    # What a rank reserves in a Ray cluster (--distributed-executor-backend
    # ray): one of this Ray resource ("GPU", "TPU", "neuron_cores"); None:
    # one CPU.
    ray_resource: str | None = None
    # Pipeline parallelism (--pipeline-parallel-size): the communicator has
    # point-to-point ``send``/``recv`` between ranks and ``new_group`` for
    # each stage's tensor-parallel group (a torch.distributed one has them).
    # Not with static shapes: a stage's inputs would change the programs.
    pipeline_parallel: bool = False

    def __post_init__(self) -> None:
        if self.default_dtype not in self.dtypes:
            raise ValueError(f"default_dtype {self.default_dtype} not in dtypes {self.dtypes}")
        if self.default_block_size not in self.block_sizes:
            default = min(self.block_sizes, key=lambda b: abs(b - 16))
            object.__setattr__(self, "default_block_size", default)
        if bool(self.token_buckets) != bool(self.seq_buckets):
            raise ValueError("token_buckets and seq_buckets go together (both or neither)")
        if self.pipeline_parallel and self.token_buckets:
            raise ValueError("pipeline_parallel is not supported with static shapes (token_buckets)")
        for name in ("token_buckets", "seq_buckets"):
            buckets = getattr(self, name)
            if list(buckets) != sorted(set(buckets)) or (buckets and buckets[0] < 1):
                raise ValueError(f"{name} must be increasing positive sizes, got {buckets}")

    @property
    def max_block_size(self) -> int:
        return max(self.block_sizes)

    @property
    def supports_fp8(self) -> bool:
        return bool(self.kv_cache_dtypes)

    @property
    def static_shapes(self) -> bool:
        return bool(self.token_buckets)

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return dtype in self.dtypes

    def supports_kv_cache_dtype(self, dtype: torch.dtype) -> bool:
        return dtype in self.kv_cache_dtypes

    def supports_block_size(self, block_size: int) -> bool:
        return block_size in self.block_sizes

    def supports_head_dim(self, head_dim: int) -> bool:
        return self.head_dims is None or head_dim in self.head_dims


@dataclass
class AttentionMetadata:
    """One step's flat varlen batch, built once on the host and shared by all layers.

    Sequences are ordered decodes first: the first ``num_decodes`` sequences
    have exactly one query token each. Token ``t`` of sequence ``s`` sits at
    flat row ``query_start_loc[s] + t`` and at absolute position
    ``seq_lens[s] - query_len(s) + t``; it attends causally to every cached
    position up to and including its own (and, with a sliding window ``W``,
    only to the last ``W`` of them).

    ``block_tables[s, i]`` is the physical block holding positions
    ``[i * block_size, (i + 1) * block_size)`` of sequence ``s``.
    ``slot_mapping[t] = block * block_size + offset`` is where token ``t``'s
    K/V go; a negative slot means padding (nothing is written).

    On a platform with static shapes (``token_buckets``) the runner pads:
    ``num_tokens`` to a token bucket, ``num_seqs`` always to the sequence
    bucket of ``max_num_seqs`` and the block tables to the width of
    ``max_model_len``. Sequences past the real ones have query length 0 and
    ``seq_lens`` 0, and token rows from ``query_start_loc[-1]`` to
    ``num_tokens`` belong to no sequence (slot -1; their output is never
    read). ``max_query_len``, ``max_seq_len`` and ``num_decodes`` stay those
    of the real sequences: a static-shape backend must not shape anything by
    them.
    """

    num_seqs: int
    num_tokens: int
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], on device
    seq_lens: torch.Tensor  # int32 [num_seqs], on device: cached + new tokens
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], on device
    slot_mapping: torch.Tensor  # int64 [num_tokens], on device
    # Host copies, for backends that plan work on the CPU. In a step a decode
    # runner replays (``Platform.make_decode_runner``: graphs) they are the
    # worst case, ``max_model_len`` each, fixed when the graph was recorded:
    # a backend of a platform with ``supports_graphs`` reads the real lengths
    # from ``seq_lens``.
    query_start_loc_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)
    # Backend-specific derived fields (see AttentionBackend.prepare_metadata).
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes


class AttentionBackend(abc.ABC):
    """PagedAttention for one platform. One instance serves every layer."""

    name: ClassVar[str] = "abstract"

    @abc.abstractmethod
    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Shape of one layer's cache tensor (K and V together). The backend
        owns the layout; the core only ever addresses it through block ids."""

    @abc.abstractmethod
    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        *,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        """Store ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` at
        ``slot_mapping`` (in place). Negative slots change no block (they are
        skipped, or written outside ``block_storage``).

        A cache in one of the capabilities' ``kv_cache_dtypes`` (8-bit
        floats) holds ``key / k_scale`` and ``value / v_scale``, saturated to
        the format's largest finite value. The scales are passed only with
        such a cache: a backend that declares no ``kv_cache_dtypes`` need not
        take them."""

    @abc.abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
        soft_cap: float | None = None,
    ) -> torch.Tensor:
        """Attention for ``query`` ``[num_tokens, num_heads, head_dim]`` against
        the cache (which already holds this step's K/V). Returns the same shape.
        ``num_heads`` is a multiple of the cache's ``num_kv_heads`` (GQA/MQA).
        An 8-bit cache is read as ``k_scale * K`` and ``v_scale * V`` (the
        scales ``write_kv`` divided by; passed only with such a cache).
        ``soft_cap`` ``c``: each scaled score ``s`` becomes ``c * tanh(s / c)``
        before the mask and the softmax (Gemma 2); passed only to a backend
        whose capabilities say ``supports_soft_cap``, and only when set."""

    @abc.abstractmethod
    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: list[tuple[int, int]]) -> None:
        """Copy whole blocks ``src -> dst`` in every layer (copy-on-write)."""

    def block_storage(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """Optional, defaults to ``kv_cache``: the part of a cache tensor that
        holds the engine's blocks. A backend that keeps storage of its own
        beside them (the XLA backends' padding page, where negative slots
        write so that a padded step keeps its shape) returns the rest; "a
        negative slot changes nothing" holds for this part."""
        return kv_cache

    def prepare_metadata(self, metadata: AttentionMetadata) -> AttentionMetadata:
        """Optional, defaults to returning ``metadata`` unchanged. Called once per
        step before the forward pass; a backend may add its own derived fields
        to ``metadata.extras`` (split-KV plans, padded shapes, ...)."""
        return metadata


@dataclass
class ForwardContext:
    """What every layer needs in one step, set once by the runner."""

    backend: AttentionBackend
    metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]


class AttentionLayer(Protocol):
    """One layer's paged attention as the engine sees it: which cache it
    uses, and the scales an 8-bit cache stores K and V divided by."""

    layer_idx: int
    k_scale: float
    v_scale: float
    scales_from_checkpoint: bool


@runtime_checkable
class Model(Protocol):
    """What the core relies on from a model (``pllm.models`` builds them):

    * ``model(input_ids, positions, ctx)``: hidden states ``[num_tokens,
      hidden]`` of one flat step; attention goes through ``ctx.backend``
      into ``ctx.kv_caches[layer]``, nothing else of the step is kept;
    * ``compute_logits(hidden)``: ``[rows, vocab]`` logits of the given rows
      (under tensor parallelism every rank calls it, with the same rows);
    * ``num_layers`` (one KV-cache tensor each) and ``attention_layers()``,
      in layer order.

    Platforms may swap a model's modules in ``Platform.prepare_model`` only
    through the hooks ``pllm.models`` documents for that (see
    ``pllm.models.layers``), never by reaching into a model's own classes.
    """

    @property
    def num_layers(self) -> int: ...

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 ctx: ForwardContext) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def attention_layers(self) -> list[AttentionLayer]: ...


class KVCacheAllocator(abc.ABC):
    """Physical KV-cache memory on one device."""

    @abc.abstractmethod
    def num_blocks(self, cache_config: CacheConfig, bytes_per_block: int) -> int:
        """How many blocks (each ``bytes_per_block`` over all layers) fit the
        memory budget: ``cache_config.kv_cache_memory`` bytes when set, else
        what the device has free under the platform's own policy. Called after
        the model is loaded (and, where the platform profiles, after a
        profiling forward pass)."""

    @abc.abstractmethod
    def allocate(
        self, num_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        """One zeroed cache tensor of ``shape`` per layer."""

    def profile(self, forward: Callable[[], int]) -> None:
        """Optional: run the profiling forward pass (platforms whose
        capabilities say ``profiles_memory``), measuring the device's memory
        around it for ``num_blocks``. ``forward`` returns how many of the
        bytes it held were its own throwaway KV cache, which the real cache
        replaces (not to be counted twice). The default just runs it."""
        forward()


class Communicator(abc.ABC):
    """Collectives among the ranks of one tensor-parallel group: what the
    model's tensor-parallel layers call (``pllm.models.parallel``), and the
    ``close`` the engine calls on shutdown. Ranks and barriers are the
    communicator's own business (a torch.distributed one has them; see
    ``pllm.platforms.common.communicator``).

    Pipeline parallelism (capabilities' ``pipeline_parallel``) also needs
    ``send``/``recv`` between any two ranks of the communicator
    ``make_communicator`` returns (every rank of the engine), and
    ``new_group`` for each stage's tensor-parallel group."""

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns ``tensor``."""

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` (rank order)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the group (the process group, shared memory, device
        streams), so that a second engine in the same process can build a new
        one. The engine calls it once per communicator, at shutdown."""

    # ---- pipeline parallelism (capabilities' ``pipeline_parallel``) ----------

    def send(self, tensor: torch.Tensor, dst: int) -> Any:
        """Start sending ``tensor`` to rank ``dst``; returns a handle whose
        ``wait()`` returns once ``tensor`` may be reused. Sends from one rank
        to another arrive in order."""
        raise NotImplementedError(f"{type(self).__name__} has no point-to-point send")

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Fill ``tensor`` with the next one rank ``src`` sent here; returns it."""
        raise NotImplementedError(f"{type(self).__name__} has no point-to-point recv")

    def new_group(self, ranks: list[int]) -> Communicator:
        """A communicator over ``ranks`` (of this one), whose collectives
        number them 0..len-1 by increasing rank here, whatever the order
        given (as torch's ``new_group``). Every rank of this communicator
        calls it for every group, in the same order; only the members use
        the result. Closing this communicator releases its groups."""
        raise NotImplementedError(f"{type(self).__name__} cannot make subgroups")


class Platform(abc.ABC):
    """A hardware platform. Detection must be cheap: never import a heavy
    vendor package just to answer "no"; import it lazily in the factories."""

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def detect(cls) -> Detection:
        """Whether this platform can run here, with a score and the exact reason."""

    @property
    @abc.abstractmethod
    def capabilities(self) -> PlatformCapabilities: ...

    @abc.abstractmethod
    def device(self, index: int = 0) -> torch.device:
        """The torch device tensors of rank ``index`` live on."""

    def physical_device_id(self, index: int = 0) -> str:
        """The id this machine (and a Ray cluster's accounting) knows device
        ``index`` by, where a process sees only some devices; default:
        ``index`` itself."""
        return str(index)

    @abc.abstractmethod
    def device_count(self) -> int:
        """How many devices ranks can be placed on (tensor parallelism needs
        one per rank unless the capabilities say ``ranks_share_device``)."""

    @abc.abstractmethod
    def make_attention_backend(self) -> AttentionBackend: ...

    @abc.abstractmethod
    def make_kv_cache_allocator(self) -> KVCacheAllocator: ...

    @abc.abstractmethod
    def make_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator: ...

    # ---- optional hooks, with defaults -------------------------------------

    def update_config(self, config: EngineConfig) -> EngineConfig:
        """Optional, defaults to returning ``config``. Return a changed copy
        (``dataclasses.replace``) to apply platform policy, e.g. a dtype."""
        return config

    def prepare_model(self, model: torch.nn.Module, config: EngineConfig) -> torch.nn.Module:
        """Optional, defaults to returning ``model``: called once after the
        weights are loaded, to swap in platform-specific layer implementations
        (a faster GEMM path, say) from outside the model definition."""
        return model

    def setup_process(self, config: EngineConfig, rank: int) -> None:
        """Optional, defaults to nothing: called in every rank's process (rank
        0 in the engine's own) before the model is built, e.g. to set thread
        counts. Undo it in ``teardown_process``."""

    def teardown_process(self) -> None:
        """Optional, defaults to nothing: called at engine shutdown, in rank
        0's process, to undo ``setup_process``."""

    def synchronize(self) -> None:
        """Optional, defaults to nothing: wait for queued device work (the
        engine calls it after the profiling pass)."""

    def graph_break(self) -> None:
        """Optional, defaults to nothing: called by the runner where one of a
        step's programs ends (after block copies, after the forward pass,
        after the LM head; the sampler ends where its token ids are read). A
        lazy-tensor platform (XLA) compiles the work traced so far (once per
        shape) and launches it here."""

    def compilations(self) -> tuple[int, float] | None:
        """Optional, defaults to None (nothing is compiled per shape): how
        many programs this process has compiled so far, and the seconds that
        took. The engine logs it after the warm-up and ``pllm bench`` reports
        it; on a static-shape platform it must not grow while serving."""
        return None

    def make_decode_runner(self, model: Model, backend: AttentionBackend,
                           kv_caches: list[torch.Tensor], config: EngineConfig):
        """Optional, defaults to None (every step runs eagerly); asked only when
        the capabilities say ``supports_graphs`` and ``enforce_eager`` is off.
        Returns a ``pllm.core.graphs.StaticDecodeRunner`` (or subclass) that
        serves decode-only steps from persistent buffers, e.g. by replaying
        captured graphs. Called once the KV cache exists; the engine calls its
        ``capture_all`` right after. ``config.model.max_model_len`` is resolved."""
        return None
