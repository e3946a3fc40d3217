"""The one place intel_extension_for_pytorch is imported (lazily: detection
never imports it, and an engine imports it once this platform was chosen)."""

from __future__ import annotations

import functools


@functools.cache
def ipex():
    """The ``intel_extension_for_pytorch`` module, imported once."""
    import intel_extension_for_pytorch as module

    return module
