"""Shared helpers for greedy-parity tests against HF transformers."""

from __future__ import annotations

import torch

from pllm import LLM, SamplingParams
from pllm.loader.transformers_compat import dtype_kwargs
from pllm.testing.e2e import hf_greedy

__all__ = ["check_top5", "hf_greedy", "hf_scores", "pllm_greedy", "smollm2_hf_and_prompts"]

SMOLLM2_SYSTEM = ("<|im_start|>system\nYou are a helpful assistant named SmolLM, trained by "
                  "Hugging Face. Answer briefly and politely.<|im_end|>\n")


def smollm2_hf_and_prompts(texts: list[str]):
    """transformers' SmolLM2-135M-Instruct in fp32 from the default model's
    GGUF file, and the token ids of ``texts``, every other one behind a long
    system prompt (so the prefix cache has something to hit)."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pllm.loader import default_model_path

    path = default_model_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                              **dtype_kwargs(torch.float32)).eval()
    return hf, [tok.encode(SMOLLM2_SYSTEM + t if i % 2 else t) for i, t in enumerate(texts)]


def pllm_greedy(llm: LLM, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


# Engine settings that must not change greedy tokens. Each is
# (name, engine kwargs, what must have happened).
def settings(prompt_lens: list[int], max_new: int, block_size: int = 16):
    longest = max(prompt_lens) + max_new
    blocks_one_seq = -(-longest // block_size)
    return [
        ("batch", dict(), None),
        ("chunked_prefill", dict(max_num_batched_tokens=16), None),
        ("prefix_cache", dict(), "prefix_hits"),
        # Room for two sequences at a time: the rest must wait or be preempted.
        ("preemption", dict(num_blocks_override=2 * blocks_one_seq + 1,
                            max_model_len=blocks_one_seq * block_size), "preemptions"),
    ]


def check_setting(llm: LLM, prompts, expected, max_new: int, must: str | None) -> None:
    engine = llm.llm_engine
    if must == "prefix_hits":
        # Warm the cache with one prompt that carries the shared prefix.
        pllm_greedy(llm, [max(prompts, key=len)], max_new)
    got = pllm_greedy(llm, prompts, max_new)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i} (len {len(prompts[i])}): pllm {g} != transformers {e}"
    stats = engine.get_stats()
    if must == "prefix_hits":
        assert stats.prefix_cache_hits > 0, stats
    if must == "preemptions":
        assert stats.num_preemptions > 0, stats
    assert stats.num_free_blocks == stats.num_total_blocks, f"blocks leaked: {stats}"


def check_top5(outs, expected, ref_logprobs, atol: float = 1e-4) -> None:
    """pllm's greedy tokens equal ``expected``, and at every step its top-5
    logprobs are transformers' top 5 (``ref_logprobs``: the log-softmax at
    each generated position), within ``atol``."""
    for i, (out, exp, ref) in enumerate(zip(outs, expected, ref_logprobs)):
        assert out.outputs[0].token_ids == exp, f"prompt {i}"
        for step, top in enumerate(out.outputs[0].logprobs):
            ids = sorted(top, key=lambda t: top[t].logprob, reverse=True)[:5]
            ref_vals, ref_ids = ref[step].topk(5)
            assert ids == ref_ids.tolist(), f"prompt {i}, step {step}"
            got = torch.tensor([top[t].logprob for t in ids])
            torch.testing.assert_close(got, ref_vals, atol=atol, rtol=0,
                                       msg=f"prompt {i}, step {step}")


def hf_scores(hf, prompts, got) -> tuple[float, list[float]]:
    """transformers scoring pllm's tokens ``got``, each fed its own prefix:
    the share that is transformers' greedy choice, and each token's gap to
    that choice, in nats (for lossy settings: bf16, an 8-bit KV cache)."""
    top, gaps = 0, []
    with torch.inference_mode():
        for ids, out in zip(prompts, got):
            lp = hf(torch.tensor([ids + out])).logits[0, len(ids) - 1: -1].float().log_softmax(-1)
            chosen = lp[torch.arange(len(out)), torch.tensor(out)]
            top += int((chosen == lp.max(-1).values).sum())
            gaps += (lp.max(-1).values - chosen).tolist()
    return top / len(gaps), gaps


class Fp8KVRounding:
    """transformers with pllm's 8-bit KV-cache rounding: each layer's keys
    (after rotary) and values go through ``quantize``/``dequantize`` with the
    given scales before attention, as pllm stores and reads them back. Used as
    ``with Fp8KVRounding(hf, dtype, k_scale, v_scale): ...``."""

    def __init__(self, hf, kv_dtype: torch.dtype, k_scale: float = 1.0, v_scale: float = 1.0):
        self.hf, self.kv_dtype, self.k_scale, self.v_scale = hf, kv_dtype, k_scale, v_scale
        self._undo = []

    def _round(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        from pllm.core.kv_cache.fp8 import round_trip

        return round_trip(x, scale, self.kv_dtype)

    def __enter__(self):
        import importlib

        module = importlib.import_module(type(self.hf).__module__)
        rotary = module.apply_rotary_pos_emb

        def rotary_then_round(q, k, *args, **kwargs):
            q, k = rotary(q, k, *args, **kwargs)
            return q, self._round(k, self.k_scale)

        module.apply_rotary_pos_emb = rotary_then_round
        self._undo.append(lambda: setattr(module, "apply_rotary_pos_emb", rotary))
        for layer in self.hf.model.layers:
            hook = layer.self_attn.v_proj.register_forward_hook(
                lambda _m, _i, out: self._round(out, self.v_scale))
            self._undo.append(hook.remove)
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()
