"""End-to-end proof of the CUDA platform on a real GPU.

1. Greedy parity with transformers on the GPU (fp32): tiny random Llama,
   Mistral (sliding window), Qwen2 and Qwen3, each in one mixed batch, with
   chunked prefill and with the decode steps replayed from CUDA graphs; and a
   random model with SmolLM2-135M's exact shapes (eager and graphs).
   GGUF Q4_0, Q4_1 and Q8_0 files kept in their blocks, and int8 weights,
   on the Triton dequantizing GEMM (against transformers on the same values).
2. Throughput on the standard workload (BENCHMARKS.md), bf16, pllm (CUDA
   graphs and eager) vs HF transformers `generate` with static batches of 16
   and left padding, on the same GPU in the same run, with the
   SmolLM2-135M-shaped model, with an fp8 KV cache too on sm89+, with int8
   and fp8 weights; and
   batch-1 decode speed, graphs vs eager.

Usage: python ci/legs/cuda/gpu_e2e.py OUT.json  (needs a GPU build of torch and pllm installed).
Exit status: 0, or 1 when any parity run's tokens differ from transformers'.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from pllm import LLM, SamplingParams
from pllm.loader.testing import make_tiny_model
from pllm.testing.e2e import hf_greedy  # on the model's device

# A dry run of this script on a CPU: PLLM_E2E_DEVICE=cpu PLLM_E2E_SMALL=1.
DEV = os.environ.get("PLLM_E2E_DEVICE", "cuda")
SMALL = bool(os.environ.get("PLLM_E2E_SMALL"))
SMOLLM2_SHAPE = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
                 "vocab_size": 49152, "max_position_embeddings": 8192,
                 "tie_word_embeddings": True, "rope_theta": 100000.0}


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def pllm_greedy(llm, prompts, max_new):
    p = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]


def parity(folder, prompts, max_new, settings, hf=None):
    """``settings``: {name: LLM kwargs}; ``hf``: the transformers model to
    match (default: ``folder``'s, in fp32)."""
    hf = hf or AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected = hf_greedy(hf.to(DEV).eval(), prompts, max_new)
    del hf
    sync()
    result = {}
    for name, kwargs in settings.items():
        llm = LLM(folder, device=DEV, dtype="float32", **{"enforce_eager": True, **kwargs})
        got = pllm_greedy(llm, prompts, max_new)
        same = sum(g == e for g, e in zip(got, expected))
        first_diff = [next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), None)
                      for g, e in zip(got, expected)]
        result[name] = {"prompts_equal": same, "of": len(prompts), "first_differing_token": first_diff}
        del llm
        sync()
    return result


def workload(n, vocab, seed=0):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        plen, olen = rng.randint(16, 256), rng.randint(32, 128)
        reqs.append(([rng.randrange(10, vocab) for _ in range(plen)], olen))
    return reqs


def bench_pllm(folder, reqs, enforce_eager=False, kv_cache_dtype="auto", quantization="auto"):
    llm = LLM(folder, device=DEV, dtype="bfloat16", max_num_seqs=256, max_num_batched_tokens=8192,
              enforce_eager=enforce_eager, kv_cache_dtype=kv_cache_dtype,
              quantization=quantization)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
    llm.generate([p for p, _ in reqs[:4]], params[:4], use_tqdm=False)  # warm-up
    sync()
    t = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], params, use_tqdm=False)
    sync()
    dt = time.perf_counter() - t
    useful = sum(min(len(o.outputs[0].token_ids), r[1]) for o, r in zip(outs, reqs))
    replays = _graph_replays(llm)
    del llm
    sync()
    return {"seconds": dt, "useful_tokens": useful, "tokens_per_s": useful / dt,
            "graph_replays": replays}


def _graph_replays(llm):
    """Decode steps served from CUDA graphs (None: graphs off), so a graphs-on
    figure can be told from one that silently ran eager."""
    runner = llm.llm_engine.executor.worker.runner.decode_runner
    return None if runner is None else runner.num_replays


