"""Pallas TPU kernels run by jax's interpreter on the host, so that they can
be checked against pllm's reference attention without a TPU.

* :func:`interpreted_ragged_kernel`: the ragged paged-attention kernel that
  torch-xla bundles (``torch_xla/experimental/pallas_kernels/
  ragged_paged_attention_v2.py``, the one ``--device tpu`` runs), with
  ``interpret=True``, behind the same signature the TPU platform calls
  (``pllm.platforms.common.xla.pallas.RaggedKernel``), on host tensors.
* :func:`jax_decode_attention`: jax's own decode ``paged_attention`` in TPU
  interpret mode (``pltpu.force_tpu_interpret_mode``), on a pllm XLA cache.

torch-xla 2.9 bundles a kernel written for jax 0.7 (its ``pallas`` extra pins
jax 0.7.1), but jax 0.7's generic interpreter cannot discharge the kernel's
main loop (it reads kernel state in a ``while_loop`` condition:
``NotImplementedError`` in ``_while_partial_discharge_rule``). jax 0.10's
can. Between the two, four names the kernel uses were renamed or removed;
:func:`_compat_module` loads the kernel with them mapped to their jax 0.10
spellings (``pltpu.TPUCompilerParams`` -> ``CompilerParams``, ``pltpu.ANY``
-> ``pl.ANY``, ``dtypes.bit_width`` -> ``itemsize_bits``, and the masked
``pl.store`` as a ``jnp.where`` into the ref) and ``interpret=True`` on its
``pallas_call``. Nothing else of the kernel changes.

Imports jax and finds torch_xla's kernel file lazily; importing this module
needs neither.
"""

from __future__ import annotations

import functools
import importlib.util
import types

import torch

from pllm.core.interfaces import AttentionMetadata

KERNEL_MODULE = "torch_xla.experimental.pallas_kernels.ragged_paged_attention_v2"


def kernel_source() -> str | None:
    """The path of torch-xla's bundled ragged kernel, or None (not installed)."""
    try:
        spec = importlib.util.find_spec(KERNEL_MODULE)
    except ModuleNotFoundError:
        return None
    return spec.origin if spec is not None else None


@functools.cache
def _compat_module() -> types.ModuleType:
    import jax.numpy as jnp
    from jax._src import dtypes
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    source = kernel_source()
    if source is None:
        raise ImportError(f"{KERNEL_MODULE} not found: install torch_xla")
    if not hasattr(dtypes, "bit_width"):
        dtypes.bit_width = dtypes.itemsize_bits

    def store(ref, idx, val, mask=None):
        ref[idx] = val if mask is None else jnp.where(mask, val, ref[idx])

    spec = importlib.util.spec_from_file_location("pllm_interpreted_ragged_kernel", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.pl = _Forward(pl, pallas_call=functools.partial(pl.pallas_call, interpret=True),
                         store=getattr(pl, "store", store))
    module.pltpu = _Forward(pltpu, ANY=getattr(pltpu, "ANY", None) or pl.ANY,
                            TPUCompilerParams=getattr(pltpu, "TPUCompilerParams", None)
                            or pltpu.CompilerParams)
    return module


class _Forward:
    """A module with a few attributes replaced."""

    def __init__(self, module: types.ModuleType, **overrides) -> None:
        self._module, self._overrides = module, overrides

    def __getattr__(self, name: str):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._module, name)


def _to_jax(tensor: torch.Tensor):
    """A host copy for jax (bf16 by way of fp32: numpy has no bf16)."""
    import jax.numpy as jnp

    if tensor.dtype == torch.bfloat16:
        return jnp.asarray(tensor.detach().float().cpu().numpy(), dtype=jnp.bfloat16)
    return jnp.asarray(tensor.detach().cpu().numpy())


def _to_torch(array) -> torch.Tensor:
    import jax.numpy as jnp
    import numpy as np

    if array.dtype == jnp.bfloat16:
        return torch.from_numpy(np.array(array.astype(jnp.float32))).to(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def interpreted_ragged_kernel(num_kv_pages_per_block: int = 2, num_queries_per_block: int = 8):
    """torch-xla's ragged paged-attention kernel under jax's interpreter, as a
    ``RaggedKernel`` on host tensors. The tile sizes are given (the kernel
    otherwise asks the TPU for its version to look them up)."""
    module = _compat_module()

    def kernel(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
               sliding_window=None, soft_cap=None):
        out = module.ragged_paged_attention(
            _to_jax(q), _to_jax(kv_pages), _to_jax(kv_lens), _to_jax(page_indices),
            _to_jax(cu_q_lens), _to_jax(num_seqs), sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap,
            num_kv_pages_per_block=min(num_kv_pages_per_block, page_indices.shape[1]),
            num_queries_per_block=num_queries_per_block)
        return _to_torch(out)

    return kernel


def jax_decode_attention(query: torch.Tensor, kv_pages: torch.Tensor,
                         metadata: AttentionMetadata, *, scale: float,
                         pages_per_compute_block: int = 1) -> torch.Tensor:
    """jax's decode ``paged_attention`` (one query token per sequence) in TPU
    interpret mode, reading the pages of an XLA-layout cache (``kv_pages``
    ``[pages, page_size, 2 * kv_heads, d]``, K/V interleaved: the tpu
    platform's cache seen as pages), which it wants as separate
    ``[kv_heads, pages, page_size, d]`` K and V. It takes queries unscaled by
    anything but what it is given: ``scale`` is applied to them first."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    k_pages = kv_pages[:, :, 0::2].permute(2, 0, 1, 3).contiguous()
    v_pages = kv_pages[:, :, 1::2].permute(2, 0, 1, 3).contiguous()
    with pltpu.force_tpu_interpret_mode():
        out = paged_attention(_to_jax(query * scale), _to_jax(k_pages), _to_jax(v_pages),
                              _to_jax(metadata.seq_lens.to(torch.int32)),
                              _to_jax(metadata.block_tables.to(torch.int32)),
                              pages_per_compute_block=pages_per_compute_block)
    return _to_torch(out)
