"""Linear layers on the host routed to the fastest of torch's fp32 GEMM paths
for their batch size, for any platform whose tensors live in host memory.

Where torch is built with MKL (x86), every linear weight but the LM head's
gets a packed copy made once at load, and every batch runs on it: MKL's
(``torch.ops.mkl._mkl_linear``) or oneDNN's, whichever
:func:`every_batch_packing` measures faster on the host at load. MKL runs
its fast paths on Intel CPUs only: on a 2-core AVX-512 AMD EPYC (torch
2.13), streaming SmolLM2-135M's 30 layers took 50 ms on oneDNN's copies
against 105 on MKL's for 64 rows, 188 against 358 for 257 and 1.3 against
2.5 s for 2,048 (270-380 GFLOP/s against 130-170), and 16 against 52 ms
for 16 rows; on an Intel Xeon MKL's were the faster (below). Streaming the 30 layers of
SmolLM2-135M (the weights come from DRAM, as in a real step), on a 2-core
AVX-512 host (torch 2.13): 44-54 ms for 33-65 rows against 50-81 for
``weight @ x.T`` and 42-70 for a oneDNN-packed copy; 89 against 128 / 108
for 129 rows and 160 against 198 / 218 for 257 (prefill). With MKL held to
AVX2 the order is the same, by 5-25%; at 1-8 rows it is on a par with
``weight @ x.T`` (16.6-17.6 ms against 16.0-18.8 for one row). MKL packs
for a batch size, but its layout does not depend on it here (the buffer is
the same size for every batch size), so one copy serves every batch: the
call passes its own row count, where torch's wrapper would fall back to an
unpacked product. MKL does not promise that layout, so the first weight of
each shape is checked at load against ``F.linear`` at several row counts
(:func:`_mkl_layout_holds`); where it does not hold, the oneDNN copy below
is made instead, and logged. The tests check it from 1 to 300 rows.
MKL's copies take about as much resident memory as the weights (SmolLM2:
1.85 GB resident after loading, against 1.84 with oneDNN's copies and 1.41
with none; MKL reserves 3 times the size but never touches most of it), so
they are made only when all of them fit in a quarter of the RAM available
at load (``PACK_SHARE``); otherwise, and for other dtypes, batches run as
without MKL.

Without MKL's packed product:

- up to ``SMALL_BATCH`` rows, ``weight @ x.T`` (on a 2-core AVX2 host,
  90-135 GFLOP/s against 48-95 for ``F.linear``). Its result is the
  transposed view of a column-major product; the layers after it take it as
  it is (copying it into rows would cost 10-15% of the product);
- beyond that a oneDNN copy of the weight packed once at load, which beats
  ``F.linear`` (that packs on every call): 64-68 GFLOP/s against 54-60 from
  192 to 512 rows on the same host. These copies cost as much memory as the
  weights, under the same ``PACK_SHARE`` rule.

The LM head is the exception: the sampler reads its logits row by row and
they are large, so it runs on a oneDNN copy of the weight packed once (113
MB for SmolLM2) at every batch size: 27 ms for 64 rows against 37 ms for
``weight @ x.T`` plus the copy into rows (MKL's copy is no faster and twice
the size).

A platform with a faster kernel for some rows (the cpu platform's compiled
few-row product) subclasses :class:`HostLinear` and overrides ``forward``.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import psutil
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

SMALL_BATCH = 128  # without MKL's packed product: weight @ x.T up to here, oneDNN beyond
PACK_SHARE = 0.25  # of the RAM available at load, at most, for the packed copies
GEMM_ENV = "PLLM_HOST_GEMM"  # "mkl" or "onednn" skips the measurement; "auto" (default) measures
# oneDNN's copies are chosen when they take under this share of MKL's time.
# The one product understates what they gain over a whole model: on an EPYC
# held to AVX2 it measured 0.76-0.82 of MKL's time, and the throughput
# workload ran 1.31x faster on them (181.7 against 138.4 tokens/s).
ONEDNN_OVER_MKL = 0.9


def mkl_packing() -> bool:
    """Whether this torch has MKL's packed fp32 product (x86 builds)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


