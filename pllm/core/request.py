"""Request and sequence state.

A request owns one sequence until its prompt is prefilled; then, for
``n > 1``, it forks into ``n`` sequences that share the prompt's blocks
(copy-on-write). Each sequence is scheduled on its own. A beam search's
sequences are its live beams, forked and dropped at every step
(``pllm.core.beam_search``).

A sequence's progress is one number: ``num_computed_tokens`` of its
``token_ids`` have K/V in the cache. Prefill, chunked prefill, decode and
recompute after preemption are all "compute the rest, then sample once all
tokens are computed".
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from pllm.core.outputs import CompletionOutput, LogprobsDict, RequestMetrics, RequestOutput
from pllm.core.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, to be recomputed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
             SequenceStatus.FINISHED_ABORTED}
_seq_ids = itertools.count()


def sample_seed(params: SamplingParams, index: int) -> int | None:
    """The seed of sample ``index`` of a request (None when it has no seed),
    wrapped into the generators' unsigned 64 bits."""
    return None if params.seed is None else (params.seed + index * 1_000_003) % 2**64


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    seed: int | None = None  # of this sample's random stream (None: the global one)
    generator: torch.Generator | None = None  # the stream, made by the sampler on first draw
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    # Speculative decoding with a draft model: how many of token_ids have
    # K/V in the draft model's cache (at most num_computed_tokens).
    num_draft_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of full blocks, in order
    num_cached_blocks: int = 0  # leading blocks registered in the prefix cache
    # Output state.
    text: str = ""
    cumulative_logprob: float = 0.0
    logprobs: list[LogprobsDict] | None = None
    stop_reason: int | str | None = None
    prefix_offset: int = 0  # incremental detokenizer window
    read_offset: int = 0
    # Structured outputs: the grammar's matcher, advanced with each output
    # token (None: unconstrained). Made by the scheduler at admission.
    matcher: object | None = None
    # Beam search: the next tokens this beam proposes (the logprobs entry of
    # its last step), held until every beam of its request has proposed;
    # None while it has not. A beam holding them has nothing to compute.
    candidates: LogprobsDict | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def is_prefilling_prompt(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    def fork(self, index: int) -> Sequence:
        """A sibling sharing every token and block (the caller increments the
        blocks' reference counts), with its own random stream."""
        child = Sequence(
            request=self.request, index=index, token_ids=list(self.token_ids),
            num_prompt_tokens=self.num_prompt_tokens, seed=sample_seed(self.request.params, index),
            status=self.status, num_computed_tokens=self.num_computed_tokens,
            num_draft_computed=self.num_draft_computed,
            block_ids=list(self.block_ids), block_hashes=list(self.block_hashes),
            num_cached_blocks=self.num_cached_blocks, text=self.text,
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            prefix_offset=self.prefix_offset, read_offset=self.read_offset,
        )
        return child

    def completion_output(self, text: str) -> CompletionOutput:
        finish = self.status.value if self.is_finished else None
        return CompletionOutput(
            index=self.index, text=text, token_ids=list(self.output_token_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            finish_reason=finish, stop_reason=self.stop_reason,
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    arrival_time: float = field(default_factory=time.time)
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[LogprobsDict | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    forked: bool = False
    # Structured outputs: the grammar being compiled (a Future of it); its
    # sequences wait until it is ready (pllm.core.structured).
    grammar: object | None = None
    # Beam search: the hypotheses that ended with EOS so far
    # (pllm.core.beam_search.Hypothesis).
    completed_beams: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def finished(self) -> bool:
        # Before the fork there is one sequence; it can only finish by abort.
        # A beam search whose last beams all proposed only EOS has none left.
        return (bool(self.seqs) or bool(self.completed_beams)) and all(
            s.is_finished for s in self.seqs)

    def output(self, texts: list[str]) -> RequestOutput:
        ordered = sorted(self.seqs, key=lambda s: s.index)
        return self.output_of([s.completion_output(t) for s, t in zip(ordered, texts)])

    def output_of(self, outputs: list[CompletionOutput]) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids, prompt_logprobs=self.prompt_logprobs,
            outputs=outputs, finished=self.finished, metrics=self.metrics,
            num_cached_tokens=self.num_cached_tokens,
        )
