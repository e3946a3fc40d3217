"""The `pllm` console script, run as a user would."""

from __future__ import annotations

import re
import subprocess
import sys

from pllm import SamplingParams


def pllm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pllm.entrypoints.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_generate_prints_the_completion(tiny_model_dir):
    res = pllm("generate", "--model", tiny_model_dir, "--kv-cache-memory", "4MB", "--max-tokens", "4",
               "Hello", "The capital")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("-" * 40) == 2 and "Hello" in res.stdout and "The capital" in res.stdout
    assert "KV cache" in res.stderr  # capacity is logged at start-up


def test_generate_sizes_the_kv_cache_to_its_prompts(tiny_model_dir, tiny_llm):
    """Without --kv-cache-memory the cache holds the prompts and their
    outputs and little more (not the platform's default budget), with no
    warning that the context was lowered to fit it; the outputs are unchanged."""
    prompts = ["Hello", "The capital of France is"]
    res = pllm("generate", "--model", tiny_model_dir, "--max-tokens", "5", *prompts)
    assert res.returncode == 0, res.stderr
    lengths = [len(tiny_llm.llm_engine.tokenize(p)) + 5 for p in prompts]
    blocks, block_size = map(int, re.search(r"KV cache (\d+) blocks x (\d+)", res.stderr).groups())
    assert blocks == max(sum(-(-n // block_size) for n in lengths), 4)
    assert f"max_model_len {max(lengths)} " in res.stderr
    assert "WARNING" not in res.stderr
    params = SamplingParams(max_tokens=5, temperature=0.0)
    expected = tiny_llm.generate(prompts, params, use_tqdm=False)
    assert res.stdout == "".join(f"{o.prompt}{o.outputs[0].text}\n{'-' * 40}\n" for o in expected)


def test_chat_answers_each_message(tiny_model_dir, tiny_llm):
    """Each --message is one turn of one conversation: the second answer is
    the model's greedy reply to the whole history, as LLM.chat gives it."""
    res = pllm("chat", "--model", tiny_model_dir, "--kv-cache-memory", "4MB", "--max-tokens", "3",
               "--message", "hi", "--message", "again")
    assert res.returncode == 0, res.stderr
    params = SamplingParams(max_tokens=3, temperature=0.0)
    history = [{"role": "user", "content": "hi"}]
    first = tiny_llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "again"}]
    second = tiny_llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
    assert res.stdout == f"{first}\n{second}\n"


def test_unknown_device_names_the_installed_platforms(tiny_model_dir):
    res = pllm("generate", "--model", tiny_model_dir, "--device", "tpuu")
    assert res.returncode != 0
    assert "tpuu" in res.stderr and "cpu" in res.stderr and "Traceback" not in res.stderr


def test_serve_help_documents_vllm_flags():
    res = pllm("serve", "--help")
    assert res.returncode == 0
    for flag in ["--device", "--host", "--port", "--api-key", "--served-model-name", "--max-model-len",
                 "--block-size", "--max-num-seqs", "--max-num-batched-tokens", "--kv-cache-memory",
                 "--enable-prefix-caching", "--no-enable-prefix-caching", "--chat-template", "--dtype",
                 "--seed", "--tensor-parallel-size"]:
        assert flag in res.stdout, flag
