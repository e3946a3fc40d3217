"""Incremental detokenization and stop strings.

Decoding one token at a time is wrong for byte-level BPE (a multi-byte
character spans tokens) and for sentencepiece (a word's leading space depends
on the previous token). So each step decodes a short window that starts a few
tokens back, and emits only the new characters, holding text back while it
ends in an incomplete UTF-8 sequence (U+FFFD).

Text that could still become a stop string is held back too, so streamed text
is always a prefix of the final text and a matched stop string never leaks.
"""

from __future__ import annotations

from pllm.core.outputs import LogprobsDict
from pllm.core.request import Sequence

_CONTEXT_TOKENS = 5


class Detokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def start(self, seq: Sequence) -> None:
        seq.prefix_offset = max(seq.num_prompt_tokens - _CONTEXT_TOKENS, 0)
        seq.read_offset = seq.num_prompt_tokens

    def decode_logprobs(self, entry: LogprobsDict) -> None:
        """Give each candidate of a logprobs entry its text."""
        for tid, lp in entry.items():
            lp.decoded_token = self.tokenizer.decode([tid])

    def step(self, seq: Sequence) -> str:
        """Append the newest token's text to ``seq.text``; return the new text."""
        skip = seq.request.params.skip_special_tokens
        ids = seq.token_ids
        prefix = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset],
                                       skip_special_tokens=skip)
        full = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        seq.text += delta
        return delta


def find_stop_string(seq: Sequence, delta: str) -> str | None:
    """If a stop string appears in the newly extended text, cut the text there
    (keeping the stop string only when asked) and return it."""
    params = seq.request.params
    if not params.stop_strings or not delta:
        return None
    best = None
    for stop in params.stop_strings:
        start = max(len(seq.text) - len(delta) - len(stop) + 1, 0)
        idx = seq.text.find(stop, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    if best is None:
        return None
    idx, stop = best
    seq.text = seq.text[: idx + len(stop)] if params.include_stop_str_in_output else seq.text[:idx]
    return stop


def visible_text(seq: Sequence) -> str:
    """The text safe to show now: while unfinished, the tail that could be
    the start of a stop string is held back."""
    params = seq.request.params
    if seq.is_finished or not params.stop_strings or params.include_stop_str_in_output:
        return seq.text
    hold = max(len(s) for s in params.stop_strings) - 1
    return seq.text[: max(len(seq.text) - hold, 0)] if hold else seq.text
