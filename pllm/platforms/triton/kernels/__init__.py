"""Triton kernels for PagedAttention on GPUs (CUDA and ROCm share them).

Every kernel reads and writes the cache layout the CPU reference uses::

    kv_cache[0 = K | 1 = V, block, offset_in_block, kv_head, head_dim]

Modules (import them directly; this package imports nothing, so
``selfcheck`` can be loaded without importing triton):

    cache.py      reshape_and_cache (write K/V by slot), copy_blocks
    prefill.py    varlen causal attention over prefill chunks + cached context
    decode.py     split-KV decode (flash-decoding) and its reduce kernel
    common.py     the K/V tile gather and online-softmax step both share
    selfcheck.py  the cases every test and the GPU check run against the reference

The kernels also run under ``TRITON_INTERPRET=1`` with CPU tensors, which is
how they are tested on machines without a GPU.
"""
