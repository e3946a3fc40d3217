"""Structured outputs under two tensor-parallel ranks: the grammar's mask
is applied on rank 0, where sampling happens, to logits gathered from both
ranks' vocabulary slices (a module of its own: one process holds one
tensor-parallel engine at a time)."""

from __future__ import annotations

import json

import pytest

from pllm import LLM, SamplingParams

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object",
          "properties": {"kind": {"enum": ["cat", "dog"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["kind", "n"], "additionalProperties": False}


def test_structured_outputs_under_two_ranks(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", kv_cache_memory="16MB", tensor_parallel_size=2)
    try:
        params = SamplingParams(max_tokens=60, temperature=1.0, seed=4, n=2,
                                structured_outputs={"json": SCHEMA,
                                                    "disable_any_whitespace": True})
        outs = llm.generate(["a", "b c", "hello there"], params, use_tqdm=False)
        for out in outs:
            for sample in out.outputs:
                assert sample.finish_reason == "stop"
                obj = json.loads(sample.text)
                assert obj["kind"] in ("cat", "dog") and 0 <= obj["n"] <= 9
    finally:
        llm.shutdown()
