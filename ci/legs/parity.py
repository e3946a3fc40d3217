"""Greedy parity with transformers for a matrix leg: tiny random models, pllm
on platform ``--device`` against HF transformers on the CPU in fp32, token
for token.

    python ci/legs/parity.py --device fakeaccel
    TRITON_INTERPRET=1 python ci/legs/parity.py --device cpu --attention triton

``--attention triton`` runs the model as the cuda and rocm platforms do (the
shared Triton PagedAttention backend, no CPU compiled layers) on CPU tensors,
so under ``TRITON_INTERPRET=1`` it checks the GPU kernels inside the engine.
Exit status: 0 every prompt equal, 1 a difference (each printed).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time

ARCHS = {"llama": {}, "mistral": {"sliding_window": 12}, "qwen3": {}}
PROMPT_LENS = (5, 16, 17, 33)


TRITON_CALLS = [0]


def use_triton_attention() -> None:
    """The CPU platform, with the model run as the GPU platforms run it (the
    forward calls are counted, to prove the Triton backend did the work)."""
    from pllm.core.interfaces import Platform
    from pllm.platforms.cpu.platform import CPUPlatform
    from pllm.platforms.triton.attention import TritonAttentionBackend

    class Counted(TritonAttentionBackend):
        def forward(self, *args, **kwargs):
            TRITON_CALLS[0] += 1
            return super().forward(*args, **kwargs)

    CPUPlatform.prepare_model = Platform.prepare_model
    CPUPlatform.make_attention_backend = lambda self: Counted()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", required=True, help="platform pllm runs on")
    parser.add_argument("--attention", choices=["platform", "triton"], default="platform")
    parser.add_argument("--archs", default=",".join(ARCHS),
                        help=f"comma-separated, of {', '.join(ARCHS)}")
    parser.add_argument("--max-new", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    from pllm import LLM, SamplingParams
    from pllm.loader.testing import make_tiny_model
    from pllm.testing.e2e import hf_greedy  # transformers in fp32 on the CPU, from the folder

    if args.attention == "triton":
        use_triton_attention()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in PROMPT_LENS]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new, ignore_eos=True)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            t0 = time.monotonic()
            # head_dim 64: what the Triton kernels are built for (any works on the CPU).
            folder = make_tiny_model(f"{tmp}/{arch}", arch=arch, hidden_size=128, head_dim=64,
                                     num_attention_heads=2, num_key_value_heads=1,
                                     **ARCHS[arch])
            expected = hf_greedy(folder, prompts, args.max_new)
            llm = LLM(folder, device=args.device, dtype=args.dtype, kv_cache_memory="16MiB",
                      max_model_len=128)
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            del llm
            if args.attention == "triton" and not TRITON_CALLS[0]:
                print(f"{arch}: the Triton backend was never called")
                failures += 1
            TRITON_CALLS[0] = 0
            equal = sum(g == e for g, e in zip(got, expected))
            print(f"{arch}: {equal}/{len(prompts)} prompts equal "
                  f"({time.monotonic() - t0:.1f} s)", flush=True)
            for i, (g, e) in enumerate(zip(got, expected)):
                if g != e:
                    failures += 1
                    print(f"  prompt {i} (len {len(prompts[i])}):\n"
                          f"    pllm         {g}\n    transformers {e}", flush=True)
    print(f"PARITY {'PASS' if not failures else 'FAIL'} on {args.device}"
          f" ({args.attention} attention)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
