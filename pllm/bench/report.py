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


# Serving figures compared as reference / baseline at each rate; below 1 is
# better for a latency, above 1 for tokens/s.
SERVE_RATIO_KEYS = {"itl_p99": "itl_p99_s", "ttft_p99": "ttft_p99_s",
                    "output_tokens_per_s": "output_tokens_per_s"}


def serve_ratios(rows: list[dict], reference: str = "pllm") -> list[dict]:
    """``reference``'s figures over every other server's at the same rate; None
    where either has no figure."""
    refs = {str(r["request_rate"]): r for r in rows if r.get("server") == reference}
    out = []
    for row in rows:
        ref = refs.get(str(row["request_rate"]))
        if ref is None or row is ref:
            continue
        out.append({"request_rate": row["request_rate"], "baseline": row["server"],
                    **{name: ref[key] / row[key] if ref[key] and row[key] else None
                       for name, key in SERVE_RATIO_KEYS.items()}})
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
    rates = list(dict.fromkeys(str(r["request_rate"]) for r in result["per_rate"]))
    by_server: dict[str, list[dict]] = {}
    for row in result["per_rate"]:
        by_server.setdefault(row.get("server", ""), []).append(row)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, metric, title in ((axes[0], "ttft", "time to first token"),
                              (axes[1], "itl", "inter-token latency"),
                              (axes[2], "e2e", "end-to-end latency")):
        for i, (server, rows) in enumerate(by_server.items()):
            xs = [rates.index(str(r["request_rate"])) for r in rows]
            for q, style in (("p50", "o-"), ("p99", "s--")):
                ys = [r[f"{metric}_{q}_s"] for r in rows]
                ax.plot(xs, [y * 1000 if y is not None else float("nan") for y in ys], style,
                        color=f"C{i}", label=f"{server} {q}".strip())
        ax.set_xticks(range(len(rates)), rates)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    where = (f"at {result['base_url']}" if "base_url" in result
             else ": " + " vs ".join(result["servers"]) + ", each started afresh per rate")
    fig.suptitle(f"serving: {result['model']}{' ' * ('base_url' in result)}{where}", fontsize=10)
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


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}%"


def print_throughput(result: dict) -> None:
    p = result["pllm"]
    print(f"pllm: {_fmt(p['useful_output_tokens_per_s'])} useful output tokens/s, "
          f"{_fmt(p['total_tokens_per_s'])} prompt+output tokens/s, "
          f"{_fmt(p['requests_per_s'])} requests/s ({p['elapsed_s']:.1f}s)")
    _print_processes(p)
    _print_spec(p)
    _print_compilations(p)
    _print_baselines(result, "useful_output_tokens_per_s", "useful output tokens/s")


def _print_processes(p: dict) -> None:
    """Start-up time, and the memory of the processes the engine started
    (tensor-parallel ranks; a Ray cluster's GCS, raylet and actors; not a
    cluster it joined, whose processes are not this one's)."""
    if "startup_s" in p:
        print(f"  start-up {p['startup_s']:.1f}s ({p.get('executor', 'mp')} executor); "
              f"other processes {p.get('children_rss_bytes', 0) / 1e9:.2f} GB resident")


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
    _print_processes(p)
    _print_spec(p)
    _print_compilations(p)
    if bw and bw.get("weight_bytes") is None:
        print("  weights per decode step: not counted (pipeline stages: rank 0 holds its own)")
    elif bw:
        print(f"  weights {bw['weight_bytes'] / 1e6:.0f} MB per decode step -> "
              f"{_fmt(bw['achieved_gb_per_s'], ' GB/s')} of a measured "
              f"{_fmt(bw['read_bandwidth_gb_per_s'], ' GB/s')} "
              f"({_fmt(bw['bandwidth_fraction'], '%', 100)}; limit "
              f"{_fmt(bw['decode_ceiling_tokens_per_s'])} tokens/s)")
    _print_baselines(result, "decode_tokens_per_s", "decode tokens/s")


def _print_spec(figures: dict) -> None:
    spec = figures.get("spec_decode")
    if spec:
        print(f"  speculative decoding: {spec['num_accepted_tokens']} of "
              f"{spec['num_draft_tokens']} draft tokens accepted "
              f"({_fmt(spec['acceptance_rate'], '%', 100)}), "
              f"{_fmt(spec['mean_accepted_length'])} tokens per step with drafts")


def _print_baselines(result: dict, key: str, label: str) -> None:
    for name, base in result["baselines"].items():
        if "error" in base:
            print(f"{name}: failed: {base['error']}")
            continue
        ratio = result["ratios"].get(name)
        print(f"{name}: {_fmt(base.get(key))} {label}; pllm/{name} = {_fmt(ratio, 'x')}")
        _print_processes(base)


def print_serve(result: dict) -> None:
    rows, ratios = result["per_rate"], result.get("ratios") or []
    ref = result.get("reference", "pllm")
    by_row = {(str(r["request_rate"]), r["baseline"]): r for r in ratios}
    width = max([len(r.get("server", "")) for r in rows] + [6])
    head = f"{'server':<{width}} " if "servers" in result else ""
    print(f"{head}{'rate':>6} {'done':>5} {'fail':>4} {'req/s':>7} {'out tok/s':>9} "
          f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'e2e p50':>8}"
          f" {'steal':>5}" + (f"   {ref}/server: ITL p99 TTFT p99 tok/s" if ratios else ""))
    for r in rows:
        line = (f"{r['server']:<{width}} " if head else "") + (
            f"{r['request_rate']!s:>6} {r['num_completed']:>5} {r['num_failed']:>4} "
            f"{r['requests_per_s']:>7.2f} {r['output_tokens_per_s']:>9.1f} "
            f"{_fmt(r['ttft_p50_s'], '', 1000):>9} {_fmt(r['ttft_p99_s'], '', 1000):>9} "
            f"{_fmt(r['itl_p50_s'], '', 1000):>8} {_fmt(r['itl_p99_s'], '', 1000):>8} "
            f"{_fmt(r['e2e_p50_s'], '', 1):>8} {_percent(r.get('cpu_steal')):>5}")
        ratio = by_row.get((str(r["request_rate"]), r.get("server")))
        if ratio:
            line += (f"   {'':>{len(ref) + 8}} {_fmt(ratio['itl_p99'], 'x'):>7} "
                     f"{_fmt(ratio['ttft_p99'], 'x'):>8} {_fmt(ratio['output_tokens_per_s'], 'x'):>5}")
        print(line)
        if r["first_error"]:
            print(f"       {r['num_failed']} failed; first error: {r['first_error']}")
        if r.get("server_log_tail"):
            print(f"       server log ({r['server_log']}), last lines:\n{r['server_log_tail']}")
        counted = {k: n for k, n in r.get("num_output_tokens_from", {}).items() if k != "usage"}
        if counted:
            print(f"       output tokens of {sum(counted.values())} requests counted from "
                  f"{' and '.join(counted)} (no usage chunk)")
    print("(latencies in ms, e2e in s; steal: the host's CPU time its hypervisor gave to others "
          "during the run, a slower machine for that row" + (
              f"; {ref}/server: below 1x is better for a latency, above 1x for tok/s)"
              if ratios else ")"))
