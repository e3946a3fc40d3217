"""Structured outputs through the real server and the official openai
client: ``chat.completions.parse`` with a dozen pydantic models (nested
objects, enums, lists, optional fields, bounded numbers) returns a valid
object on every request, greedy and sampled, sent all at once; JSON mode
returns a JSON object; vLLM's ``structured_outputs`` field holds a
completion to a choice; a schema that does not parse is a 400 naming
``response_format``. SmolLM2-135M-Instruct, the default model."""

from __future__ import annotations

import enum
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")
from pydantic import BaseModel, Field  # noqa: E402
from server_utils import running_server  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"


class Colour(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population_millions: int = Field(ge=0, le=100)


class Paint(BaseModel):
    colour: Colour
    glossy: bool


class Address(BaseModel):
    street: str = Field(max_length=40)
    number: int = Field(ge=1, le=9999)


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=120)
    address: Address
    nickname: Optional[str] = Field(default=None, max_length=20)


class Shopping(BaseModel):
    items: list[str] = Field(max_length=4)
    urgent: bool


class Reading(BaseModel):
    sensor: Literal["temperature", "humidity", "pressure"]
    value: float = Field(ge=-50, le=50)


class Review(BaseModel):
    stars: int = Field(ge=1, le=5)
    summary: str = Field(max_length=60)
    recommend: bool


class Meeting(BaseModel):
    title: str = Field(max_length=40)
    day: Literal["monday", "tuesday", "wednesday", "thursday", "friday"]
    attendees: list[str] = Field(max_length=3)


class Pet(BaseModel):
    species: Literal["cat", "dog", "fish"]
    name: str = Field(max_length=20)
    age_years: int = Field(ge=0, le=30)


class Household(BaseModel):
    pets: list[Pet] = Field(max_length=2)
    city: str = Field(max_length=30)


class Answer(BaseModel):
    answer: int = Field(ge=0, le=1000)
    sure: Optional[bool] = None


class Book(BaseModel):
    title: str = Field(max_length=40)
    author: str = Field(max_length=30)
    year: int = Field(ge=1000, le=2030)
    genres: list[Literal["fiction", "history", "science", "poetry"]] = Field(max_length=2)


CASES = [
    (City, "Describe Paris."), (Paint, "Pick a paint for a kitchen."),
    (Person, "Invent a person and where they live."), (Shopping, "Write a shopping list."),
    (Reading, "Report a sensor reading."), (Review, "Review a pizza restaurant."),
    (Meeting, "Plan a team meeting."), (Pet, "Describe a pet."),
    (Household, "Describe a household with pets."), (Answer, "What is 12 + 30?"),
    (Book, "Recommend a book."), (Address, "Give an address in London."),
]


@pytest.fixture(scope="module")
def server():
    with running_server(["--kv-cache-memory", "1GiB", "--max-model-len", "2048"]) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.slow
def test_parse_returns_a_valid_object_for_every_model(client):
    def one(case_and_temperature):
        (model, prompt), temperature = case_and_temperature
        completion = client.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": prompt}], response_format=model,
            temperature=temperature, seed=7, max_tokens=300)
        choice = completion.choices[0]
        return model, choice.finish_reason, choice.message.parsed

    work = [(case, t) for case in CASES for t in (0.0, 0.9)]
    with ThreadPoolExecutor(len(work)) as pool:  # all at once: one batch
        results = list(pool.map(one, work))
    for model, finish_reason, parsed in results:
        assert finish_reason == "stop"
        assert isinstance(parsed, model)
        model.model_validate(parsed.model_dump())  # bounds, enums, lengths


@pytest.mark.slow
def test_json_mode_returns_a_json_object(client):
    # Greedy, and a question SmolLM2 answers briefly (free-form JSON can
    # otherwise run to max_tokens inside a long string).
    prompt = "Reply in JSON: what is the capital of France?"
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}],
        response_format={"type": "json_object"}, max_tokens=300, temperature=0.0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.slow
def test_vllms_structured_outputs_field_on_completions(client):
    completion = client.completions.create(
        model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=10, temperature=0.9,
        n=3, seed=1, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert sorted({c.text for c in completion.choices}) <= ["no", "yes"]
    assert all(c.finish_reason == "stop" for c in completion.choices)


def test_a_bad_schema_is_a_400_naming_response_format(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "x", "schema": {"type": "object",
                                                                         "properties": 5}}}}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and "invalid json" in error["message"]
    body["response_format"] = {"type": "yaml"}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    body["response_format"] = None
    body["structured_outputs"] = {"regex": "[a-"}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_logit_bias_reaches_the_sampler(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0,
            "logit_bias": {"28": 100}, "ignore_eos": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    want = httpx.post(f"{server.url}/detokenize", json={"tokens": [28] * 4},
                      timeout=60).json()["prompt"]
    assert r.json()["choices"][0]["text"] == want
    body["logit_bias"] = {"token": 1}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


def test_best_of_returns_the_n_samples_of_highest_logprob_per_token(server):
    """best_of=4, n=2: the same four seeded samples as n=4, of which the two
    with the highest mean token logprob, best first; usage counts all four."""
    url = f"{server.url}/v1/completions"
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0,
            "seed": 11, "logprobs": 0}
    four = httpx.post(url, json={**body, "n": 4}, timeout=120).json()
    mean = {c["text"]: sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"])
            for c in four["choices"]}
    best = httpx.post(url, json={**body, "n": 2, "best_of": 4}, timeout=120).json()
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert [c["text"] for c in best["choices"]] == sorted(mean, key=mean.get, reverse=True)[:2]
    assert best["usage"]["completion_tokens"] == four["usage"]["completion_tokens"]
    body.pop("logprobs")  # not asked for: ranked all the same, none returned
    best = httpx.post(url, json={**body, "n": 2, "best_of": 4}, timeout=120).json()
    assert [c["text"] for c in best["choices"]] == sorted(mean, key=mean.get, reverse=True)[:2]
    assert all(c["logprobs"] is None for c in best["choices"])
    for bad in ({"n": 3, "best_of": 2}, {"n": 1, "best_of": 2, "stream": True}):
        r = httpx.post(url, json={**body, **bad}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", r.text


def test_tools_without_a_tool_call_parser_need_a_forced_choice(server):
    """A server started without --enable-auto-tool-choice: tools with the
    default choice (auto) are a 400 saying which flags it needs; a named
    function still works, its arguments held to the function's schema."""
    tool = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"]}}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Add 2 and 3."}],
            "tools": [tool], "max_tokens": 40, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "tool_choice" and "--enable-auto-tool-choice" in error["message"]
    body["tool_choice"] = {"type": "function", "function": {"name": "add"}}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "add"
    assert set(json.loads(call["function"]["arguments"])) == {"a", "b"}


def test_echo_with_max_tokens_0_scores_the_prompt(client, server):
    """echo with max_tokens 0: the prompt's text and its tokens' logprobs
    (the same as a request that also generates gives), and no completion."""
    prompt = "The capital of France is Paris."
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True,
                                       logprobs=2, temperature=0)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == prompt and len(lp.tokens) == scored.usage.prompt_tokens
    generated = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True,
                                          logprobs=2, temperature=0).choices[0].logprobs
    assert generated.token_logprobs[:len(lp.tokens)] == lp.token_logprobs
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompt
    r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
