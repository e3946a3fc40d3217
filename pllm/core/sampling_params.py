"""vLLM-compatible sampling parameters."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

# The integer ranges the sampler's int64 tensors (and seeds' uint64) can hold.
INT64_MAX = 2**63 - 1
_SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's names): exactly one of ``json``
    (a JSON schema, as a dict or its text), ``json_object`` (any JSON
    object), ``regex``, ``choice`` (one of these strings) or ``grammar`` (an
    EBNF grammar, xgrammar's dialect of GBNF). ``disable_any_whitespace``:
    JSON without free whitespace between its tokens (a small model cannot
    then ramble in spaces)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise SamplingParamsError(
                "structured_outputs needs exactly one of json, json_object, regex, choice and "
                f"grammar; got {', '.join(given) or 'none'}", "structured_outputs")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise SamplingParamsError("structured_outputs.json must be a JSON schema (an object "
                                      "or its text)", "structured_outputs")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise SamplingParamsError(f"structured_outputs.{name} must be non-empty text",
                                          "structured_outputs")
        if self.choice is not None and (
                not isinstance(self.choice, (list, tuple)) or not self.choice
                or not all(isinstance(c, str) and c for c in self.choice)):
            raise SamplingParamsError("structured_outputs.choice must be a list of non-empty "
                                      "strings", "structured_outputs")

    @property
    def key(self) -> tuple[str, str, bool]:
        """What identifies the grammar (its cache key): the kind and its text."""
        import json

        if self.json is not None:
            # Key order kept: the output's keys follow the schema's properties.
            text = self.json if isinstance(self.json, str) else json.dumps(self.json)
            return "json", text, self.disable_any_whitespace
        if self.json_object:
            return "json_object", "", self.disable_any_whitespace
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice)), False
        if self.regex is not None:
            return "regex", self.regex, False
        return "grammar", self.grammar, False


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's beam search (``LLM.beam_search``): ``beam_width`` beams; at
    each step every beam proposes its ``2 * beam_width`` most likely next
    tokens, a proposal of EOS (unless ``ignore_eos``) ends a hypothesis, and
    the best ``beam_width`` of the others go on. Hypotheses are ranked by
    ``cumulative_logprob / length ** length_penalty``, the length counting
    the prompt and not a final EOS (vLLM's ``get_beam_search_score``); after
    ``max_tokens`` steps the best ``beam_width`` are returned.
    ``temperature`` above 0 adds a sampled token to each beam's proposals."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
                    or not 1 <= value <= INT64_MAX // 2:
                raise SamplingParamsError(f"{name} must be an integer >= 1, got {value!r}", name)
        for name, low in (("temperature", 0), ("length_penalty", -math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value) or value < low:
                bound = " >= 0" if low == 0 else ""
                raise SamplingParamsError(f"{name} must be a finite number{bound}, got {value!r}",
                                          name)

    def to_sampling_params(self) -> SamplingParams:
        """What one beam's step samples with: its proposals are the logprobs
        entry of the step (the top ``2 * beam_width`` of the raw logits, and
        the sampled token)."""
        return SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens,
                              ignore_eos=self.ignore_eos, logprobs=2 * self.beam_width,
                              beam_search=self)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (plus the chosen one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    # Added to a token's logit before sampling (OpenAI's logit_bias): token
    # id -> a bias in [-100, 100]; -100 bans the token, 100 all but forces it.
    logit_bias: dict[int, float] | None = None
    # Run the request as a beam search (made by BeamSearchParams.to_sampling_params,
    # whose fields above describe one beam's step).
    beam_search: BeamSearchParams | None = None
    stop_strings: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as exc:
                raise SamplingParamsError(f"structured_outputs: {exc}", "structured_outputs") from None
        self._validate()

    def _validate(self) -> None:
        self._check_types()
        checks = [
            (self.n >= 1, "n", f"n must be >= 1, got {self.n}"),
            (self.temperature >= 0, "temperature", f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, "top_k", f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}"),
            (0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty",
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty",
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0, "repetition_penalty",
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
             f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, "min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs",
             f"logprobs must be >= 0, got {self.logprobs}"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs",
             f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}"),
            (all(s for s in self.stop_strings), "stop", "stop strings must not be empty"),
            (self.seed is None or _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1], "seed",
             f"seed must be in [{_SEED_RANGE[0]}, {_SEED_RANGE[1]}], got {self.seed}"),
            (all(0 <= t <= INT64_MAX for t in self.stop_token_ids), "stop_token_ids",
             "stop_token_ids must be token ids (>= 0)"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise SamplingParamsError(message, param)
        for name in ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > INT64_MAX:
                raise SamplingParamsError(f"{name} must be <= {INT64_MAX}, got {value}", name)
        if self.beam_search is not None:
            self._check_beam_search()

    def _check_beam_search(self) -> None:
        """What beam search cannot be combined with: its beams are ranked by
        the model's own logprobs and end only at EOS or max_tokens."""
        beam = self.beam_search
        if not isinstance(beam, BeamSearchParams):
            raise SamplingParamsError(f"beam_search must be BeamSearchParams, got "
                                      f"{type(beam).__name__}", "beam_search")
        checks = [
            (self.n == 1, "n", f"beam search returns its beam_width ({beam.beam_width}) best "
                               f"sequences; n (and best_of) must be 1, got {self.n}"),
            (self.structured_outputs is None, "structured_outputs",
             "structured outputs cannot constrain a beam search"),
            (not self.has_penalties and not self.logit_bias and self.min_tokens == 0,
             "beam_search", "beam search ranks the model's own logprobs: penalties, logit_bias "
                            "and min_tokens cannot be used with it"),
            (not self.stop_strings and not self.stop_token_ids, "stop",
             "beam search stops only at EOS or max_tokens: stop and stop_token_ids cannot be "
             "used with it"),
            ((self.logprobs, self.max_tokens, self.temperature, self.ignore_eos)
             == (2 * beam.beam_width, beam.max_tokens, beam.temperature, beam.ignore_eos),
             "beam_search", "a beam search's SamplingParams are made by "
                            "BeamSearchParams.to_sampling_params()"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise SamplingParamsError(message, param)

    def _check_types(self) -> None:
        """Numbers that are not numbers (NaN, infinities, strings) fail here
        with the field's name, not later inside a step."""
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):
                raise SamplingParamsError(f"{name} must be a finite number, got {value!r}", name)
        for name in ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
                     "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, numbers.Integral)):
                raise SamplingParamsError(f"{name} must be an integer, got {value!r}", name)
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                   for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids must be integers", "stop_token_ids")
        for token, bias in (self.logit_bias or {}).items():
            if isinstance(token, bool) or not isinstance(token, numbers.Integral) \
                    or not 0 <= token <= INT64_MAX:
                raise SamplingParamsError(f"logit_bias: {token!r} is not a token id",
                                          "logit_bias")
            if isinstance(bias, bool) or not isinstance(bias, numbers.Real) \
                    or not -100 <= bias <= 100:
                raise SamplingParamsError(f"logit_bias: the bias of token {token} must be a "
                                          f"number in [-100, 100], got {bias!r}", "logit_bias")

    def check_against_model(self, vocab_size: int) -> None:
        """What only the model can tell: token ids inside its vocabulary."""
        if self.beam_search is not None and self.logprobs > vocab_size:
            raise SamplingParamsError(
                f"beam_width must be <= half the vocabulary size {vocab_size}, got "
                f"{self.beam_search.beam_width}", "beam_width")
        bad = [t for t in self.logit_bias or {} if t >= vocab_size]
        if bad:
            raise SamplingParamsError(
                f"logit_bias: {bad[0]} is not a token id of this model (vocabulary of "
                f"{vocab_size})", "logit_bias")
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise SamplingParamsError(
                f"stop_token_ids: {bad[0]} is not a token id of this model (vocabulary of "
                f"{vocab_size})", "stop_token_ids")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > vocab_size:
                raise SamplingParamsError(
                    f"{name} must be <= the vocabulary size {vocab_size}, got {value}", name)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1.0)


class SamplingParamsError(ValueError):
    """A bad sampling parameter; ``param`` names the field (for OpenAI errors)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param
