"""Speculative decoding: proposers, and the walk that turns a verified
step's per-position verdicts into the tokens a sequence keeps.

A decoding sequence with drafts ``d1..dk`` is scheduled with ``1 + k`` new
tokens: its last sampled token and the drafts, at consecutive positions, a
short causal chunk against its cached context, which every attention
backend already computes. The logits at those ``1 + k`` positions are the
target model's distributions for the tokens after each; the sampler's
``verify`` accepts draft ``j`` with probability ``min(1, p_j(d_j) /
q_j(d_j))`` (an n-gram draft, or a draft model's argmax for a greedy
request, is a point mass, ``q = 1``: ``p_j(d_j)``; a draft model's draw for
a sampled request has its ``q``) and otherwise draws the replacement from
the normalised residual ``max(0, p_j - q_j)``; when every draft is
accepted the last position gives a bonus token.
The output distribution is the target's own, whatever the drafts (Leviathan
et al., 2023; Chen et al., 2023); a greedy row accepts exactly the drafts
that equal its argmax.

Proposers: :class:`NgramProposer` (prompt lookup, on the host, in the
scheduler) and :class:`DraftModelProposer` (placeholders the draft model
fills in the step, on the workers: ``pllm.core.draft``).

Every decoding sequence may speculate. Penalties and ``min_tokens`` apply
per position: the row that scores the token after draft ``j`` counts
drafts ``1..j`` as output (``SamplingMetadata.build(ahead=...)``), which is
the context that position has if they are accepted, and the only one in
which its verdict is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pllm.core.config import SpeculativeConfig
from pllm.core.request import Sequence


def ngram_propose(token_ids: list[int] | np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Prompt lookup: for ``n`` from ``max_n`` down to ``min_n``, the last
    ``n`` tokens are looked for earlier in ``token_ids``; the (up to) ``k``
    tokens that followed a match are the drafts: the latest match with ``k``
    tokens after it, else the earliest (the longest continuation). No match:
    no drafts."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        pattern = tokens[size - n:]
        # Every window of n tokens that starts before the suffix itself.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: size - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if len(hits):
            full = hits[hits + n + k <= size]
            start = int(full[-1] if len(full) else hits[0]) + n
            return tokens[start: start + k].tolist()
    return []


def can_speculate(seq: Sequence) -> bool:
    """Whether the sequence is decoding: its prompt computed (a request's
    first token, where ``n > 1`` forks, is never speculated)."""
    return seq.num_computed_tokens >= seq.num_prompt_tokens


class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max
        self.disable_by_batch_size = config.disable_by_batch_size

    def propose(self, seq: Sequence, max_drafts: int) -> list[int]:
        """Up to ``min(k, max_drafts)`` drafts for the tokens after ``seq``'s last."""
        k = min(self.k, max_drafts)
        if k <= 0:
            return []
        return ngram_propose(seq.token_ids, self.min_n, self.max_n, k)


# A draft the draft model has yet to propose (a ScheduledSeq's placeholder).
DRAFT_PENDING = -1


class DraftModelProposer:
    """The scheduler's side of the draft_model method: every decoding
    sequence gets ``k`` lookahead slots (fewer near its limits) and as many
    placeholders; the draft model proposes the tokens inside the step, on
    the workers, before the verify pass (``pllm.core.draft``)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.disable_by_batch_size = config.disable_by_batch_size

    def propose(self, seq: Sequence, max_drafts: int) -> list[int]:
        return [DRAFT_PENDING] * max(min(self.k, max_drafts), 0)


def make_proposer(config: SpeculativeConfig | None):
    if config is None:
        return None
    if config.method == "ngram":
        return NgramProposer(config)
    if config.method == "draft_model":
        return DraftModelProposer(config)
    raise ValueError(f"no proposer for speculative method {config.method!r}")


@dataclass
class SpecDecodeStats:
    """Counters since the engine started (the /metrics figures)."""

    num_steps: int = 0  # steps in which some sequence carried drafts
    num_proposals: int = 0  # sequences that carried drafts, summed over steps
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0  # by sequences with drafts: accepted + one more each

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a sequence with drafts gains per step (1 without speculation)."""
        return self.num_emitted_tokens / self.num_proposals if self.num_proposals else 0.0


def accepted_tokens(drafts: list[int], accepted: list[bool], alternatives: list[int]) -> list[int]:
    """The tokens a sequence keeps: its drafts up to the first rejected one,
    then that position's alternative (the replacement drawn from the
    residual, or with every draft accepted the bonus token after them).
    ``accepted`` has one verdict per draft, ``alternatives`` one token per
    position (``len(drafts) + 1``)."""
    out = []
    for draft, ok, alt in zip(drafts, accepted, alternatives):
        if not ok:
            out.append(alt)
            return out
        out.append(draft)
    out.append(alternatives[len(drafts)])
    return out
