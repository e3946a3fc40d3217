"""Tensor parallelism inside a model (Megatron-style).

Each of ``size`` ranks holds a slice of every layer's attention heads and MLP
columns, and the full embedding, norms and LM head::

    qkv_proj, gate_up_proj   column-parallel: this rank's heads / columns
    o_proj, down_proj        row-parallel: this rank's input slice, then one
                             all-reduce sums the ranks' partial products

Two all-reduces per layer; everything between them is local. A row-parallel
bias is kept by rank 0 only (the others hold zeros), so the sum adds it once.

With fewer KV heads than ranks (GQA/MQA models on many GPUs), each KV head is
replicated on ``size / num_kv_heads`` consecutive ranks, which are exactly the
ranks whose query heads read it (``kv_head_range``)::

    8 query heads, 2 KV heads, 4 ranks:
    rank 0: q 0-1, kv 0   rank 1: q 2-3, kv 0   rank 2: q 4-5, kv 1   rank 3: q 6-7, kv 1

The LM head is split by vocabulary (``vocab_range``): each rank computes its
slice of the logits, one all-gather joins them. With tied embeddings the
slice is a view of the embedding rows, so it costs no memory.
"""

from __future__ import annotations

import torch

from pllm.core.interfaces import Communicator


def divide(total: int, size: int, what: str) -> int:
    """One rank's share of ``total`` (heads, columns) over ``size`` ranks,
    which must divide it evenly."""
    if total % size:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({size})")
    return total // size


def kv_head_split(total: int, size: int) -> int:
    """KV heads per rank: ``total / size``, or 1 (replicated) when there are
    fewer heads than ranks and the ranks split evenly over them."""
    if total >= size:
        return divide(total, size, "the number of key/value heads")
    if size % total:
        raise ValueError(
            f"the number of key/value heads ({total}) is below tensor_parallel_size ({size}) "
            f"and does not divide it, so the heads cannot be replicated evenly over the ranks"
        )
    return 1


class TensorParallel:
    def __init__(self, rank: int = 0, size: int = 1, comm: Communicator | None = None) -> None:
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"tensor-parallel rank {rank} of {size} is not a valid place")
        if size > 1 and comm is None:
            raise ValueError(f"tensor parallelism over {size} ranks needs a communicator")
        self.rank, self.size, self.comm = rank, size, comm

    def shard(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous slice of ``tensor`` along ``dim``."""
        if self.size == 1:
            return tensor
        part = tensor.shape[dim] // self.size
        return tensor.narrow(dim, self.rank * part, part)

    def kv_head_range(self, total: int) -> tuple[int, int]:
        """This rank's KV heads ``[lo, hi)`` of ``total``: its even share, or
        the one head its query heads read when heads are replicated."""
        per_rank = kv_head_split(total, self.size)
        if total >= self.size:
            return self.rank * per_rank, (self.rank + 1) * per_rank
        head = self.rank // (self.size // total)
        return head, head + 1

    def vocab_part(self, vocab: int) -> int:
        """Rows per rank of a ``vocab``-row LM head: ``ceil(vocab / size)``."""
        return -(-vocab // self.size)

    def vocab_range(self, vocab: int) -> tuple[int, int]:
        """This rank's rows ``[lo, hi)`` of a ``vocab``-row LM head, the last
        slice shorter when ``size`` does not divide ``vocab``."""
        part = self.vocab_part(vocab)
        lo = min(self.rank * part, vocab)
        return lo, min(lo + part, vocab)

    def gather_vocab(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        """Every rank's logits slice, joined into ``[rows, vocab]``."""
        if self.size == 1:
            return logits
        part = self.vocab_part(vocab)
        if logits.shape[-1] < part:  # the short last slice
            logits = torch.nn.functional.pad(logits, (0, part - logits.shape[-1]))
        return self.comm.all_gather(logits.contiguous(), dim=-1)[..., :vocab]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks (``x`` itself on one rank)."""
        if self.size == 1:
            return x
        return self.comm.all_reduce(x.contiguous())


SINGLE = TensorParallel()


# Pipeline parallelism: the layers split into stages, one after the other.
# ``PLLM_PP_LAYER_PARTITION="17,13"`` gives each stage's layer count (they
# must add up to the model's); by default the layers split evenly, the
# remainder going to the stages before the last (which also runs the LM head).
PARTITION_ENV = "PLLM_PP_LAYER_PARTITION"


class PipelineStage:
    """Which part of the model a stage holds: layers ``[first_layer,
    last_layer)``, the embedding on the first stage, the final norm and the LM
    head on the last (and the embedding there too when the head is tied to
    it). One stage (the default) holds everything: ``WHOLE`` stands for it
    before the model's layer count is known (``for_model``)."""

    def __init__(self, rank: int = 0, size: int = 1, num_layers: int = 0) -> None:
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"pipeline stage {rank} of {size} is not a valid place")
        self.rank, self.size = rank, size
        counts = layer_partition(num_layers, size) if size > 1 else [num_layers]
        self.first_layer = sum(counts[:rank])
        self.last_layer = self.first_layer + counts[rank]

    def for_model(self, num_layers: int) -> PipelineStage:
        """This stage of a model of ``num_layers`` layers."""
        return PipelineStage(self.rank, self.size, num_layers)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def holds(self, layer: int) -> bool:
        return self.first_layer <= layer < self.last_layer

    @property
    def num_layers(self) -> int:
        return self.last_layer - self.first_layer


def layer_partition(num_layers: int, size: int) -> list[int]:
    """Each of ``size`` stages' layer count (see ``PARTITION_ENV``); every
    stage needs at least one layer."""
    import os

    if size > num_layers:
        raise ValueError(f"pipeline_parallel_size ({size}) exceeds the model's {num_layers} "
                         f"layers: every stage needs at least one")
    given = os.environ.get(PARTITION_ENV)
    if given:
        try:
            counts = [int(part) for part in given.split(",")]
        except ValueError:
            raise ValueError(f"{PARTITION_ENV}={given!r} is not a comma-separated list of "
                             f"layer counts") from None
        if len(counts) != size or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(f"{PARTITION_ENV}={given!r} must give {size} layer counts, each "
                             f">= 1, adding up to the model's {num_layers} layers")
        return counts
    base, extra = divmod(num_layers, size)
    # The remainder on the stages before the last, from the one before it back.
    return [base + (1 if size - 1 - extra <= i < size - 1 else 0) for i in range(size)]


WHOLE = PipelineStage()


class OnAnotherStage(torch.nn.Module):
    """The place of a module another pipeline stage holds (no parameters;
    the checkpoint's tensors for it are skipped)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module is held by another pipeline stage")
