"""The figures a run reports, computed the same way for pllm and for every baseline."""

from __future__ import annotations

import statistics


def throughput_figures(elapsed_s: float, *, num_requests: int, num_prompt_tokens: int,
                       num_useful_tokens: int, num_generated_tokens: int) -> dict:
    """Useful tokens are those a request asked for; ``num_generated_tokens``
    also counts padding rows and tokens past a request's own length."""
    return {
        "elapsed_s": elapsed_s,
        "num_requests": num_requests,
        "num_prompt_tokens": num_prompt_tokens,
        "num_useful_output_tokens": num_useful_tokens,
        "num_generated_tokens": num_generated_tokens,
        "useful_output_tokens_per_s": num_useful_tokens / elapsed_s,
        "total_tokens_per_s": (num_prompt_tokens + num_useful_tokens) / elapsed_s,
        "requests_per_s": num_requests / elapsed_s,
    }


def latency_figures(runs: list[tuple[float, list[float]]]) -> dict:
    """``runs``: (start, per-token timestamps) of each timed request; medians over runs.

    TTFT is start to first token; decode speed is the tokens after the first
    over the time after the first, so it excludes the prefill.
    """
    ttft, decode_tps, tpot, e2e, num_tokens = [], [], [], [], []
    for start, stamps in runs:
        if len(stamps) < 2:
            raise ValueError("a latency run needs at least 2 output tokens")
        decode_s = stamps[-1] - stamps[0]
        ttft.append(stamps[0] - start)
        tpot.append(decode_s / (len(stamps) - 1))
        decode_tps.append((len(stamps) - 1) / decode_s)
        e2e.append(stamps[-1] - start)
        num_tokens.append(len(stamps))
    med = statistics.median
    return {
        "num_iters": len(runs),
        "num_output_tokens": num_tokens[0],
        "ttft_s": med(ttft),
        "decode_tokens_per_s": 1 / med(tpot),  # of the median run, so the two always agree
        "time_per_output_token_s": med(tpot),
        "e2e_latency_s": med(e2e),
        "ttft_s_all": ttft,
        "decode_tokens_per_s_all": decode_tps,
    }


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
