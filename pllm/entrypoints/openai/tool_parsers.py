"""Tool calls in a model's text: the parsers ``--tool-call-parser`` names,
and the streaming of their results as OpenAI's ``tool_calls`` deltas.

A parser reads the text generated so far and says what of it is content
(text for the user) and which calls it holds, each with its name (once
complete) and the raw text of its arguments so far. It reads the whole text
every time, so that streaming and the final answer come from one reading:
the arguments streamed are always a prefix of the final ones, and the
deltas of a stream reassemble to exactly what a non-streamed request
returns. Content stops short of anything that may be the start of a call.
A call found malformed only after its name was streamed stays sent (a
stream cannot take back), while the non-streamed answer of that text is
all content, as for a model that wrote no call.

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  after optional content, as Hermes, Qwen 2.5/3 and other ChatML tool
  templates have models write.
- ``llama3_json``: the text is one or more ``{"name": ..., "parameters":
  {...}}`` objects separated by ``;``, optionally after ``<|python_tag|>``
  (Llama 3.1+ JSON tool calling).

``tool_choice`` ``required`` and a named function do not need a parser:
their output is held by a grammar to a JSON array of calls
(:class:`CallArrayParser`) or to the function's arguments.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

# A call object's key for its arguments: OpenAI's name, and Llama 3's.
_ARGUMENT_KEYS = ("arguments", "parameters")
_WHITESPACE = " \t\r\n"


@dataclass
class CallText:
    """One tool call as far as the text has written it."""

    name: str | None = None  # None until the name's string is complete
    arguments: str = ""  # the raw JSON text of the arguments so far
    complete: bool = False  # the call's object is closed
    # The arguments were written as a JSON string holding the JSON (some
    # models do): not streamed until complete, then its decoded text.
    quoted: bool = False


@dataclass
class Parsed:
    content: str  # text before the first call, less what may begin one
    calls: list[CallText] = field(default_factory=list)
    # The text is nothing but well-formed calls (and content): at the end,
    # these are the calls; otherwise the whole text is content.
    valid: bool = True


def _string_end(text: str, i: int) -> int | None:
    """The index after the JSON string starting at ``text[i] == '"'``; None if unclosed."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """The index after the JSON value starting at ``text[i]``; None while
    the text may still continue it (an open object, array or string, or a
    literal at the very end)."""
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c in "{[":
        depth = 0
        while i < len(text):
            c = text[i]
            if c == '"':
                end = _string_end(text, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}]" + _WHITESPACE:
        j += 1
    return j if j < len(text) else None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _json_string(literal: str) -> str | None:
    """A JSON string literal's text; None when it is not one a response can
    carry (a bad escape, a raw control character, a lone surrogate)."""
    try:
        value = json.loads(literal)
        value.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return None
    return value if isinstance(value, str) else None


def scan_call(text: str, i: int) -> tuple[CallText, int | None, bool]:
    """The call object starting at ``text[i] == '{'``: what of it is
    written, the index after it (None while open), and whether it is
    well-formed so far: an object of a string ``name`` and, optionally
    (``{}`` when absent), arguments that are a JSON object, each once;
    other members are skipped."""
    call = CallText()
    seen: set[str] = set()
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "}":
        return call, None, False  # no name
    while True:
        if i >= len(text):
            return call, None, True
        if text[i] != '"':
            return call, None, False
        key_end = _string_end(text, i)
        if key_end is None:
            return call, None, True
        key = _json_string(text[i:key_end])
        if key is None:
            return call, None, False
        if key in seen or (key in _ARGUMENT_KEYS and seen & set(_ARGUMENT_KEYS)):
            return call, None, False  # which one would count is anyone's guess
        seen.add(key)
        i = _skip_ws(text, key_end)
        if i >= len(text):
            return call, None, True
        if text[i] != ":":
            return call, None, False
        i = _skip_ws(text, i + 1)
        if i >= len(text):
            return call, None, True
        end = _value_end(text, i)
        if end == i:
            return call, None, False  # no value
        if key == "name":
            if text[i] != '"':
                return call, None, False
            if end is not None:
                call.name = _json_string(text[i:end])
                if call.name is None:
                    return call, None, False
        elif key in _ARGUMENT_KEYS:
            call.quoted = text[i] == '"'
            raw = text[i:] if end is None else text[i:end]
            if not call.quoted:
                call.arguments = raw
            elif end is not None:
                arguments = _json_string(raw)
                if arguments is None:
                    return call, None, False
                call.arguments = arguments
        if end is None:
            return call, None, True
        i = _skip_ws(text, end)
        if i >= len(text):
            return call, None, True
        if text[i] == "}":
            call.complete = True
            if not seen & set(_ARGUMENT_KEYS):
                call.arguments = "{}"
            return call, i + 1, call.name is not None and _valid_arguments(call)
        if text[i] != ",":
            return call, None, False
        i = _skip_ws(text, i + 1)


def _valid_arguments(call: CallText) -> bool:
    try:
        return isinstance(json.loads(call.arguments), dict)
    except ValueError:
        return False


def _complete(parsed: Parsed, max_calls: int | None) -> list[CallText] | None:
    """The calls a finished text made: the first ``max_calls`` (all: None),
    if each is a complete, well-formed call and the text is nothing else;
    None otherwise. Calls past ``max_calls`` are dropped, as they are when
    streamed, whatever they hold."""
    calls = parsed.calls[:max_calls]
    if not calls or not all(c.complete for c in calls):
        return None
    if not parsed.valid and (max_calls is None or len(parsed.calls) <= max_calls):
        return None
    return calls


def _held_back(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` may be the start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolParser:
    name = ""

    def parse(self, text: str) -> Parsed:
        raise NotImplementedError


def _scan_calls(text: str, i: int, out: Parsed, sep: str | None) -> int | None:
    """Call objects from ``text[i] == '{'`` on, each appended to ``out``,
    one after another with ``sep`` between them (None: just one): the index
    of what follows the last of them, for the caller to judge; None when the
    text ends first or is malformed (``out.valid`` then says which)."""
    while True:
        call, after, ok = scan_call(text, i)
        out.calls.append(call)
        if not ok:
            out.valid = False
            return None
        if after is None:
            return None
        i = _skip_ws(text, after)
        if i >= len(text):
            return None
        if sep is None or text[i] != sep:
            return i
        i = _skip_ws(text, i + 1)
        if i >= len(text):
            return None
        if text[i] != "{":
            out.valid = False
            return None


class HermesToolParser(ToolParser):
    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"

    def parse(self, text: str) -> Parsed:
        first = text.find(self.start)
        if first < 0:
            return Parsed(text[:len(text) - _held_back(text, self.start)])
        out = Parsed(text[:first])
        i = first
        while i >= 0:
            i = _skip_ws(text, i + len(self.start))
            if i >= len(text):
                return out
            if text[i] != "{":
                out.valid = False
                return out
            i = _scan_calls(text, i, out, None)
            if i is None:
                return out
            closing = text[i:i + len(self.end)]
            if not self.end.startswith(closing):
                out.valid = False
                return out
            if len(closing) < len(self.end):
                return out
            i = text.find(self.start, i + len(self.end))
        return out


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    tag = "<|python_tag|>"

    def parse(self, text: str) -> Parsed:
        i = _skip_ws(text, 0)
        if text.startswith(self.tag, i):
            i = _skip_ws(text, i + len(self.tag))
        elif self.tag.startswith(text[i:]) and i < len(text):
            return Parsed("")  # may yet be the tag
        if i >= len(text):
            return Parsed("")
        if text[i] != "{":
            return Parsed(text)
        out = Parsed("")
        if _scan_calls(text, i, out, ";") is not None:
            out.valid = False  # anything but another call after one
        return out


class CallArrayParser(ToolParser):
    """``tool_choice: required``: the grammar holds the output to a JSON
    array of ``{"name": ..., "parameters": {...}}``."""

    name = "required"

    def parse(self, text: str) -> Parsed:
        out = Parsed("")
        i = _skip_ws(text, 0)
        if i >= len(text):
            return out
        if text[i] != "[":
            out.valid = False
            return out
        i = _skip_ws(text, i + 1)
        if i >= len(text) or text[i] == "]":
            return out
        if text[i] != "{":
            out.valid = False
            return out
        i = _scan_calls(text, i, out, ",")
        if i is not None and text[i] != "]":
            out.valid = False
        return out


class NamedCallParser(ToolParser):
    """A named ``tool_choice``: the whole output is that function's
    arguments (held by a grammar to its parameters' schema)."""

    def __init__(self, function: str) -> None:
        self.function = function

    def parse(self, text: str) -> Parsed:
        call = CallText(name=self.function, arguments=text.lstrip(_WHITESPACE))
        call.complete = bool(call.arguments) and _value_end(call.arguments, 0) is not None
        return Parsed("", [call], valid=not call.complete or _valid_arguments(call))


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; "
                         f"choose from {', '.join(sorted(TOOL_PARSERS))}") from None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class FinalCalls:
    content: str | None
    calls: list[tuple[str, str, str]]  # (id, name, arguments)


