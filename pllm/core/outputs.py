"""vLLM-compatible request outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

# One position's logprobs: token id -> Logprob (the sampled token is always present).
LogprobsDict = dict[int, "Logprob"]


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[LogprobsDict] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that matched

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[LogprobsDict | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = field(default=None, repr=False)
    num_cached_tokens: int = 0
    # Set when the request failed on its own (the engine ended it and went on
    # with the others): what went wrong. Its outputs then finish with "abort".
    error: str | None = None


@dataclass
class BeamSearchSequence:
    """One hypothesis of a beam search (vLLM's): ``tokens`` the prompt's and
    the generated ones, ``cum_logprob`` the sum of the generated tokens'
    logprobs, ``logprobs`` per generated token the proposals of the step
    that chose it, ``text`` all of ``tokens`` decoded."""

    tokens: list[int]
    logprobs: list[LogprobsDict]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (it ended with EOS) | "length" | "abort"
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """A prompt's best hypotheses, best first (at most ``beam_width``)."""

    sequences: list[BeamSearchSequence]
