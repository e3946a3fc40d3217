"""The `pllm` console script, run as a user would."""

from __future__ import annotations

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
