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


def block_size(fmt: str) -> tuple[int, int]:
    """(values, bytes) of one block of GGUF format ``fmt``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[fmt]]


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
        starts = np.cumsum([0, *sizes[:-1]])
        return tuple(self.narrow(dim, int(s), n) for s, n in zip(starts, sizes))

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
        return piece.format if isinstance(piece, GGUFWeight) else "dense"

    segments = []
    for _, run in itertools.groupby(pieces, key=kind):
        run = list(run)
        if isinstance(run[0], torch.Tensor):
            segments.append(torch.cat(run))
        else:
            rows = sum(p.shape[0] for p in run)
            segments.append(run[0] if len(run) == 1 else GGUFWeight(
                torch.cat([p.data for p in run]), run[0].format, (rows, run[0].shape[1])))
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


def reference_matmul(x: torch.Tensor, weight: GGUFWeight) -> torch.Tensor:
    """``x @ W.T``, dequantizing ``W`` on every call: the oracle, and the
    path of a platform that attaches no kernel."""
    return F.linear(x, weight.dequantize(x.dtype).to(x.device))


def reference_rows(weight: GGUFWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of ``W``, dequantized (an embedding lookup)."""
    picked = GGUFWeight(weight.data.index_select(0, ids.reshape(-1).cpu()), weight.format,
                        (ids.numel(), weight.shape[1]))
    return picked.dequantize().reshape(*ids.shape, weight.shape[1])


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` over a weight of one or more row segments, each a
    :class:`GGUFWeight` or a dense tensor (q/k/v fused from tensors stored in
    different formats keep one segment each)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.segments: list[GGUFWeight | torch.Tensor] = []
        # ``matmul(x, GGUFWeight) -> x @ W.T``: a platform's kernel replaces it.
        self.matmul: Callable[[torch.Tensor, GGUFWeight], torch.Tensor] = reference_matmul

    def load(self, weight: GGUFWeight | torch.Tensor | list, *, share: bool = False) -> None:
        """``share``: keep a slice as it is, a view of another module's
        blocks (a tied LM head's rows of the embedding), not a copy."""
        segments = weight if isinstance(weight, list) else [weight]
        rows = sum(s.shape[0] for s in segments)
        if rows != self.out_features or any(s.shape[1] != self.in_features for s in segments):
            shapes = [tuple(s.shape) for s in segments]
            raise ValueError(f"weight of shape(s) {shapes} does not fit a linear "
                             f"{self.in_features} -> {self.out_features}")
        self.segments = [s.owned() if isinstance(s, GGUFWeight) and not share else s
                         for s in segments]

    def weights(self) -> Iterator[GGUFWeight]:
        return (s for s in self.segments if isinstance(s, GGUFWeight))

    @property
    def formats(self) -> set[str]:
        return {s.format for s in self.weights()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segments = self.segments
        if len(segments) == 1 and isinstance(segments[0], GGUFWeight):
            out = self.matmul(x, segments[0])
        else:
            out = torch.cat([self.matmul(x, s) if isinstance(s, GGUFWeight)
                             else F.linear(x, s.to(x.dtype)) for s in segments], dim=-1)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        kinds = ", ".join(s.format if isinstance(s, GGUFWeight) else str(s.dtype)
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

