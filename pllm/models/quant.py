"""Quantized weights kept in their storage format: GGUF tensors as the file
holds them (blocks of 32 or 256 values with their scales), multiplied by the
platform's kernel without ever being dequantized whole.

:class:`GGUFWeight` is one such tensor: its raw bytes as uint8
``[rows, row_bytes]``, its format (a GGUF type name) and its logical shape.
Rows are whole blocks, so the operations loading needs work on the bytes:
taking rows (a tensor-parallel rank's heads, a vocabulary slice), joining
rows (q/k/v into one projection) and, on block boundaries only, taking
columns (a row-parallel rank's input slice).

:class:`QuantLinear` and :class:`QuantEmbedding` take the place of the
model's ``nn.Linear`` / ``nn.Embedding`` before the weights load
(:func:`quantize_modules`). Their ``matmul`` / ``rows`` default to the
reference (dequantize with the ``gguf`` package, then multiply), which is
correct anywhere and slow; a platform that declares a format in
``PlatformCapabilities.weight_formats`` attaches its kernel in
``prepare_model``.

:class:`FP8Weight` is the other kind of kept weight: float8 e4m3fn values
with one float32 scale per row (``--quantization fp8``, rounded at load by
:func:`fp8_per_channel`). Its products quantize the activations too,
dynamically (:func:`quantize_fp8_activations`), so that both operands are
8-bit, as fp8 tensor cores take them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("pllm")

# The GGUF formats pllm keeps quantized where a platform multiplies them;
# tensors in any other format are dequantized when they load.
GGUF_FORMATS = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# --quantization fp8: e4m3fn values, one float32 scale per output channel
# (safetensors' name for the element type).
FP8_FORMAT = "F8_E4M3"
FP8_MAX = 448.0  # e4m3fn's largest finite value


def block_size(fmt: str) -> tuple[int, int]:
    """(values, bytes) of one block of format ``fmt`` (fp8 values stand alone)."""
    if fmt == FP8_FORMAT:
        return 1, 1
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[fmt]]


def _split(weight, sizes: list[int], dim: int) -> tuple:
    """``weight`` cut into consecutive pieces of ``sizes`` along ``dim`` (its ``narrow``)."""
    starts = np.cumsum([0, *sizes[:-1]])
    return tuple(weight.narrow(dim, int(s), n) for s, n in zip(starts, sizes))


@dataclass(frozen=True)
class GGUFWeight:
    """A 2-D GGUF tensor in its block format: ``data`` is uint8
    ``[rows, row_bytes]``, ``shape`` the logical ``(rows, cols)``."""

    data: torch.Tensor
    format: str
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        rows, cols = self.shape
        values, nbytes = block_size(self.format)
        if cols % values or tuple(self.data.shape) != (rows, cols // values * nbytes):
            raise ValueError(f"a {self.format} tensor of shape {self.shape} is uint8 "
                             f"[{rows}, {cols // values * nbytes}], got {tuple(self.data.shape)}")

    @classmethod
    def from_blocks(cls, data: torch.Tensor, fmt: str) -> GGUFWeight:
        """``data``: uint8 ``[rows, row_bytes]`` of whole blocks of ``fmt``."""
        if fmt not in GGUF_FORMATS:
            raise ValueError(f"unknown GGUF format {fmt!r}; kept in blocks: {', '.join(GGUF_FORMATS)}")
        if data.dtype != torch.uint8 or data.dim() != 2:
            raise ValueError(f"{fmt} blocks are a uint8 matrix, got {data.dtype} {tuple(data.shape)}")
        values, nbytes = block_size(fmt)
        if data.shape[1] % nbytes:
            raise ValueError(f"rows of {data.shape[1]} bytes are not whole {fmt} blocks of {nbytes}")
        return cls(data, fmt, (data.shape[0], data.shape[1] // nbytes * values))

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def narrow(self, dim: int, start: int, length: int) -> GGUFWeight:
        """Rows ``[start, start + length)`` (dim 0), or columns (dim 1),
        which must start and end on block boundaries."""
        rows, cols = self.shape
        if dim == 0:
            return GGUFWeight(self.data.narrow(0, start, length), self.format, (length, cols))
        values, nbytes = block_size(self.format)
        if start % values or length % values:
            raise ValueError(f"columns [{start}, {start + length}) of a {self.format} tensor "
                             f"cut its blocks of {values}: the split must fall on block boundaries")
        return GGUFWeight(self.data.narrow(1, start // values * nbytes, length // values * nbytes),
                          self.format, (rows, length))

    def split(self, sizes: list[int], dim: int = 0) -> tuple[GGUFWeight, ...]:
        return _split(self, sizes, dim)

    @staticmethod
    def cat(pieces: list[GGUFWeight]) -> GGUFWeight:
        """``pieces`` (one format, one width) stacked by rows."""
        if len(pieces) == 1:
            return pieces[0]
        rows = sum(p.shape[0] for p in pieces)
        return GGUFWeight(torch.cat([p.data for p in pieces]), pieces[0].format,
                          (rows, pieces[0].shape[1]))

    def to(self, device: torch.device | str) -> GGUFWeight:
        return GGUFWeight(self.data.to(device), self.format, self.shape)

    def owned(self) -> GGUFWeight:
        """This tensor with its own contiguous bytes (a slice keeps its whole
        source alive otherwise)."""
        if self.data.is_contiguous() and self.data.untyped_storage().nbytes() == self.nbytes:
            return self
        return GGUFWeight(self.data.contiguous().clone(), self.format, self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values, ``[rows, cols]`` (the reference: the ``gguf`` package's)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        values = dequantize(self.data.contiguous().cpu().numpy(), GGMLQuantizationType[self.format])
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(dtype)


def cat_rows(pieces: list) -> GGUFWeight | torch.Tensor | list:
    """``pieces`` stacked by rows: one tensor when they are all dense or all
    in one GGUF format, else a list of segments, neighbours of one kind
    joined (a linear of several segments)."""
    import itertools

    def kind(piece):
        return "dense" if isinstance(piece, torch.Tensor) else piece.format

    segments = []
    for _, run in itertools.groupby(pieces, key=kind):
        run = list(run)
        if isinstance(run[0], torch.Tensor):
            segments.append(torch.cat(run))
        else:
            segments.append(type(run[0]).cat(run))
    return segments[0] if len(segments) == 1 else segments


def int8_per_channel(weight: torch.Tensor) -> GGUFWeight:
    """``weight`` ``[rows, cols]`` rounded to int8 with one scale per row
    (output channel): ``scale = fp16(max |row| / 127)``, ``q = round(w /
    scale)``. Stored as Q8_0 blocks, the row's scale repeated in each, so
    the Q8_0 kernels multiply it (6% more bytes than int8 alone)."""
    rows, cols = weight.shape
    values, nbytes = block_size("Q8_0")
    if cols % values:
        raise ValueError(f"int8 blocks need rows of a multiple of {values} values, got {cols}")
    w = weight.detach().float().cpu()
    scale = (w.abs().amax(dim=1) / 127).clamp(max=65504.0).to(torch.float16)
    inverse = torch.where(scale > 0, 1 / scale.float(), torch.zeros((), dtype=torch.float32))
    q = torch.clamp(torch.round(w * inverse[:, None]), -127, 127).to(torch.int8)
    blocks = torch.empty(rows, cols // values, nbytes, dtype=torch.uint8)
    blocks[:, :, :2] = scale.view(torch.uint8).reshape(rows, 1, 2)
    blocks[:, :, 2:] = q.view(torch.uint8).reshape(rows, cols // values, values)
    return GGUFWeight(blocks.reshape(rows, -1), "Q8_0", (rows, cols))


@dataclass(frozen=True)
class FP8Weight:
    """A 2-D weight in float8 e4m3fn with one float32 scale per row (output
    channel): ``W[r] = data[r] * scale[r]``."""

    data: torch.Tensor  # float8_e4m3fn [rows, cols]
    scale: torch.Tensor  # float32 [rows]
    format = FP8_FORMAT

    def __post_init__(self) -> None:
        if self.data.dtype != torch.float8_e4m3fn or self.data.dim() != 2:
            raise ValueError(f"fp8 weights are a float8_e4m3fn matrix, got {self.data.dtype} "
                             f"{tuple(self.data.shape)}")
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != (self.data.shape[0],):
            raise ValueError(f"an fp8 weight of {self.data.shape[0]} rows needs float32 scales "
                             f"[{self.data.shape[0]}], got {self.scale.dtype} "
                             f"{tuple(self.scale.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() + 4 * self.scale.numel()

    def narrow(self, dim: int, start: int, length: int) -> FP8Weight:
        """Rows (dim 0) with their scales, or columns (dim 1), anywhere."""
        if dim == 0:
            return FP8Weight(self.data.narrow(0, start, length), self.scale.narrow(0, start, length))
        return FP8Weight(self.data.narrow(1, start, length), self.scale)

    def split(self, sizes: list[int], dim: int = 0) -> tuple[FP8Weight, ...]:
        return _split(self, sizes, dim)

    @staticmethod
    def cat(pieces: list[FP8Weight]) -> FP8Weight:
        if len(pieces) == 1:
            return pieces[0]
        return FP8Weight(torch.cat([p.data for p in pieces]), torch.cat([p.scale for p in pieces]))

    def to(self, device: torch.device | str) -> FP8Weight:
        return FP8Weight(self.data.to(device), self.scale.to(device))

    def owned(self) -> FP8Weight:
        if (self.data.is_contiguous()
                and self.data.untyped_storage().nbytes() == self.data.numel()
                and self.scale.untyped_storage().nbytes() == 4 * self.scale.numel()):
            return self
        return FP8Weight(self.data.contiguous().clone(), self.scale.contiguous().clone())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.float() * self.scale[:, None]).to(dtype)


def fp8_per_channel(weight: torch.Tensor) -> FP8Weight:
    """``weight`` ``[rows, cols]`` rounded to e4m3fn with one float32 scale
    per row: ``scale = max |row| / 448`` (1 for a row of zeros), ``q =
    fp8(w / scale)`` rounded to nearest even."""
    w = weight.detach().float().cpu()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return FP8Weight(q, scale)


FP8_ACTIVATION_SCALINGS = ("token", "tensor")


def fp8_activation_scaling() -> str:
    """How activations are scaled for fp8 products, from
    ``PLLM_FP8_ACTIVATIONS``: ``token`` (one scale per row, the default) or
    ``tensor`` (one for the whole step)."""
    import os

    value = os.environ.get("PLLM_FP8_ACTIVATIONS", "token")
    if value not in FP8_ACTIVATION_SCALINGS:
        raise ValueError(f"PLLM_FP8_ACTIVATIONS={value!r}; expected one of "
                         f"{', '.join(FP8_ACTIVATION_SCALINGS)}")
    return value


def quantize_fp8_activations(x: torch.Tensor, per_token: bool = True,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[M, K]`` as e4m3fn values and float32 scales, ``[M, 1]`` per
    token or ``[1, 1]`` per tensor, so that ``x ~ q * scale``. Dynamic: the
    scales are each call's absolute maxima / 448. Device ops only (no read
    back to the host), so a CUDA graph can hold it."""
    x32 = x.float().contiguous()
    amax = x32.abs().amax(dim=-1, keepdim=True)
    if not per_token:  # the rows' maxima, then theirs (an empty step has no rows)
        amax = amax.amax(dim=0, keepdim=True) if x.shape[0] else amax.new_zeros(1, 1)
    scale = torch.clamp(amax / FP8_MAX, min=torch.finfo(torch.float32).tiny)
    q = (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def reference_fp8_matmul(x: torch.Tensor, weight: FP8Weight, per_token: bool = True,
                         ) -> torch.Tensor:
    """``x @ W.T`` as fp8 kernels compute it: ``x`` quantized (``per_token``
    or per tensor), the 8-bit products summed in float32, then scaled by
    both operands' scales."""
    q, sx = quantize_fp8_activations(x.reshape(-1, x.shape[-1]), per_token)
    w = weight.to(x.device)
    y = (q.float() @ w.data.float().T) * sx * w.scale
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def reference_matmul(x: torch.Tensor, weight: GGUFWeight | FP8Weight) -> torch.Tensor:
    """``x @ W.T``, dequantizing ``W`` on every call (an fp8 weight's
    product quantizes ``x`` too): the oracle, and the path of a platform
    that attaches no kernel."""
    if isinstance(weight, FP8Weight):
        return reference_fp8_matmul(x, weight, fp8_activation_scaling() == "token")
    return F.linear(x, weight.dequantize(x.dtype).to(x.device))


def reference_rows(weight: GGUFWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of ``W``, dequantized (an embedding lookup)."""
    picked = GGUFWeight(weight.data.index_select(0, ids.reshape(-1).cpu()), weight.format,
                        (ids.numel(), weight.shape[1]))
    return picked.dequantize().reshape(*ids.shape, weight.shape[1])


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` over a weight of one or more row segments, each a
    kept weight (:class:`GGUFWeight`, :class:`FP8Weight`, or a platform's
    repacking of one) or a dense tensor (q/k/v fused from tensors stored in
    different formats keep one segment each)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.segments: list = []
        # ``matmul(x, kept weight) -> x @ W.T``: a platform's kernel replaces it.
        self.matmul: Callable[[torch.Tensor, object], torch.Tensor] = reference_matmul

    def load(self, weight: GGUFWeight | torch.Tensor | list, *, share: bool = False) -> None:
        """``share``: keep a slice as it is, a view of another module's
        blocks (a tied LM head's rows of the embedding), not a copy."""
        segments = weight if isinstance(weight, list) else [weight]
        rows = sum(s.shape[0] for s in segments)
        if rows != self.out_features or any(s.shape[1] != self.in_features for s in segments):
            shapes = [tuple(s.shape) for s in segments]
            raise ValueError(f"weight of shape(s) {shapes} does not fit a linear "
                             f"{self.in_features} -> {self.out_features}")
        self.segments = [s if isinstance(s, torch.Tensor) or share else s.owned()
                         for s in segments]

    def weights(self) -> Iterator:
        """The kept (not dense) segments."""
        return (s for s in self.segments if not isinstance(s, torch.Tensor))

    @property
    def formats(self) -> set[str]:
        return {s.format for s in self.weights()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segments = self.segments
        if len(segments) == 1 and not isinstance(segments[0], torch.Tensor):
            out = self.matmul(x, segments[0])
        else:
            out = torch.cat([F.linear(x, s.to(x.dtype)) if isinstance(s, torch.Tensor)
                             else self.matmul(x, s) for s in segments], dim=-1)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        kinds = ", ".join(str(s.dtype) if isinstance(s, torch.Tensor) else s.format
                          for s in self.segments)
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=[{kinds}]"


class QuantEmbedding(nn.Module):
    """An embedding table kept quantized: a lookup dequantizes the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.table: GGUFWeight | None = None
        # ``rows(GGUFWeight, ids) -> fp32 [*ids.shape, dim]``: a platform's kernel replaces it.
        self.rows: Callable[[GGUFWeight, torch.Tensor], torch.Tensor] = reference_rows
        self.dtype = torch.float32

    def load(self, weight: GGUFWeight) -> None:
        if weight.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"embedding of shape {weight.shape} does not fit "
                             f"({self.num_embeddings}, {self.embedding_dim})")
        self.table = weight.owned()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(self.table, ids).to(self.dtype)


def quantize_modules(model: nn.Module, targets: Iterable[str], dtype: torch.dtype) -> list[str]:
    """Replace the ``nn.Linear`` / ``nn.Embedding`` modules named in
    ``targets`` (module paths) by their quantized counterparts, which load
    GGUF weights as they are. Returns the paths replaced (a path naming no
    such module, an expert's, is left to load dense)."""
    replaced = []
    for path in dict.fromkeys(targets):
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
            module = getattr(parent, attr)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            new = QuantLinear(module.in_features, module.out_features, module.bias is not None)
        elif isinstance(module, nn.Embedding):
            new = QuantEmbedding(module.num_embeddings, module.embedding_dim)
            new.dtype = dtype
        else:
            continue
        setattr(parent, attr, new.to(dtype) if isinstance(new, QuantLinear) else new)
        replaced.append(path)
    return replaced


def quant_modules(model: nn.Module) -> Iterator[QuantLinear | QuantEmbedding]:
    return (m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding)))

