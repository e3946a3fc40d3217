"""IPEX's fused layers against the torch code they would replace, on the
default model's shapes (SmolLM2-135M: hidden 576, MLP 1536, 9 query and 3
KV heads of 64, vocabulary 49152), in the same run: the error against torch
and the time ratio, per layer, rows and dtype. What ``pllm.platforms.ipex.layers``
swaps in is what these figures showed faster; run it on a new CPU to see
whether that holds there.

    python ci/legs/ipex_layers.py [--rows 1,16,256] [--dtypes float32,bfloat16]

Needs intel_extension_for_pytorch (the ipex leg's environment). Prints one
line per measurement; exit status 1 if an IPEX layer disagrees with torch
beyond the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 576, 1536, 9, 3, 64, 49152
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def timed(fn, min_seconds: float = 0.2) -> float:
    """Median seconds per call over repeated rounds (after a warm-up call)."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.05:
        fn()
        calls += 1
    per_round = max(1, calls)
    times = []
    t_end = time.perf_counter() + min_seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        for _ in range(per_round):
            fn()
        times.append((time.perf_counter() - t0) / per_round)
    return sorted(times)[len(times) // 2]


def cases(rows: int, dtype: torch.dtype):
    """(layer, torch function, IPEX function) on fresh inputs."""
    import intel_extension_for_pytorch as ipex
    import intel_extension_for_pytorch.llm.functional as IF

    from pllm.models.layers import RMSNorm, RotaryEmbedding, SiluAndMul

    gen = torch.Generator().manual_seed(rows)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    norm = RMSNorm(HIDDEN, 1e-5).to(dtype)
    norm.weight.data = randn(HIDDEN)
    x, residual = randn(rows, HIDDEN), randn(rows, HIDDEN)
    yield ("rms_norm", lambda: norm(x), lambda: IF.rms_norm(x, norm.weight, norm.eps))
    yield ("add_rms_norm", lambda: norm(x, residual)[0],
           lambda: IF.add_rms_norm(residual.clone(), x, norm.weight, None, norm.eps, True))

    gate_up = randn(rows, 2 * MLP)
    yield ("silu_and_mul", lambda: SiluAndMul()(gate_up),
           lambda: IF.silu_mul(gate_up[:, :MLP], gate_up[:, MLP:]))

    class Cfg:
        rope_theta = 10000.0

    rope = RotaryEmbedding(Cfg(), HEAD_DIM, 8192)
    positions = torch.randint(0, 8192, (rows,), generator=gen)
    q, k = randn(rows, HEADS, HEAD_DIM), randn(rows, KV_HEADS, HEAD_DIM)

    def ipex_rope():
        cos, sin = rope.cos[positions], rope.sin[positions]
        return IF.rotary_embedding(q.clone(), k.clone(), sin, cos, HEAD_DIM, True)[0]

    yield ("rotary", lambda: rope(positions, q, k)[0], ipex_rope)

    for name, n_in, n_out in (("qkv_proj", HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM),
                              ("gate_up_proj", HIDDEN, 2 * MLP), ("down_proj", MLP, HIDDEN),
                              ("lm_head", HIDDEN, VOCAB)):
        linear = torch.nn.Linear(n_in, n_out, bias=False).to(dtype).eval()
        linear.weight.data = randn(n_out, n_in) / n_in**0.5
        try:
            packed = ipex.optimize(torch.nn.Sequential(linear).eval(), dtype=dtype, inplace=False)
        except (AssertionError, RuntimeError) as exc:  # bf16 prepack needs AVX-512 or AVX-NE-CONVERT
            print(f"{name:14} {str(dtype)[6:]:9} {rows:5}  IPEX cannot prepack it here: "
                  f"{str(exc).splitlines()[0][:90]}")
            continue
        inputs = randn(rows, n_in)
        with torch.no_grad():
            yield (name, lambda linear=linear, inputs=inputs: F.linear(inputs, linear.weight),
                   lambda packed=packed, inputs=inputs: packed(inputs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,16,256")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    bad = 0
    print(f"{'layer':14} {'dtype':9} {'rows':>5} {'torch us':>9} {'ipex us':>9} {'speed-up':>8} "
          f"{'max err':>9}")
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            for name, ref, fast in cases(rows, dtype):
                want, got = ref().float(), fast().float()
                err = float((want - got).abs().max() / want.abs().max().clamp_min(1e-6))
                t_ref, t_fast = timed(ref), timed(fast)
                ok = err <= TOLERANCE[dtype]
                bad += not ok
                print(f"{name:14} {str(dtype)[6:]:9} {rows:5} {t_ref * 1e6:9.1f} "
                      f"{t_fast * 1e6:9.1f} {t_ref / t_fast:7.2f}x {err:9.2e}"
                      f"{'' if ok else '  DISAGREES'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
