"""End to end: a tiny random Llama, generated greedily by pllm on the
platform under test and by transformers on the same weights, token for
token. Everything in between (loader, model, scheduler, runner, sampler)
is pllm's own, so a mismatch points at the platform's pieces as the engine
uses them: the backend inside a real model, the allocator's cache, the
platform's hooks (``update_config``, ``prepare_model``, ``setup_process``).

Greedy decoding in fp32 is the honest oracle: with random weights the
top-2 logits are rarely within fp32 noise of each other, and transformers'
eager attention is an independent implementation."""

from __future__ import annotations

import os
import random

import torch

from pllm.core.interfaces import Platform

PROMPT_LENS = (5, 17, 33, 2)  # uneven: block edges, a chunk over two blocks, a tiny prompt
MAX_NEW_TOKENS = 12


def tiny_prompts(vocab: int = 300, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    """Random token ids (no special tokens) of each length in ``lens``."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy decoding, one prompt at a time (no padding).
    ``model``: a loaded transformers model (its dtype and device), or a model
    folder, loaded here in fp32 on the CPU."""
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        from pllm.loader.transformers_compat import dtype_kwargs

        model = AutoModelForCausalLM.from_pretrained(str(model), **dtype_kwargs(torch.float32)).eval()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=model.device)
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                               eos_token_id=None, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    return outs


def pllm_greedy(platform: Platform, model_dir: str | os.PathLike, prompts: list[list[int]],
                max_new_tokens: int, **engine_args) -> list[list[int]]:
    """pllm's greedy tokens on ``platform`` (this instance: it need not be
    installed), all prompts in one batch; the engine is shut down after."""
    from pllm.core.engine import LLMEngine
    from pllm.core.sampling_params import SamplingParams
    from pllm.entrypoints.engine_args import EngineArgs

    args = {"dtype": "float32", "kv_cache_memory": "16MB", "max_model_len": 128, **engine_args}
    config = EngineArgs(model=str(model_dir), device=platform.name, **args).create_engine_config()
    engine = LLMEngine(config, platform=platform)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), list(ids), params)
        done: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = list(out.outputs[0].token_ids)
    finally:
        engine.shutdown()
    return [done[str(i)] for i in range(len(prompts))]


def check_greedy_matches_transformers(platform: Platform, workdir: str | os.PathLike, *,
                                      max_new_tokens: int = MAX_NEW_TOKENS,
                                      **engine_args) -> None:
    """Raise ``AssertionError`` unless pllm on ``platform`` and transformers
    generate the same greedy tokens from a tiny random Llama written into
    ``workdir``. Needs fp32 on the platform (the engine runs in fp32)."""
    from pllm.loader.testing import make_tiny_model

    if not platform.capabilities.supports_dtype(torch.float32):
        raise ValueError(f"{platform.name} does not run fp32; the greedy check needs it")
    model_dir = make_tiny_model(os.path.join(os.fspath(workdir), "tiny-llama"), arch="llama")
    prompts = tiny_prompts()
    expected = hf_greedy(model_dir, prompts, max_new_tokens)
    got = pllm_greedy(platform, model_dir, prompts, max_new_tokens, **engine_args)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        first = next((t for t, (a, b) in enumerate(zip(g, e)) if a != b), None)
        assert g == e, (
            f"{platform.name}: greedy tokens of prompt {i} ({len(prompts[i])} tokens) differ "
            f"from transformers' at output token {first}: got {g}, want {e}"
        )
