"""Prompts are tokenized once and chat templates rendered in one place (the
engine's ``tokenize`` / ``render_chat``), by the offline API and the server
alike."""

from __future__ import annotations

import asyncio

from pllm import SamplingParams
from pllm.entrypoints.openai.serving import ServingContext


class _Recorder:
    """The async engine's ``add_request``, recording what the server hands it."""

    def __init__(self) -> None:
        self.prompts = []

    async def add_request(self, request_id, prompt, params):
        self.prompts.append(prompt)
        return request_id

    def abort(self, ids) -> None:
        pass


def _counting(engine, monkeypatch) -> list:
    calls = []
    encode = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode",
                        lambda text, **kw: calls.append(text) or encode(text, **kw))
    return calls


def test_the_server_tokenizes_a_text_prompt_once(tiny_llm, monkeypatch):
    engine = tiny_llm.llm_engine
    recorder = _Recorder()
    ctx = ServingContext(async_engine=recorder, model_name="tiny", max_model_len=engine.max_model_len,
                         tokenizer=engine.tokenizer, engine=engine, max_num_seqs=8)
    calls = _counting(engine, monkeypatch)
    asyncio.run(ctx.add_all("cmpl-1", ["The capital of France is"],
                            SamplingParams(max_tokens=4), "prompt"))
    assert calls == ["The capital of France is"]  # the context check and the engine share it
    (prompt,) = recorder.prompts
    assert prompt["prompt"] == "The capital of France is"
    assert prompt["prompt_token_ids"] == engine.tokenizer.encode("The capital of France is")


def test_chat_renders_and_tokenizes_in_the_engine_for_both_apis(tiny_llm, monkeypatch):
    """LLM.chat and the server's chat route get the same text and ids from
    ``render_chat``, and the engine does not tokenize them again."""
    from pllm.entrypoints.openai.protocol import ChatMessage
    from pllm.entrypoints.openai.serving_chat import render_chat_prompt

    engine = tiny_llm.llm_engine
    messages = [{"role": "user", "content": "hi there"}]
    text, ids = engine.render_chat(messages)
    assert text.startswith("<|im_start|>user") and ids == engine.tokenizer.encode(
        text, add_special_tokens=False)
    ctx = ServingContext(async_engine=_Recorder(), model_name="tiny",
                         max_model_len=engine.max_model_len, tokenizer=engine.tokenizer,
                         engine=engine, max_num_seqs=8)
    served = asyncio.run(render_chat_prompt(ctx, [ChatMessage(role="user", content="hi there")],
                                            True))
    assert served == {"prompt": text, "prompt_token_ids": ids}
    calls = _counting(engine, monkeypatch)
    out = tiny_llm.chat(messages, SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)[0]
    assert calls == [text] and out.prompt == text and out.prompt_token_ids == ids


def test_llm_chat_gives_the_tools_to_the_template(tiny_llm, monkeypatch):
    engine = tiny_llm.llm_engine
    template = ("{% for t in tools or [] %}[tool {{ t.function.name }}] {% endfor %}"
                "{% for m in messages %}{{ m.content }}{% endfor %}")
    monkeypatch.setattr(engine.loaded, "chat_template", template)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"word": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "define pllm"}]
    out = tiny_llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False, tools=tools)[0]
    assert out.prompt == "[tool lookup] define pllm"
    plain = tiny_llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert plain.prompt == "define pllm"
