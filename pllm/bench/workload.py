"""The standard request mixes of the benchmarks.

Lengths are drawn per request as ``(prompt_len, output_len)`` pairs from
``random.Random(seed)``, so the default throughput workload (64 requests,
prompts in [16, 256], outputs in [32, 128], seed 0) is always 9,703 prompt
tokens and 4,962 output tokens, whatever the prompt source.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

# Several paragraphs of plain English prose: `--dataset text` cuts prompts of
# the drawn lengths out of its token stream (repeated as needed).
BUILTIN_TEXT = """\
The lighthouse stood at the end of a long spit of sand, and for most of the year the only
visitors were gulls. Its keeper kept a log of the weather in a leather book: the direction of
the wind at dawn, the height of the swell, the colour of the sky when the lamp was lit. Over
forty years the entries grew shorter, but they never stopped, and when the light was finally
automated the book was sent to a museum in the town, where it sits in a glass case beside a
brass telescope and a chart of the coast.

A river begins as rain on a hillside. Water gathers in the hollows, finds the cracks in the
rock, and runs downhill along whatever path offers the least resistance. Small streams join
into larger ones; the larger ones cut valleys, carry sediment, and lay it down again where the
current slows. Over thousands of years the river moves across its plain like a rope shaken at
one end, leaving oxbow lakes and terraces behind it as a record of where it used to be.

To bake bread, mix flour, water, salt and yeast into a rough dough and let it rest. Knead it
until it is smooth and springs back when pressed, then leave it covered in a warm place until
it has doubled in size. Shape the loaf, let it rise a second time, and bake it in a hot oven
until the crust is brown and the bottom sounds hollow when tapped. Let it cool before slicing,
or the crumb will be gummy.

Computers store numbers in binary, as sequences of bits that are either on or off. An integer
is a fixed number of bits read as a sum of powers of two; a floating point number splits its
bits into a sign, an exponent and a fraction, which lets it represent both very large and very
small values at the cost of exactness. Most of the surprises people meet in numerical code,
such as a sum that depends on the order of its terms, come from that trade.

The market opened early on Saturdays. Farmers backed their vans into the square before
sunrise and set up tables of apples, cheese, eggs and cut flowers; a baker sold bread from the
back of a bicycle; an old man repaired umbrellas under the arches of the town hall. By nine
o'clock the square was full, and by noon most of the stalls were packing up, leaving only the
pigeons and a few cabbage leaves on the cobbles.
"""


# `--dataset grounded`: requests whose answers copy from their prompts (rewrite,
# extract, edit code), as a chat model is asked them: the workload where
# prompt-lookup speculation (an n-gram proposer) has something to find.
_CODE = """\
def summarise(readings):
    total = 0
    count = 0
    for value in readings:
        if value is None:
            continue
        total += value
        count += 1
    if count == 0:
        return None
    mean = total / count
    spread = max(r for r in readings if r is not None) - min(r for r in readings if r is not None)
    return {"mean": mean, "spread": spread, "count": count}