@functools.cache
def every_batch_packing() -> str | None:
    """The packed fp32 product that serves every batch size on this host:
    ``"mkl"`` or ``"onednn"``, or None where torch has no MKL packed product
    (oneDNN's copies then serve only batches over ``SMALL_BATCH``).

    Measured once per process (about 30 ms): one SmolLM2-sized weight
    (1536 x 576) at 32 and 256 rows on each copy, the two interleaved, the
    best of five; oneDNN's is chosen when it takes under ``ONEDNN_OVER_MKL``
    of MKL's time, so a close call keeps MKL. ``PLLM_HOST_GEMM=mkl`` or
    ``onednn`` chooses without measuring."""
    forced = os.environ.get(GEMM_ENV, "auto").strip().lower() or "auto"
    if forced not in ("auto", "mkl", "onednn"):
        raise ValueError(f"{GEMM_ENV}={forced!r}: expected auto, mkl or onednn")
    if forced == "onednn":
        return "onednn"
    if not mkl_packing():
        if forced == "mkl":
            logger.warning("%s=mkl, but this torch has no MKL packed product", GEMM_ENV)
        return None
    if forced == "mkl":
        return "mkl"
    mkl_s, onednn_s = _time_packings()
    choice = "onednn" if onednn_s < ONEDNN_OVER_MKL * mkl_s else "mkl"
    logger.info("fp32 linears on %s's packed weights: a 1536x576 product at 32 + 256 rows took "
                "%.2f ms on MKL's, %.2f ms on oneDNN's (%s=mkl|onednn chooses)",
                "MKL" if choice == "mkl" else "oneDNN", 1e3 * mkl_s, 1e3 * onednn_s, GEMM_ENV)
    return choice


