"""The GGUF linear kernel (``pllm.platforms.cpu.gguf_linear``) against fp32
``F.linear`` on the dequantized weight, for SmolLM2-135M's matrix shapes,
measured in one run on one machine: per shape, rows of x and format, the
best time of repeated calls, the weight bytes read per second and the speed-up over fp32.
Random weights (the time does not depend on their values), cycled through
copies of 64 MB in fp32 so that every call reads them from memory.

    python ci/bench/gguf_linear.py [--formats Q8_0,Q4_0,Q4_1] [--rows 1,16,256]
    python ci/bench/gguf_linear.py --crossover   # few-row product vs dequantized tiles
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize

from pllm.platforms.cpu.gguf_linear import SUPPORTED_TYPES, gguf_dequantize, gguf_linear, gguf_ops

# (name, out_features, in_features) of SmolLM2-135M (hidden 576, 9 query and
# 3 KV heads of 64, intermediate 1536, vocabulary 49152)
SHAPES = [("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536),
          ("lm_head", 49152, 576)]
COLD_BYTES = 64 << 20  # fp32 weight bytes cycled through per shape: several times the L3
_QUANTIZABLE = {GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1}


def random_qweight(qtype: GGMLQuantizationType, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """A random weight in ``qtype``: quantized by the ``gguf`` package where
    it can, else random blocks with small positive fp16 scales."""
    if qtype in _QUANTIZABLE:
        return torch.from_numpy(quantize(rng.standard_normal((n, k), dtype=np.float32), qtype))
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block_elems, block_bytes), dtype=np.uint8)
    scale = (rng.random((n, k // block_elems, 1)) * 1e-2 + 1e-3).astype(np.float16).view(np.uint8)
    at = block_bytes - 2 if qtype == GGMLQuantizationType.Q6_K else 0
    raw[..., at:at + 2] = scale
    return torch.from_numpy(raw.reshape(n, -1))


def best_time(fn, min_time: float = 0.2, max_reps: int = 200) -> float:
    """The fastest of repeated calls: on a shared machine the others are
    the same work plus time taken by other processes."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _cold(weight: torch.Tensor, fp32_bytes: int) -> list[torch.Tensor]:
    """Copies of ``weight`` to cycle through, so that each call reads its
    weight from memory (as a model's forward does: its weights do not fit
    the caches), not from a cache the previous call filled."""
    return [weight.clone() for _ in range(-(-COLD_BYTES // fp32_bytes))]


def _cycled(fn, copies: list[torch.Tensor]):
    turn = iter(range(1 << 62))
    return lambda: fn(copies[next(turn) % len(copies)])


def table(formats, rows, min_time: float) -> None:
    rng = np.random.default_rng(0)
    print(f"{'shape':>8} {'N x K':>12} {'M':>4} {'format':>6} {'acts':>5} {'ms':>8} {'GB/s':>6} {'x fp32':>7}")
    for name, n, k in SHAPES:
        # SmolLM2's 576 is no multiple of the K-quants' 256: those run on "down" only
        qweights = {t: random_qweight(t, n, k, rng) for t in formats if k % GGML_QUANT_SIZES[t][0] == 0}
        first = next(iter(qweights))
        dense = gguf_dequantize(qweights[first], first, k)
        for m in rows:
            x = torch.randn(m, k)
            dense_copies = _cold(dense, dense.numel() * 4)
            base = best_time(_cycled(lambda w: F.linear(x, w), dense_copies), min_time)
            print(f"{name:>8} {f'{n}x{k}':>12} {m:>4} {'F32':>6} {'fp32':>5} {base * 1e3:8.3f} "
                  f"{dense.numel() * 4 / base / 1e9:6.1f} {1.0:7.2f}")
            for t, qw in qweights.items():
                copies = _cold(qw, dense.numel() * 4)
                for acts in ("fp32", "q8"):
                    s = best_time(_cycled(lambda w: gguf_linear(x, w, t, k, activations=acts), copies), min_time)
                    print(f"{'':>8} {'':>12} {'':>4} {t.name:>6} {acts:>5} {s * 1e3:8.3f} "
                          f"{qw.numel() / s / 1e9:6.1f} {base / s:7.2f}")


def crossover(formats, min_time: float) -> None:
    """Time the few-row product and the tiled one on the same rows."""
    ops = gguf_ops()
    rng = np.random.default_rng(0)
    print(f"{'N x K':>12} {'format':>6} {'acts':>5} {'M':>4} {'few ms':>8} {'tiled ms':>8} {'few/tiled':>9}")
    for _, n, k in SHAPES[2:4]:
        for t in (t for t in formats if k % GGML_QUANT_SIZES[t][0] == 0):
            qw = random_qweight(t, n, k, rng)
            for acts in ("fp32", "q8"):
                for m in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64):
                    x = torch.randn(m, k)
                    few = best_time(lambda: ops.gguf_linear(x, qw, int(t), k, acts == "q8", 0, m, 0), min_time)
                    tiled = best_time(lambda: ops.gguf_linear(x, qw, int(t), k, acts == "q8", 0, 0, 0), min_time)
                    print(f"{f'{n}x{k}':>12} {t.name:>6} {acts:>5} {m:>4} {few * 1e3:8.3f} {tiled * 1e3:8.3f} "
                          f"{few / tiled:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="Q8_0,Q4_0,Q4_1,Q4_K,Q6_K",
                        help=f"comma-separated, of {','.join(t.name for t in SUPPORTED_TYPES)}")
    parser.add_argument("--rows", default="1,16,256", help="rows of x, comma-separated")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds to time each case at least")
    parser.add_argument("--crossover", action="store_true", help="few-row product vs tiles instead")
    args = parser.parse_args()
    formats = [GGMLQuantizationType[f] for f in args.formats.split(",")]
    if gguf_ops() is None:
        raise SystemExit("the GGUF linear kernel did not build; see the warning above")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.crossover:
        crossover(formats, args.min_time)
    else:
        table(formats, [int(r) for r in args.rows.split(",")], args.min_time)


if __name__ == "__main__":
    main()