"""
GROUNDED_TASKS = (
    "Repeat the following paragraph exactly as it is written:\n\n{text}",
    "Rewrite the following paragraph in the present tense, keeping everything else the "
    "same:\n\n{text}",
    "Copy out every sentence of the following text that contains a number or a colour:\n\n{text}",
    "In the following Python function, rename the variable `total` to `acc` and give back the "
    "whole function:\n\n```python\n" + _CODE + "```",
    "Add a docstring to the following Python function and give back the whole function:"
    "\n\n```python\n" + _CODE + "```",
)


def grounded_prompts(tokenizer, num_requests: int, seed: int) -> list[list[int]]:
    """``num_requests`` chat prompts from ``GROUNDED_TASKS`` over the
    paragraphs of ``BUILTIN_TEXT``, in a seeded order (chat-templated when the
    tokenizer has a template)."""
    paragraphs = [p.replace("\n", " ") for p in BUILTIN_TEXT.strip().split("\n\n")]
    cases = [task.format(text=text) for task in GROUNDED_TASKS for text in paragraphs
             if "{text}" in task] + [task for task in GROUNDED_TASKS if "{text}" not in task]
    random.Random(seed + 1).shuffle(cases)
    prompts = []
    for i in range(num_requests):
        content = cases[i % len(cases)]
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer.encode(content)
        prompts.append(list(ids))
    return prompts


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int  # tokens the request asks for (generated with ignore_eos)
    schema: dict | None = None  # a JSON schema its output is held to (structured outputs)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


class WorkloadError(ValueError):
    """A workload option a user can get wrong (a bad range or dataset)."""


def parse_range(text: str, name: str) -> tuple[int, int]:
    """``"16,256"`` or ``"16:256"`` or ``"64"`` -> an inclusive (lo, hi) of positive ints."""
    parts = text.replace(":", ",").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise WorkloadError(
            f"{name} must be LO,HI or N (positive integers), got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not 1 <= values[0] <= values[1]:
        raise WorkloadError(f"{name} must be LO,HI with 1 <= LO <= HI, got {text!r}")
    return values[0], values[1]


def sample_lengths(num_requests: int, input_range: tuple[int, int],
                   output_range: tuple[int, int], seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(*input_range), rng.randint(*output_range)) for _ in range(num_requests)]


def special_token_ids(tokenizer) -> set[int]:
    """Ids a random prompt must avoid: special and added (control) tokens."""
    ids = set(tokenizer.all_special_ids)
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    return ids


def random_token_prompts(lengths: list[int], vocab_size: int, avoid: set[int],
                         seed: int) -> list[list[int]]:
    allowed = [t for t in range(vocab_size) if t not in avoid]
    if not allowed:
        raise WorkloadError(f"no ordinary tokens in a vocabulary of {vocab_size}")
    rng = random.Random(seed + 1)  # its own stream: the lengths do not depend on the source
    return [[rng.choice(allowed) for _ in range(n)] for n in lengths]


def text_prompts(lengths: list[int], token_stream: list[int], seed: int) -> list[list[int]]:
    """Windows of ``token_stream`` (repeated to fit) at random offsets."""
    if not token_stream:
        raise WorkloadError("the prompt text encodes to no tokens")
    longest = max(lengths, default=0)
    stream = token_stream * (longest // len(token_stream) + 2)
    rng = random.Random(seed + 1)
    prompts = []
    for n in lengths:
        start = rng.randrange(len(token_stream))
        prompts.append(stream[start:start + n])
    return prompts


def build_requests(tokenizer, vocab_size: int, *, num_requests: int,
                   input_range: tuple[int, int], output_range: tuple[int, int],
                   seed: int = 0, dataset: str = "random",
                   prompt_seed: int | None = None) -> list[BenchRequest]:
    """``dataset``: ``random`` (token ids drawn uniformly from the ordinary vocabulary),
    ``text`` (the built-in English prose), ``grounded`` (chat requests whose
    answers copy from their prompts; their lengths are the prompts' own, the
    input range is not used) or a path to a UTF-8 text file.
    ``prompt_seed`` (default ``seed``) draws the prompts' tokens: another value
    gives the same lengths with other prompts."""
    content_seed = seed if prompt_seed is None else prompt_seed
    if num_requests < 1:
        raise WorkloadError(f"the number of prompts must be >= 1, got {num_requests}")
    pairs = sample_lengths(num_requests, input_range, output_range, seed)
    lengths = [p for p, _ in pairs]
    if dataset == "random":
        # The embedding may be padded past the tokenizer; ids it cannot decode are no prompt.
        num_ids = min(vocab_size, len(tokenizer))
        prompts = random_token_prompts(lengths, num_ids, special_token_ids(tokenizer), content_seed)
    elif dataset == "grounded":
        prompts = grounded_prompts(tokenizer, num_requests, content_seed)
    else:
        if dataset == "text":
            text = BUILTIN_TEXT
        else:
            try:
                with open(dataset, encoding="utf-8") as f:
                    text = f.read()
            except OSError as exc:
                raise WorkloadError(
                    f"dataset {dataset!r} is neither 'random', 'text', 'grounded' nor a readable "
                    f"text file: {exc}"
                ) from None
        prompts = text_prompts(lengths, tokenizer.encode(text, add_special_tokens=False), content_seed)
    return [BenchRequest(p, o) for p, (_, o) in zip(prompts, pairs)]


def workload_summary(requests: list[BenchRequest]) -> dict:
    return {
        "num_requests": len(requests),
        "num_prompt_tokens": sum(r.prompt_len for r in requests),
        "num_output_tokens": sum(r.output_len for r in requests),
    }


def json_schema(index: int) -> dict:
    """The ``--structured-output json`` schema of request ``index``: one of
    eight (a schema per request, the compiler's cache sees repeats), each
    an object holding an array of bounded integers and short labels too
    long to close before any output length of the workload (at least 200
    items, so every request runs to its length, as without the schema)."""
    kind = index % 8
    item = {"type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999 + kind},
                           "label": {"type": "string", "maxLength": 8 + kind}},
            "required": ["id", "label"], "additionalProperties": False}
    return {"type": "object", "properties": {f"readings_{kind}": {
                "type": "array", "items": item, "minItems": 200}},
            "required": [f"readings_{kind}"], "additionalProperties": False}


def with_schemas(requests: list[BenchRequest]) -> list[BenchRequest]:
    """The same requests, each held to its :func:`json_schema`."""
    return [dataclasses.replace(r, schema=json_schema(i)) for i, r in enumerate(requests)]