def _time_packings(out_features: int = 1536, in_features: int = 576, rows=(32, 256),
                   reps: int = 5) -> tuple[float, float]:
    """Seconds for one product at each of ``rows`` on MKL's and on oneDNN's
    packed copy of a random weight (the best of ``reps``, summed)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen)
    mkl = torch.ops.mkl._mkl_reorder_linear_weight(weight, SMALL_BATCH)
    onednn = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    products = (lambda x: torch.ops.mkl._mkl_linear(x, mkl, weight, None, x.shape[0]),
                lambda x: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], ""))
    totals = [0.0, 0.0]
    with torch.no_grad():
        for n in rows:
            x = torch.randn(n, in_features, generator=gen)
            best = [float("inf"), float("inf")]
            for rep in range(reps + 1):  # the first round warms up
                for i, product in enumerate(products):
                    t0 = time.perf_counter()
                    product(x)
                    if rep:
                        best[i] = min(best[i], time.perf_counter() - t0)
            totals = [t + b for t, b in zip(totals, best)]
    return totals[0], totals[1]


class HostLinear(nn.Module):
    def __init__(self, linear: nn.Linear, *, rows_out: bool = False, pack: bool = False) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows_out = rows_out  # the output must be row-major (the LM head)
        # Packed once, here: the weights are loaded by the time a platform
        # prepares the model. The copy every_batch_packing names, or the LM
        # head's oneDNN copy, serves every batch size; a oneDNN copy made
        # otherwise (no MKL in torch, or MKL's layout check failed) only
        # batches over SMALL_BATCH rows.
        self._packed = None
        self.packing: str | None = None  # which copy _packed is: "mkl" or "onednn"
        self.every_batch = False  # whether a packed copy serves every batch (not the LM head)
        if pack and not rows_out:
            choice = every_batch_packing()
            if choice == "mkl":
                self._packed = _mkl_packed(self.weight)
            elif choice == "onednn":
                self._packed = _onednn_packed(self.weight)
            self.every_batch = self._packed is not None
            self.packing = choice if self.every_batch else None
        if self._packed is None and (pack or rows_out):
            self._packed = _onednn_packed(self.weight)
            self.packing = "onednn" if self._packed is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0] if x.dim() == 2 else -1
        packed = self._packed is not None and x.dtype == self.weight.dtype == torch.float32
        if packed and rows >= 1 and self.packing == "mkl":
            # The row count as the packing's batch size: see the module's docstring.
            return torch.ops.mkl._mkl_linear(x, self._packed, self.weight, self.bias, rows)
        if packed and rows >= 1 and (self.every_batch or self.rows_out or rows > SMALL_BATCH):
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        if 1 <= rows <= SMALL_BATCH:
            out = torch.matmul(self.weight, x.t()).t()
            if self.rows_out:
                out = out.contiguous()
            return out + self.bias if self.bias is not None else out
        return F.linear(x, self.weight, self.bias)


def _mkl_packed(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.dtype != torch.float32 or not mkl_packing():
        return None
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, SMALL_BATCH)
    except RuntimeError as exc:
        logger.info("no MKL packed weight (%s); using oneDNN's", exc)
        return None
    return packed if _mkl_layout_holds(weight, packed) else None


_CHECKED_ROWS = (1, 7, 33, SMALL_BATCH + 1, 300)
_layout_checked: dict[tuple[int, int], bool] = {}


def _mkl_layout_holds(weight: torch.Tensor, packed: torch.Tensor) -> bool:
    """Whether a copy packed for SMALL_BATCH rows gives ``F.linear``'s
    products at other row counts too, checked once per weight shape."""
    shape = tuple(weight.shape)
    if shape not in _layout_checked:
        gen = torch.Generator().manual_seed(0)

        def agrees(rows: int) -> bool:
            x = torch.randn(rows, weight.shape[1], generator=gen)
            want = F.linear(x, weight)
            return torch.allclose(torch.ops.mkl._mkl_linear(x, packed, weight, None, rows), want,
                                  rtol=1e-4, atol=1e-4 * float(want.abs().max()))

        with torch.no_grad():
            ok = all(agrees(rows) for rows in _CHECKED_ROWS)  # stops at the first that fails
        if not ok:
            logger.warning("MKL's packed product of a %dx%d weight differs from F.linear at "
                           "other batch sizes than it was packed for: using oneDNN's copies",
                           *shape)
        _layout_checked[shape] = ok
    return _layout_checked[shape]


def _onednn_packed(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.dtype != torch.float32:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    except (RuntimeError, AttributeError) as exc:  # a torch built without oneDNN
        logger.info("no oneDNN packed weight for the LM head (%s)", exc)
        return None


def should_pack(model: nn.Module, available_bytes: int | None = None) -> bool:
    """Whether packed copies of all of ``model``'s fp32 linear weights (the
    LM head's is always made) fit in ``PACK_SHARE`` of the RAM available;
    the decision is logged either way."""
    size = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if type(m) is nn.Linear and m.weight.dtype == torch.float32)
    if size == 0:
        return False
    if available_bytes is None:
        available_bytes = psutil.virtual_memory().available
    if size <= PACK_SHARE * available_bytes:
        choice = every_batch_packing()  # measured only where copies are made
        logger.info("packing the linear weights for %s (%.0f MB) for %s",
                    "MKL" if choice == "mkl" else "oneDNN", size / 1e6,
                    "every batch" if choice else f"batches over {SMALL_BATCH} rows")
        return True
    logger.info("not packing the linear weights: %.0f MB is over %.0f%% of the %.0f MB "
                "available; larger batches use unpacked products (15-35%% slower)",
                size / 1e6, 100 * PACK_SHARE, available_bytes / 1e6)
    return False


def use_host_linears(model: nn.Module, cls: type[HostLinear] = HostLinear, *,
                     pack: bool | None = None) -> nn.Module:
    """Replace every nn.Linear in ``model`` (in place) with a ``cls`` sharing
    its parameters; the LM head's output stays row-major. ``pack``: give
    each a packed copy (see ``every_batch_packing``; default: ``should_pack``)."""
    if pack is None:
        pack = should_pack(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                head = f"{name}.{child_name}".lstrip(".") == "lm_head"
                setattr(module, child_name, cls(child, rows_out=head, pack=pack))
    return model