def decode_speed(folder, enforce_eager, prompt_len=128, new_tokens=128, repeats=3):
    """Batch-1 decode tokens/s (best of ``repeats``): where CUDA graphs matter most."""
    llm = LLM(folder, device=DEV, dtype="bfloat16", enforce_eager=enforce_eager)
    engine = llm.llm_engine
    best = 0.0
    replays_before = _graph_replays(llm)
    for r in range(repeats + 1):  # the first run warms up
        engine.add_request(f"lat-{r}", list(range(10 + r, 10 + r + prompt_len)),
                           SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
        engine.step()  # prefill + first token
        sync()
        t = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        sync()
        if r:
            best = max(best, (new_tokens - 1) / (time.perf_counter() - t))
    replays = _graph_replays(llm)
    del llm
    sync()
    return {"tokens_per_s": best,
            "graph_replays": None if replays is None else replays - replays_before}


def bench_hf(folder, reqs, batch=16):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").to(DEV).eval()
    with torch.inference_mode():
        x = torch.tensor([reqs[0][0]], device=DEV)
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, pad_token_id=0)
        sync()
        t = time.perf_counter()
        useful = 0
        for i in range(0, len(reqs), batch):
            chunk = reqs[i:i + batch]
            width = max(len(p) for p, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, (p, _) in enumerate(chunk):  # left padding
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            new = max(o for _, o in chunk)
            model.generate(ids.to(DEV), attention_mask=mask.to(DEV), do_sample=False, max_new_tokens=new,
                           min_new_tokens=new, eos_token_id=None, pad_token_id=0)
            useful += sum(o for _, o in chunk)
        sync()
        dt = time.perf_counter() - t
    del model
    sync()
    return {"seconds": dt, "useful_tokens": useful, "tokens_per_s": useful / dt, "batch_size": batch}


def main(out_path: str) -> int:
    report = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else DEV, "torch": torch.__version__}
    shape = dict(SMOLLM2_SHAPE, num_hidden_layers=2, vocab_size=1024) if SMALL else SMOLLM2_SHAPE
    rng = random.Random(1)
    tiny_prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (5, 16, 17, 33, 48, 70)]
    with tempfile.TemporaryDirectory() as tmp:
        for arch, extra in {"llama": {}, "mistral": {"sliding_window": 12}, "qwen2": {}, "qwen3": {}}.items():
            # head_dim 64: the CUDA platform's kernels take 64, 128 and 256.
            folder = make_tiny_model(f"{tmp}/{arch}", arch=arch, hidden_size=256, head_dim=64, **extra)
            report[f"parity_tiny_{arch}"] = parity(
                folder, tiny_prompts, 32,
                {"batch": {}, "chunked_prefill": {"max_num_batched_tokens": 16},
                 "cuda_graphs": {"enforce_eager": False}})
            print(arch, report[f"parity_tiny_{arch}"], flush=True)
        report.update(quantized_parity(tmp, tiny_prompts))
        smol = make_tiny_model(f"{tmp}/smol", arch="llama", **shape)
        smol_prompts = [[rng.randrange(10, shape["vocab_size"]) for _ in range(n)] for n in (8, 31, 64, 100)]
        report["parity_smollm2_shape_random"] = parity(
            smol, smol_prompts, 32, {"batch": {}, "cuda_graphs": {"enforce_eager": False}})
        print("smollm2-shape", report["parity_smollm2_shape_random"], flush=True)
        reqs = workload(8 if SMALL else 64, shape["vocab_size"])
        report["throughput_pllm_bf16"] = bench_pllm(smol, reqs)
        print("pllm", report["throughput_pllm_bf16"], flush=True)
        report["throughput_pllm_bf16_eager"] = bench_pllm(smol, reqs, enforce_eager=True)
        print("pllm eager", report["throughput_pllm_bf16_eager"], flush=True)
        if DEV != "cuda" or torch.cuda.get_device_capability(0) >= (8, 9):  # fp8 needs sm89+
            report["throughput_pllm_bf16_fp8_kv"] = bench_pllm(smol, reqs, kv_cache_dtype="fp8")
            print("pllm fp8 KV cache", report["throughput_pllm_bf16_fp8_kv"], flush=True)
        for quantization in ("int8", "fp8"):  # weights rounded at load; bf16 activations
            key = f"throughput_pllm_bf16_{quantization}_weights"
            report[key] = bench_pllm(smol, reqs, quantization=quantization)
            print(f"pllm {quantization} weights", report[key], flush=True)
        report["decode_batch1_tokens_per_s"] = {
            "cuda_graphs": decode_speed(smol, enforce_eager=False),
            "eager": decode_speed(smol, enforce_eager=True)}
        print("batch-1 decode", report["decode_batch1_tokens_per_s"], flush=True)
        report["throughput_hf_generate_bf16"] = bench_hf(smol, reqs)
        print("hf", report["throughput_hf_generate_bf16"], flush=True)
        report["throughput_ratio"] = (report["throughput_pllm_bf16"]["tokens_per_s"]
                                      / report["throughput_hf_generate_bf16"]["tokens_per_s"])
    unequal = parity_failures(report)
    report["parity_ok"] = not unequal
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    for line in unequal:
        print(f"PARITY FAIL {line}", flush=True)
    return 1 if unequal else 0


def quantized_parity(tmp, prompts) -> dict:
    """Greedy parity of the quantized linear layers (Triton's dequantizing
    GEMM) with fp32 activations: GGUF Q4_0 / Q4_1 / Q8_0 files against
    transformers on the file's dequantized values, int8 against transformers
    on the same rounded values (eager and CUDA graphs)."""
    from pllm.loader.testing import make_tiny_gguf
    from pllm.models.quant import int8_per_channel

    settings = {"batch": {}, "cuda_graphs": {"enforce_eager": False}}
    report = {}
    for fmt in ("Q4_0", "Q4_1", "Q8_0"):
        path = make_tiny_gguf(f"{tmp}/gguf-{fmt}", "llama", quant=fmt, hidden_size=256, head_dim=64)
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                  gguf_file=os.path.basename(path),
                                                  dtype=torch.float32)
        report[f"parity_tiny_gguf_{fmt}"] = parity(
            path, prompts, 32, {k: {**v, "quantization": "gguf"} for k, v in settings.items()}, hf)
        print(fmt, report[f"parity_tiny_gguf_{fmt}"], flush=True)
    folder = make_tiny_model(f"{tmp}/int8", arch="qwen2", hidden_size=256, head_dim=64,
                             tie_word_embeddings=True)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for param in hf.parameters():
            if param.dim() == 2:
                param.copy_(int8_per_channel(param).dequantize())
    report["parity_tiny_int8"] = parity(
        folder, prompts, 32, {k: {**v, "quantization": "int8"} for k, v in settings.items()}, hf)
    print("int8", report["parity_tiny_int8"], flush=True)
    return report


def parity_failures(report: dict) -> list[str]:
    """``model/setting: k of n`` for every parity run whose tokens differ."""
    return [f"{model}/{setting}: {r['prompts_equal']} of {r['of']} prompts equal"
            for model, runs in report.items() if model.startswith("parity_")
            for setting, r in runs.items() if r["prompts_equal"] != r["of"]]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