def final_calls(parser: ToolParser, text: str, max_calls: int | None = None) -> FinalCalls:
    """The message of a finished choice: its calls (the first ``max_calls``),
    if the text is well-formed calls (after optional content); otherwise all
    its text as content, as a model that wrote no call."""
    parsed = parser.parse(text)
    calls = _complete(parsed, max_calls)
    if calls is None:
        return FinalCalls(text, [])
    content = parsed.content.strip() or None
    return FinalCalls(content, [(new_call_id(), c.name, c.arguments.strip()) for c in calls])


class ToolCallStream:
    """One streamed choice: each :meth:`update` with the text so far gives
    the content not yet sent and the tool-call deltas (OpenAI's
    ``{"index", "id", "type", "function": {"name", "arguments"}}``)."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None) -> None:
        self.parser = parser
        self.max_calls = max_calls
        self.sent_content = 0
        self.ids: list[str] = []
        self.sent_arguments: list[int] = []  # characters of each call's arguments sent

    def update(self, text: str, finished: bool = False) -> tuple[str, list[dict]]:
        """``finished``: the text is final, and what was held back as a
        possible start of a call is content after all, when no call came."""
        parsed = self.parser.parse(text)
        shown = parsed.content
        if finished and not self.ids and _complete(parsed, self.max_calls) is None:
            shown = text  # no call after all: all of it is content, as final_calls says
        content = shown[self.sent_content:]
        self.sent_content = max(self.sent_content, len(shown))
        deltas = []
        for k, call in enumerate(parsed.calls[:self.max_calls] if parsed.valid else ()):
            if k == len(self.ids):
                if call.name is None:
                    break
                self.ids.append(new_call_id())
                self.sent_arguments.append(0)
                deltas.append({"index": k, "id": self.ids[k], "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            if call.quoted and not call.complete:
                continue
            arguments = call.arguments.strip() if call.complete else call.arguments
            new = arguments[self.sent_arguments[k]:]
            if new:
                self.sent_arguments[k] = len(arguments)
                if deltas and deltas[-1]["index"] == k:
                    deltas[-1]["function"]["arguments"] += new
                else:
                    deltas.append({"index": k, "function": {"arguments": new}})
        return content, deltas
