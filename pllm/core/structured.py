"""Structured outputs: a request's tokens held to a grammar (xgrammar).

A request with ``SamplingParams.structured_outputs`` has its grammar
compiled on a worker thread when it arrives (cached by its text, so a
schema sent again compiles once); it waits in the queue until the grammar
is ready while the batch goes on. Each of its sequences then carries a
matcher (``Sequence.matcher``): before sampling, the runner (where sampling
happens: rank 0) asks each matcher for the tokens it allows, as one bitmask
for the step's constrained rows, and masks the logits on the device; after
sampling, the scheduler advances the matcher with the token kept, and a
matcher that reaches the grammar's end finishes its sequence with ``stop``.
A preempted sequence keeps its tokens and so its matcher's state.
Constrained sequences do not speculate.
"""

from __future__ import annotations

import collections
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pllm.core.sampling_params import SamplingParamsError, StructuredOutputsParams

# The most whitespace characters JSON output may have in one place.
MAX_JSON_WHITESPACE = 16


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise SamplingParamsError(
            "structured outputs need xgrammar: pip install 'pllm[structured]'",
            "structured_outputs") from None
    return xgrammar


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string literals are EBNF string literals (the same escapes); the
    # characters themselves, not \u escapes (xgrammar would read a surrogate
    # pair as two code points).
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def check(params: StructuredOutputsParams) -> None:
    """Parse the grammar (no tokenizer needed, fast): what a request gets
    wrong is a ``SamplingParamsError`` naming the problem."""
    xgr = _xgrammar()
    kind, text, _ = params.key
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(text)
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(text)
    except Exception as exc:  # noqa: BLE001 - xgrammar raises several kinds
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SamplingParamsError(f"structured_outputs: invalid {kind}: {message}",
                                  "structured_outputs") from None


class GrammarCache:
    """Compiles grammars for one tokenizer on a worker thread; the same
    grammar (kind and text) is compiled once while it stays among the last
    ``size`` asked for."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, size: int = 256) -> None:
        xgr = _xgrammar()
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))
        # pllm caches the compiled grammars itself (bounded): xgrammar's own
        # cache would keep every one ever compiled.
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self.vocab_size = vocab_size
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="pllm-grammar")
        self.futures: collections.OrderedDict = collections.OrderedDict()
        self.size = size
        self.lock = threading.Lock()

    def get(self, params: StructuredOutputsParams) -> Future:
        key = params.key
        with self.lock:
            future = self.futures.get(key)
            if future is None:
                future = self.pool.submit(self._compile, *key)
                self.futures[key] = future
                while len(self.futures) > self.size:
                    self.futures.popitem(last=False)
            else:
                self.futures.move_to_end(key)
            return future

    def _compile(self, kind: str, text: str, compact: bool):
        c = self.compiler
        # JSON's free whitespace is bounded: a small model can otherwise
        # emit newlines until max_tokens between two tokens of a valid object.
        whitespace = {"any_whitespace": False} if compact else {
            "any_whitespace": True, "max_whitespace_cnt": MAX_JSON_WHITESPACE}
        if kind == "json":
            return c.compile_json_schema(text, **whitespace)
        if kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', **whitespace)
        if kind == "choice":
            return c.compile_grammar(_choice_ebnf(json.loads(text)))
        if kind == "regex":
            return c.compile_regex(text)
        return c.compile_grammar(text)

    def matcher(self, compiled):
        return _xgrammar().GrammarMatcher(compiled)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def allowed_mask(matchers: list, vocab_size: int, device: torch.device) -> torch.Tensor:
    """``[len(matchers), vocab_size]`` bool on ``device``: the tokens each
    matcher allows next. Filled on the host as xgrammar's packed bitmask
    (32 tokens per int32), unpacked on the device."""
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
    for row, matcher in enumerate(matchers):
        matcher.fill_next_token_bitmask(bitmask, row)
    bits = bitmask.to(device)
    shifts = torch.arange(32, device=device, dtype=bits.dtype)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1
    return unpacked.reshape(len(matchers), -1)[:, :vocab_size].bool()


def constrain(logits: torch.Tensor, seqs: list) -> torch.Tensor:
    """``logits`` (one row per sequence of ``seqs``) with every token a
    row's matcher forbids at -inf; the same tensor when no row has one."""
    rows = [i for i, seq in enumerate(seqs) if seq.matcher is not None]
    if not rows:
        return logits
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    allowed = allowed_mask([seqs[i].matcher for i in rows], logits.shape[1], logits.device)
    sub = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, index, sub)
