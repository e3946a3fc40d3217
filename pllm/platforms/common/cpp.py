"""Building a plugin's C++ kernels on first use: torch's C++ extension loader
(g++ and ninja), cached under ``$TORCH_EXTENSIONS_DIR``
(``~/.cache/torch_extensions``) by the sources' hash, in a folder named for
the torch release too: a build against one torch does not load into another
(environments pinned to other releases, such as IPEX's or torch-xla's, share
the cache folder)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def build_extension(name: str, csrc: Path, sources: Iterable[str], functions: Iterable[str],
                    defines: Iterable[str] = ()):
    """Compile ``sources`` (file names under ``csrc``, in order, as one
    translation unit) into the extension ``name`` exposing ``functions``;
    ``defines`` are extra preprocessor macros. Raises when it cannot build
    (no compiler, no ninja): the caller decides what to fall back to."""
    import torch
    from torch.utils.cpp_extension import load_inline

    release = torch.__version__.split("+")[0].replace(".", "_")
    return load_inline(
        name=f"{name}_torch{release}",
        cpp_sources=[(csrc / source).read_text() for source in sources],
        functions=list(functions),
        # No contraction of a*b+c into FMAs beyond the explicit ones, so the
        # elementwise kernels round as torch's own ops do.
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off",
                      *(f"-D{d}" for d in defines)],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )
