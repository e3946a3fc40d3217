"""Prometheus metrics of the server, in a registry of its own (vLLM's names, ``pllm:`` prefix).

The engine thread feeds them (``EngineObserver``); prometheus-client is
thread-safe, and ``/metrics`` renders the registry from the event loop.
Latencies are measured with the server's monotonic clock, from the moment a
request was handed to the engine loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from pllm.core.outputs import RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


@dataclass
class _Tracked:
    arrival: float
    num_tokens: int = 0
    last_token_time: float = 0.0


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        reg = self.registry

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, labels, registry=reg).labels(model_name)

        self.num_running = gauge("pllm:num_requests_running", "Requests in the running batch.")
        self.num_waiting = gauge("pllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("pllm:kv_cache_usage_perc",
                                    "Fraction of KV-cache blocks in use (1 = full).")
        self.prefix_hit_rate = gauge("pllm:prefix_cache_hit_rate",
                                     "Prefix-cache hits / queries, in tokens, since start.")
        self.num_free_blocks = gauge("pllm:num_free_blocks", "Free KV-cache blocks.")
        self.num_preemptions = gauge("pllm:num_preemptions", "Preemptions since start.")
        # Speculative decoding (--speculative-config), since start; zeros when off.
        self.spec_steps = gauge("pllm:spec_decode_num_steps",
                                "Steps in which some sequence carried draft tokens.")
        self.spec_drafts = gauge("pllm:spec_decode_num_drafts",
                                 "Proposals: sequences that carried drafts, summed over steps.")
        self.spec_draft_tokens = gauge("pllm:spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.spec_accepted_tokens = gauge("pllm:spec_decode_num_accepted_tokens",
                                          "Draft tokens accepted.")
        self.spec_acceptance_rate = gauge("pllm:spec_decode_acceptance_rate",
                                          "Accepted / proposed draft tokens.")
        self.spec_mean_accepted_length = gauge(
            "pllm:spec_decode_mean_accepted_length",
            "Tokens a sequence with drafts gained per step (accepted drafts + 1).")
        self.ttft = Histogram("pllm:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=reg).labels(model_name)
        self.itl = Histogram("pllm:inter_token_latency_seconds",
                             "Time between two steps that gave a request new tokens.",
                             labels, buckets=_ITL_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram("pllm:e2e_request_latency_seconds", "End-to-end request latency.",
                             labels, buckets=_LATENCY_BUCKETS, registry=reg).labels(model_name)
        self.prompt_tokens = Counter("pllm:prompt_tokens", "Prompt tokens processed.",
                                     labels, registry=reg).labels(model_name)
        self.generation_tokens = Counter("pllm:generation_tokens", "Tokens generated.",
                                         labels, registry=reg).labels(model_name)
        self._finished = Counter("pllm:request_finished", "Requests finished, by reason.",
                                 labels + ["finished_reason"], registry=reg)
        self._model_name = model_name
        for reason in ("stop", "length", "abort"):
            self._finished.labels(model_name, reason)  # export zeros from the start
        self._tracked: dict[str, _Tracked] = {}  # engine thread only

    # ------------------------------------------------------------ EngineObserver

    def on_add(self, request_id: str, arrival: float) -> None:
        self._tracked[request_id] = _Tracked(arrival=arrival)

    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            t = self._tracked.get(out.request_id)
            if t is None:
                continue
            num_tokens = sum(len(c.token_ids) for c in out.outputs)
            new = num_tokens - t.num_tokens
            if new > 0:
                if t.num_tokens == 0:
                    self.prompt_tokens.inc(len(out.prompt_token_ids))
                    self.ttft.observe(now - t.arrival)
                else:
                    self.itl.observe(now - t.last_token_time)
                self.generation_tokens.inc(new)
                t.num_tokens, t.last_token_time = num_tokens, now
            if out.finished:
                self.e2e.observe(now - t.arrival)
                self._finished.labels(self._model_name, _request_reason(out)).inc()
                del self._tracked[out.request_id]

    def on_abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if self._tracked.pop(rid, None) is not None:
                self._finished.labels(self._model_name, "abort").inc()

    def on_stats(self, stats: Any) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.num_free_blocks.set(stats.num_free_blocks)
        self.num_preemptions.set(stats.num_preemptions)
        queries = stats.prefix_cache_queries
        self.prefix_hit_rate.set(stats.prefix_cache_hits / queries if queries else 0.0)
        spec = getattr(stats, "spec_decode", None)
        if spec is not None:
            self.spec_steps.set(spec.num_steps)
            self.spec_drafts.set(spec.num_proposals)
            self.spec_draft_tokens.set(spec.num_draft_tokens)
            self.spec_accepted_tokens.set(spec.num_accepted_tokens)
            self.spec_acceptance_rate.set(spec.acceptance_rate)
            self.spec_mean_accepted_length.set(spec.mean_accepted_length)

    # ------------------------------------------------------------ exposition

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _request_reason(out: RequestOutput) -> str:
    """One reason per request: abort, else length if any choice ran out, else stop."""
    reasons = {c.finish_reason for c in out.outputs}
    for reason in ("abort", "length"):
        if reason in reasons:
            return reason
    return "stop"
