"""pllm: LLM inference and serving with PagedAttention on pluggable hardware."""

from pllm.core.outputs import (
    BeamSearchOutput,
    BeamSearchSequence,
    CompletionOutput,
    RequestOutput,
)
from pllm.core.sampling_params import BeamSearchParams, SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "BeamSearchParams",
           "BeamSearchOutput", "BeamSearchSequence", "__version__"]


def __getattr__(name: str):
    # LLM pulls in the model stack; import it on first use so that
    # `import pllm` (and plugin discovery) stays cheap.
    if name == "LLM":
        from pllm.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'pllm' has no attribute {name!r}")
