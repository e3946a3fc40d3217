"""Tool calling through the real server and the official openai client, with
SmolLM2-135M-Instruct and the repository's ChatML tool template
(``--enable-auto-tool-choice --tool-call-parser hermes``):

- the chat template is given the tools (and earlier calls and their results);
- ``required`` and a named function return calls whose arguments validate
  against the function's schema, greedy and sampled;
- streamed tool-call deltas reassemble to the non-streamed call;
- ``auto``: SmolLM2-135M answers in prose rather than calling (checked
  below), so a scripted output (a regex holding the model to a Hermes call)
  proves that the parser turns such text into ``tool_calls``, streamed too;
- ``none`` leaves the text as content; bad tools and choices are 400s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")
from pydantic import BaseModel, Field  # noqa: E402
from server_utils import running_server  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
TEMPLATE = Path(__file__).parents[2] / "examples" / "tool_chat_template_chatml_hermes.jinja"


class WeatherArgs(BaseModel):
    city: str = Field(max_length=40)
    unit: Optional[Literal["celsius", "fahrenheit"]] = None


class FlightArgs(BaseModel):
    origin: str = Field(max_length=40)
    destination: str = Field(max_length=40)
    passengers: int = Field(ge=1, le=9)


def _tool(name: str, description: str, args: type[BaseModel]) -> dict:
    schema = args.model_json_schema()
    schema.pop("title", None)
    return {"type": "function",
            "function": {"name": name, "description": description, "parameters": schema}}


TOOLS = [_tool("get_weather", "The current weather in a city", WeatherArgs),
         _tool("book_flight", "Book a flight between two cities", FlightArgs)]
ARGS = {"get_weather": WeatherArgs, "book_flight": FlightArgs}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def server():
    with running_server(["--kv-cache-memory", "1GiB", "--max-model-len", "2048",
                         "--chat-template", str(TEMPLATE), "--enable-auto-tool-choice",
                         "--tool-call-parser", "hermes"]) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _check_calls(message) -> list[tuple[str, dict]]:
    assert message.tool_calls, message
    calls = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        ARGS[call.function.name].model_validate(arguments)
        calls.append((call.function.name, arguments))
    return calls


def _reassemble(stream) -> tuple[str, list[tuple[str, str]], set]:
    content, calls, finish = "", {}, set()
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for d in delta.tool_calls or ():
                if d.id is not None:
                    assert d.index not in calls
                    calls[d.index] = [d.function.name, ""]
                calls[d.index][1] += d.function.arguments or ""
            if choice.finish_reason:
                finish.add(choice.finish_reason)
    return content, [tuple(c) for _, c in sorted(calls.items())], finish


def test_the_chat_template_is_given_the_tools_and_the_earlier_calls(server):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    r = httpx.post(f"{server.url}/tokenize", json={"messages": messages, "tools": TOOLS},
                   timeout=60)
    assert r.status_code == 200, r.text
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": r.json()["tokens"]},
                      timeout=60).json()["prompt"]
    assert '"name": "book_flight"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": messages, "tools": TOOLS, "max_tokens": 8})
    assert r.status_code == 200, r.text


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_named_function_gets_arguments_that_validate(client, temperature):
    for name, prompt in [("get_weather", "Weather in Tokyo?"),
                         ("book_flight", "Book me a flight from Rome to Oslo for two.")]:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": name}},
            temperature=temperature, n=2, seed=3, max_tokens=120)
        for choice in r.choices:
            assert choice.finish_reason == "stop"  # a forced function, as OpenAI's
            assert [n for n, _ in _check_calls(choice.message)] == [name]


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_calls_tools_that_exist_with_valid_arguments(client, temperature):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                  temperature=temperature, seed=5, max_tokens=200)
    # Parallel calls allowed: SmolLM2 may repeat calls until max_tokens; the
    # calls complete by then are returned.
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason in ("tool_calls", "length") and choice.message.content is None
    _check_calls(choice.message)
    # parallel_tool_calls false: exactly one call.
    choice = client.chat.completions.create(**kwargs, parallel_tool_calls=False).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(_check_calls(choice.message)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("tool_choice", ["required",
                                         {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_deltas_reassemble_to_the_call(client, tool_choice):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                  temperature=0.0, max_tokens=200, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0].message
    content, calls, finish = _reassemble(client.chat.completions.create(**kwargs, stream=True))
    assert content == "" and finish == {"stop" if isinstance(tool_choice, dict) else "tool_calls"}
    assert calls == [(c.function.name, c.function.arguments) for c in whole.tool_calls]


class Place(BaseModel):
    city: str = Field(max_length=30)
    country: str = Field(max_length=30)


class TripArgs(BaseModel):
    start: Place
    end: Place


def test_required_with_tools_whose_schemas_have_definitions(client):
    """Pydantic-made tools keep nested models in ``$defs`` with references
    from their root: they still resolve once nested in the calls' array."""
    trip = openai.pydantic_function_tool(TripArgs, name="plan_trip")
    assert "$defs" in trip["function"]["parameters"]
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Plan a trip from Paris to Rome."}],
        tools=[trip, TOOLS[0]], tool_choice="required", parallel_tool_calls=False,
        temperature=0.0, max_tokens=150)
    (call,) = r.choices[0].message.tool_calls
    {"plan_trip": TripArgs, "get_weather": WeatherArgs}[call.function.name].model_validate_json(
        call.function.arguments)


def test_auto_smollm2_answers_in_prose(client):
    """What SmolLM2-135M does with tools it may call: it answers in text (so
    the parser leaves it as content); the scripted test below covers calls."""
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0.0,
                                       max_tokens=40)
    choice = r.choices[0]
    assert choice.message.tool_calls == [] and choice.message.content
    assert choice.finish_reason in ("stop", "length")


SCRIPTED = ('I will look that up.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris", "unit": "celsius"}}\n</tool_call>')


def _scripted_regex() -> str:
    # The exact text above (regex metacharacters escaped).
    return "".join("\\" + c if c in "{}()[].*+?|^$\\" else c for c in SCRIPTED)


def test_auto_parses_a_hermes_call_out_of_the_text(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto", temperature=0.0,
                  max_tokens=60, extra_body={"structured_outputs": {"regex": _scripted_regex()}})
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will look that up."
    assert _check_calls(choice.message) == [("get_weather", {"city": "Paris", "unit": "celsius"})]
    content, calls, finish = _reassemble(client.chat.completions.create(**kwargs, stream=True))
    assert content.strip() == "I will look that up." and finish == {"tool_calls"}
    assert calls == [("get_weather", choice.message.tool_calls[0].function.arguments)]


def test_none_leaves_the_text_as_content(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0.0,
                  max_tokens=60, extra_body={"structured_outputs": {"regex": _scripted_regex()}})
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.message.content == SCRIPTED and choice.message.tool_calls == []
    assert choice.finish_reason == "stop"


@pytest.mark.parametrize("change,param", [
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": 5}}}], "tool_choice": "required"}, "tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tools_are_400s_naming_the_field(server, change, param):
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 4, **change}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
