"""Where results go: a JSON file, a PNG beside it, and a summary on stdout."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os


def default_output_path(kind: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("bench-results", f"{kind}-{stamp}.json")


def write_json(result: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=_jsonable)
        f.write("\n")
    return path


def _jsonable(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return str(value)


def ratios(pllm_value: float, baselines: dict, key: str) -> dict:
    """pllm / baseline for each baseline that produced ``key``; None for one that failed."""
    out = {}
    for name, base in baselines.items():
        value = base.get(key)
        out[name] = pllm_value / value if value else None
    return out


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, labels: list[str], values: list[float | None], title: str, ylabel: str) -> None:
    heights = [v or 0.0 for v in values]
    colors = ["tab:blue"] + ["tab:gray"] * (len(labels) - 1)
    bars = ax.bar(labels, heights, color=colors)
    for bar, v in zip(bars, values):
        ax.annotate("failed" if v is None else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelsize=8)


def plot_throughput(result: dict, path: str) -> str:
    plt = _pyplot()
    names = ["pllm", *result["baselines"]]
    runs = [result["pllm"], *result["baselines"].values()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _bars(axes[0], names, [r.get("useful_output_tokens_per_s") for r in runs],
          "useful output tokens/s (higher is better)", "tokens/s")
    _bars(axes[1], names, [r.get("total_tokens_per_s") for r in runs],
          "prompt + output tokens/s", "tokens/s")
    w = result["workload"]
    fig.suptitle(f"throughput: {w['num_requests']} requests, prompts {w['input_len_range']}, "
                 f"outputs {w['output_len_range']} ({result['model']})", fontsize=10)
    return _save(fig, path)


def plot_latency(result: dict, path: str) -> str:
    plt = _pyplot()
    names = ["pllm", *result["baselines"]]
    runs = [result["pllm"], *result["baselines"].values()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _bars(axes[0], names, [r.get("decode_tokens_per_s") for r in runs],
          "batch-1 decode tokens/s (higher is better)", "tokens/s")
    ceiling = result.get("bandwidth", {}).get("decode_ceiling_tokens_per_s")
    tallest = max((r.get("decode_tokens_per_s") or 0.0 for r in runs), default=0.0)
    if ceiling and ceiling < 4 * tallest:  # a far-off line (a tiny model) would flatten the bars
        axes[0].axhline(ceiling, color="tab:red", linestyle="--", linewidth=1,
                        label=f"read-bandwidth limit {ceiling:.3g}")
        axes[0].legend(fontsize=8)
    elif ceiling:
        axes[0].set_xlabel(f"read-bandwidth limit: {ceiling:.3g} tokens/s", fontsize=8)
    ttft = [r.get("ttft_s") for r in runs]
    _bars(axes[1], names, [t * 1000 if t is not None else None for t in ttft],
          "time to first token (lower is better)", "ms")
    w = result["workload"]
    fig.suptitle(f"latency: {w['input_len']}-token prompt, {w['output_len']} output tokens "
                 f"({result['model']})", fontsize=10)
    return _save(fig, path)


def plot_serve(result: dict, path: str) -> str:
    plt = _pyplot()
    rows = result["per_rate"]
    labels = [str(r["request_rate"]) for r in rows]
    xs = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, metric, title in ((axes[0], "ttft", "time to first token"),
                              (axes[1], "itl", "inter-token latency"),
                              (axes[2], "e2e", "end-to-end latency")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ys = [r[f"{metric}_{q}_s"] for r in rows]
            ax.plot(xs, [y * 1000 if y is not None else float("nan") for y in ys], style, label=q)
        ax.set_xticks(xs, labels)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"serving: {result['model']} at {result['base_url']}", fontsize=10)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---------------------------------------------------------------- stdout


def _fmt(value, unit: str = "", scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.2f}{unit}"


def print_throughput(result: dict) -> None:
    p = result["pllm"]
    print(f"pllm: {_fmt(p['useful_output_tokens_per_s'])} useful output tokens/s, "
          f"{_fmt(p['total_tokens_per_s'])} prompt+output tokens/s, "
          f"{_fmt(p['requests_per_s'])} requests/s ({p['elapsed_s']:.1f}s)")
    _print_compilations(p)
    _print_baselines(result, "useful_output_tokens_per_s", "useful output tokens/s")


def _print_compilations(p: dict) -> None:
    """Static-shape platforms: what start-up compiled, and what the run added (should be 0)."""
    if "compilations_at_start" in p:
        print(f"  compiled {p['compilations_at_start']} programs at start-up "
              f"({p['compile_s_at_start']:.1f}s); {p['compilations_during_run']} more during "
              f"the run ({p['compile_s_during_run']:.1f}s)")


def print_latency(result: dict) -> None:
    p, bw = result["pllm"], result.get("bandwidth", {})
    print(f"pllm: decode {_fmt(p['decode_tokens_per_s'])} tokens/s, "
          f"TTFT {_fmt(p['ttft_s'], ' ms', 1000)}, e2e {_fmt(p['e2e_latency_s'], ' s')}")
    _print_compilations(p)
    if bw:
        print(f"  weights {bw['weight_bytes'] / 1e6:.0f} MB per decode step -> "
              f"{_fmt(bw['achieved_gb_per_s'], ' GB/s')} of a measured "
              f"{_fmt(bw['read_bandwidth_gb_per_s'], ' GB/s')} "
              f"({_fmt(bw['bandwidth_fraction'], '%', 100)}; limit "
              f"{_fmt(bw['decode_ceiling_tokens_per_s'])} tokens/s)")
    _print_baselines(result, "decode_tokens_per_s", "decode tokens/s")


def _print_baselines(result: dict, key: str, label: str) -> None:
    for name, base in result["baselines"].items():
        if "error" in base:
            print(f"{name}: failed: {base['error']}")
            continue
        ratio = result["ratios"].get(name)
        print(f"{name}: {_fmt(base.get(key))} {label}; pllm/{name} = {_fmt(ratio, 'x')}")


def print_serve(result: dict) -> None:
    print(f"{'rate':>6} {'done':>5} {'req/s':>7} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'e2e p50':>8}")
    for r in result["per_rate"]:
        print(f"{r['request_rate']!s:>6} {r['num_completed']:>5} {r['requests_per_s']:>7.2f} "
              f"{r['output_tokens_per_s']:>9.1f} {_fmt(r['ttft_p50_s'], '', 1000):>9} "
              f"{_fmt(r['ttft_p99_s'], '', 1000):>9} {_fmt(r['itl_p50_s'], '', 1000):>8} "
              f"{_fmt(r['itl_p99_s'], '', 1000):>8} {_fmt(r['e2e_p50_s'], '', 1):>8}")
        if r["first_error"]:
            print(f"       {r['num_failed']} failed; first error: {r['first_error']}")
    print("(latencies in ms, e2e in s)")
