"""Differences between the transformers releases pllm supports (4.50 on)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def _takes_dtype() -> bool:
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return (major, minor) >= (4, 56)  # ``dtype=`` replaced ``torch_dtype=`` in 4.56


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument under this transformers release:
    ``dtype=`` from 4.56, ``torch_dtype=`` before (an environment pinned to
    an older release, such as IPEX 2.8's)."""
    return {"dtype": dtype} if _takes_dtype() else {"torch_dtype": dtype}
