"""`pllm serve --speculative-config`: a real server of the tiny model with
n-gram speculation gives the offline engine's greedy text (streamed or not),
streams several tokens in a chunk when drafts are accepted, and counts the
drafts on /metrics."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from server_utils import metric, running_server  # noqa: E402

from pllm import SamplingParams  # noqa: E402

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
        "prompt_lookup_max": 3}
PROMPTS = ["a b c a b c a b", "one two one two one two", "x y z"]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def spec_server(tiny_model_dir):
    with running_server([tiny_model_dir, "--device", "cpu", "--kv-cache-memory", "16MB",
                         "--max-model-len", "128", "--speculative-config", json.dumps(SPEC)]) as proc:
        yield proc


@pytest.mark.slow
def test_speculating_server_streams_the_offline_greedy_text(spec_server, tiny_llm):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    offline = [o.outputs[0].text for o in tiny_llm.generate(PROMPTS, params, use_tqdm=False)]
    url = f"{spec_server.url}/v1/completions"
    most_tokens_in_a_chunk = 0
    for prompt, want in zip(PROMPTS, offline):
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        r = httpx.post(url, json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS
        pieces = []
        body.update(stream=True, logprobs=1)  # one logprob entry per token: tokens per chunk
        with httpx.stream("POST", url, json=body, timeout=120) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    pieces.append(choice["text"])
                    tokens = len((choice.get("logprobs") or {}).get("tokens") or [])
                    most_tokens_in_a_chunk = max(most_tokens_in_a_chunk, tokens)
        assert "".join(pieces) == want
    assert most_tokens_in_a_chunk > 1  # an accepted draft arrives with its step's other tokens
    assert metric(spec_server, "pllm:spec_decode_num_accepted_tokens") > 0
    assert 0 < metric(spec_server, "pllm:spec_decode_acceptance_rate") <= 1
