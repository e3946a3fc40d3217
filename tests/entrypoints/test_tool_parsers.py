"""The tool-call parsers (``--tool-call-parser``) and their streaming: each
text gives the expected final calls, and its deltas, however the text is cut
into pieces, reassemble to exactly those calls and content."""

from __future__ import annotations

import json
import random

import pytest

from pllm.entrypoints.openai.tool_parsers import (
    CallArrayParser,
    HermesToolParser,
    Llama3JsonToolParser,
    NamedCallParser,
    ToolCallStream,
    final_calls,
    get_tool_parser,
)

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'

# (parser, text, expected content, expected [(name, arguments)]); no calls:
# the whole text is content.
CASES = [
    (HermesToolParser(), f"<tool_call>\n{WEATHER}\n</tool_call>", None,
     [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    (HermesToolParser(), f"Let me check.\n<tool_call>{WEATHER}</tool_call>\n"
                         '<tool_call>{"name": "now", "arguments": {}}</tool_call>', "Let me check.",
     [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("now", "{}")]),
    # Arguments before the name; braces and escaped quotes inside strings.
    (HermesToolParser(), '<tool_call>{"arguments": {"q": "a } \\" {", "n": [1, {"x": null}]}, '
                         '"name": "search"}</tool_call>', None,
     [("search", '{"q": "a } \\" {", "n": [1, {"x": null}]}')]),
    # No closing tag (the model stopped after the object): still a call.
    (HermesToolParser(), '<tool_call>{"name": "f", "arguments": {"é": "ü"}}', None,
     [("f", '{"é": "ü"}')]),
    # Arguments written as a JSON string holding the object.
    (HermesToolParser(), '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None,
     [("f", '{"a": 1}')]),
    (HermesToolParser(), "No tools needed: 2 < 3 and <tool is not a tag.", None, []),
    (HermesToolParser(), "text ending in a partial tag <tool_ca", None, []),
    # Malformed call: all of it is content.
    (HermesToolParser(), '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>', None, []),
    (HermesToolParser(), '<tool_call>{"name": 5, "arguments": {}}</tool_call>', None, []),
    (HermesToolParser(), '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', None, []),
    # No arguments: an empty object, as OpenAI's arguments are always JSON.
    (HermesToolParser(), '<tool_call>{"name": "now"}</tool_call>', None, [("now", "{}")]),
    # Not JSON a response can carry, or not one call: all content, no 500.
    (HermesToolParser(), '<tool_call>{"name": "get\\_weather"}</tool_call>', None, []),
    (HermesToolParser(), '<tool_call>{"name": "\\ud800", "arguments": {}}</tool_call>', None, []),
    (HermesToolParser(), '<tool_call>{"na\\qme": 1}</tool_call>', None, []),
    (HermesToolParser(), '<tool_call>{"name": "f", "arguments": "{\n}"}</tool_call>', None, []),
    (HermesToolParser(), '<tool_call>{"name": "f", "arguments": }</tool_call>', None, []),
    (HermesToolParser(), '<tool_call>{"name": "f" "arguments": {}}</tool_call>', None, []),
    (HermesToolParser(), '<tool_call>{"name": "f", "arguments": {"a": 1}, "arguments": {"b": 2}}'
                         '</tool_call>', None, []),
    (HermesToolParser(), '<tool_call>{}</tool_call>', None, []),
    # Cut off inside a call before its name: all content.
    (HermesToolParser(), 'Hello <tool_call>\n{"na', None, []),
    (Llama3JsonToolParser(), '{"name": "f', None, []),
    (Llama3JsonToolParser(), '{"name": "get_weather", "parameters": {"city": "Oslo"}}', None,
     [("get_weather", '{"city": "Oslo"}')]),
    (Llama3JsonToolParser(), '<|python_tag|>{"name": "a", "parameters": {"x": [1, 2]}}; '
                             '{"name": "b", "parameters": {}}', None,
     [("a", '{"x": [1, 2]}'), ("b", "{}")]),
    (Llama3JsonToolParser(), "The answer is 4.", None, []),
    (Llama3JsonToolParser(), '{"name": "a", "parameters": {}} and then some text', None, []),
    (CallArrayParser(), '[{"name": "a", "parameters": {"q": 1}}, {"name": "b", "parameters": {}}]',
     None, [("a", '{"q": 1}'), ("b", "{}")]),
    (NamedCallParser("lookup"), '{\n  "term": "pllm"\n}\n', None,
     [("lookup", '{\n  "term": "pllm"\n}')]),
]


def _reassemble(parser, pieces: list[str]) -> tuple[str, dict[int, list]]:
    stream = ToolCallStream(parser)
    text, content, calls = "", "", {}
    for k, piece in enumerate(pieces):
        text += piece
        delta, deltas = stream.update(text, finished=k == len(pieces) - 1)
        content += delta
        for d in deltas:
            if "id" in d:
                assert d["index"] not in calls and d["type"] == "function"
                calls[d["index"]] = [d["id"], d["function"]["name"], ""]
            calls[d["index"]][2] += d["function"]["arguments"]
    return content, calls


def _cuts(text: str, rng: random.Random) -> list[list[str]]:
    """The text one character at a time, in one piece, and in random pieces."""
    ways = [list(text), [text]]
    for _ in range(5):
        bounds = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        ways.append([text[a:b] for a, b in zip([0] + bounds, bounds + [len(text)])])
    return ways


@pytest.mark.parametrize("parser,text,content,calls", CASES)
def test_final_calls(parser, text, content, calls):
    found = final_calls(parser, text)
    assert [(name, arguments) for _, name, arguments in found.calls] == calls
    assert found.content == (content if calls else text)
    for _, _, arguments in found.calls:
        assert isinstance(json.loads(arguments), dict)
    assert len({call_id for call_id, _, _ in found.calls}) == len(calls)


# Malformed only after a call's name was streamed: a stream cannot take back
# what it sent (the non-streamed answer gives all the text as content).
MALFORMED_LATE = {'<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>',
                  '<tool_call>{"name": "f", "arguments": }</tool_call>',
                  '<tool_call>{"name": "f", "arguments": "{\n}"}</tool_call>',
                  '<tool_call>{"name": "f" "arguments": {}}</tool_call>',
                  '<tool_call>{"name": "f", "arguments": {"a": 1}, "arguments": {"b": 2}}'
                  '</tool_call>',
                  '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
                  '{"name": "a", "parameters": {}} and then some text'}


@pytest.mark.parametrize("parser,text,content,calls",
                         [c for c in CASES if c[1] not in MALFORMED_LATE])
def test_streamed_deltas_reassemble_to_the_final_calls(parser, text, content, calls):
    rng = random.Random(text)
    for pieces in _cuts(text, rng):
        streamed_content, streamed = _reassemble(parser, pieces)
        assert [(name, args) for _, name, args in streamed.values()] == calls, pieces
        if calls:
            assert streamed_content.strip() == (content or "")
        else:
            assert streamed_content == text


def test_content_never_shows_the_start_of_a_call():
    stream = ToolCallStream(HermesToolParser())
    text = f"Checking.<tool_call>{WEATHER}</tool_call>"
    shown = ""
    for k in range(1, len(text) + 1):
        shown += stream.update(text[:k])[0]
        assert "<" not in shown


def test_arguments_stream_as_they_are_written():
    """The arguments of a call arrive in many deltas, not at its end."""
    stream = ToolCallStream(HermesToolParser())
    text = f"<tool_call>{WEATHER}</tool_call>"
    chunks = [stream.update(text[:k])[1] for k in range(1, len(text) + 1)]
    argument_deltas = [d for deltas in chunks for d in deltas if d["function"]["arguments"]]
    assert len(argument_deltas) > 10


def test_unknown_parser_names_the_known_ones():
    with pytest.raises(ValueError, match="hermes, llama3_json"):
        get_tool_parser("mistral")


def test_one_call_allowed_keeps_the_first_whatever_follows():
    """parallel_tool_calls false: the first call, streamed and final alike,
    even when a second one is cut off."""
    text = f"<tool_call>{WEATHER}</tool_call>\n<tool_call>" + '{"name": "now", "argu'
    found = final_calls(HermesToolParser(), text, max_calls=1)
    assert [(n, a) for _, n, a in found.calls] == [
        ("get_weather", '{"city": "Paris", "unit": "celsius"}')]
    stream = ToolCallStream(HermesToolParser(), max_calls=1)
    deltas = [d for k in range(1, len(text) + 1)
              for d in stream.update(text[:k], finished=k == len(text))[1]]
    assert {d["index"] for d in deltas} == {0}
    assert "".join(d["function"]["arguments"] for d in deltas) == found.calls[0][2]
