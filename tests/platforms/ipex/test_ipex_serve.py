"""``pllm serve --device ipex`` answering the official openai client: a real
server process on 127.0.0.1, the default model."""

from __future__ import annotations

import pytest
from server_utils import ServerProcess


@pytest.mark.slow
def test_serve_on_ipex_answers_the_openai_client():
    from openai import OpenAI

    server = ServerProcess(["--device", "ipex", "--dtype", "float32", "--max-model-len", "512",
                            "--kv-cache-memory", "64MiB"])
    try:
        server.wait_ready(timeout=300)
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        chat = client.chat.completions.create(
            model=client.models.list().data[0].id, temperature=0.0, max_tokens=12,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert chat.choices[0].message.content.strip(), chat
        assert chat.usage.completion_tokens > 0
        stream = client.completions.create(model=chat.model, prompt="The capital of France is",
                                           max_tokens=8, temperature=0.0, stream=True)
        text = "".join(chunk.choices[0].text for chunk in stream)
        assert "Paris" in text, text
        assert "pllm engine on ipex" in server.log_tail(200_000), server.log_tail()
        assert server.terminate() == 0, server.log_tail()
    except BaseException:
        print(server.log_tail())
        raise
    finally:
        server.kill()
        server.cleanup()
