"""Whether a sequence is done after its newest token: pure functions of the
sequence, for the scheduler (the one writer of ``status``) to act on."""

from __future__ import annotations

from pllm.core.detokenizer import find_stop_string
from pllm.core.request import Sequence, SequenceStatus


def token_stop(seq: Sequence, token: int) -> tuple[SequenceStatus, int | None] | None:
    """A stop token id or EOS just sampled: ``(FINISHED_STOPPED, stop_reason)``."""
    params, req = seq.request.params, seq.request
    if token in params.stop_token_ids:
        return SequenceStatus.FINISHED_STOPPED, token
    if token in req.eos_token_ids and not params.ignore_eos:
        return SequenceStatus.FINISHED_STOPPED, None
    return None


def text_stop(seq: Sequence, delta: str) -> tuple[SequenceStatus, str] | None:
    """A stop string completed by the newest text (once ``min_tokens`` are out)."""
    if seq.num_output_tokens < seq.request.params.min_tokens:
        return None
    stop = find_stop_string(seq, delta)
    return None if stop is None else (SequenceStatus.FINISHED_STOPPED, stop)


def length_stop(seq: Sequence, max_model_len: int) -> SequenceStatus | None:
    """``max_tokens`` reached, or the context is full."""
    max_tokens = seq.request.params.max_tokens
    if (max_tokens is not None and seq.num_output_tokens >= max_tokens) or seq.num_tokens >= max_model_len:
        return SequenceStatus.FINISHED_LENGTH
    return None
