"""Incremental detokenization: multi-byte UTF-8, BPE and sentencepiece spacing."""

from __future__ import annotations

import pytest
from tokenizers import SentencePieceBPETokenizer
from transformers import PreTrainedTokenizerFast

from pllm import SamplingParams
from pllm.core.detokenizer import Detokenizer, find_stop_string, visible_text
from pllm.core.request import Request, Sequence
from pllm.loader.testing import make_tiny_tokenizer

TEXTS = ["héllo wörld → 日本語 🎉 ok", "  two  spaces, and\nnewlines\n\n", "Paris. The dog."]


def sentencepiece_tokenizer():
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(["hello world the dog sleeps", "Paris is the capital"], vocab_size=120,
                           show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp)


def stream(tokenizer, prompt: str, completion: str, **params):
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    out_ids = tokenizer.encode(completion, add_special_tokens=False)
    req = Request("r", prompt, prompt_ids, SamplingParams(**params), frozenset())
    seq = Sequence(req, 0, list(prompt_ids), len(prompt_ids))
    detok = Detokenizer(tokenizer)
    detok.start(seq)
    deltas = []
    for tid in out_ids:
        seq.token_ids.append(tid)
        deltas.append(detok.step(seq))
    return seq, deltas, out_ids


@pytest.mark.parametrize("make,text", [(make_tiny_tokenizer, t) for t in TEXTS] + [
    (sentencepiece_tokenizer, "hello world the dog"), (sentencepiece_tokenizer, " Paris is the capital")])
def test_stream_equals_full_decode(make, text):
    tok = make()
    seq, deltas, out_ids = stream(tok, "hello", text)
    # The completion's text is what decoding it after the prompt adds: a
    # sentencepiece word keeps its leading space even as the first output token.
    prompt_ids = seq.token_ids[: seq.num_prompt_tokens]
    expected = tok.decode(prompt_ids + out_ids)[len(tok.decode(prompt_ids)):]
    assert "".join(deltas) == seq.text == expected
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_are_held_until_complete():
    tok = make_tiny_tokenizer()
    seq, deltas, out_ids = stream(tok, "x", "🎉")
    assert len(out_ids) > 1  # one emoji, several byte tokens
    assert deltas[:-1] == [""] * (len(out_ids) - 1) and deltas[-1] == "🎉"


def test_stop_string_is_cut_and_never_visible_early():
    tok = make_tiny_tokenizer()
    prompt_ids = tok.encode("Q:", add_special_tokens=False)
    req = Request("r", "Q:", prompt_ids, SamplingParams(stop=["dog"]), frozenset())
    seq = Sequence(req, 0, list(prompt_ids), len(prompt_ids))
    detok = Detokenizer(tok)
    detok.start(seq)
    shown = []
    for tid in tok.encode(" the lazy dog sleeps", add_special_tokens=False):
        seq.token_ids.append(tid)
        stop = find_stop_string(seq, detok.step(seq))
        shown.append(visible_text(seq))
        if stop:
            break
    assert stop == "dog" and seq.text == " the lazy "
    assert all("d" not in s[len(" the lazy "):] for s in shown)  # the stop string never leaked
