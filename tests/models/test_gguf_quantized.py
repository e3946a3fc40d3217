"""GGUF weights kept in their block formats (``--quantization gguf``): the
engine on the CPU kernels against transformers run on the same file's
dequantized weights, in every format, mixed formats and tensor parallelism;
the loader-to-layer plumbing; and the choice between kept and dequantized."""

from __future__ import annotations

import logging
import os
import random
import shutil
from types import SimpleNamespace

import pytest
import torch

from pllm import LLM, SamplingParams
from pllm.core.interfaces import PlatformCapabilities
from pllm.core.resolve import resolve_quantization
from pllm.loader.testing import make_tiny_gguf, make_tiny_model
from pllm.models import describe_model
from pllm.models.quant import (
    GGUF_FORMATS,
    GGUFWeight,
    QuantEmbedding,
    QuantLinear,
    cat_rows,
    quant_modules,
    reference_matmul,
)
from pllm.testing.e2e import hf_greedy

# The engine's layers on the compiled kernel (the fallback is tested on its own).
needs_kernel = pytest.mark.skipif(
    shutil.which("g++") is None or os.environ.get("PLLM_CPU_KERNELS") == "0",
    reason="the CPU GGUF kernel needs g++ (and PLLM_CPU_KERNELS not 0)")

# Rows of 256 values (the K formats' blocks), 64-wide heads.
CONFIG = dict(hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4,
              num_key_value_heads=2)
MAX_NEW = 10
PROMPT_LENS = (3, 18, 41)


def q4_k_m(name: str) -> str:
    """llama.cpp's Q4_K_M mix, in small: V and the MLP's down projection in
    Q6_K, the other matrices in Q4_K, the embedding in Q8_0."""
    if "attn_v" in name or "ffn_down" in name:
        return "Q6_K"
    return "Q8_0" if name.startswith("token_embd") else "Q4_K"


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLLM_CACHE_DIR", str(tmp_path_factory.mktemp("pllm-cache")))
        yield


def prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, 300) for _ in range(n)] for n in PROMPT_LENS]


def file_greedy(path: str) -> list[list[int]]:
    """transformers' greedy tokens on the file's weights, dequantized by its GGUF loader."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    return hf_greedy(hf, prompts(), MAX_NEW)


def greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts(), params, use_tqdm=False)]


def engine_model(llm: LLM):
    return llm.llm_engine.executor.worker.model


@needs_kernel
@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_each_format_matches_transformers_on_the_dequantized_file(tmp_path, fmt):
    path = make_tiny_gguf(tmp_path, "llama", quant=fmt, **CONFIG)
    llm = LLM(path, device="cpu", kv_cache_memory="16MB", max_num_batched_tokens=32)
    model = engine_model(llm)
    layers = list(quant_modules(model))
    # Every projection, the embedding and the LM head stay in their blocks,
    # each multiplied by the compiled kernel (not the reference).
    assert len(layers) == 2 * 4 + 2
    assert {fmt} == set().union(*(m.formats for m in layers if isinstance(m, QuantLinear)))
    assert all(m.matmul is not reference_matmul for m in layers if isinstance(m, QuantLinear))
    assert isinstance(model.embed_tokens, QuantEmbedding)
    # Decode steps run each layer in one compiled call over the blocks.
    assert all(layer.fused is not None and layer.fused.blocks for layer in model.layers)
    # Prefill chunks of up to 32 tokens take the few-row and the tiled product.
    assert greedy(llm) == file_greedy(path)


def test_mixed_formats_keep_one_segment_each(tmp_path):
    """Q4_K_M-style: q/k in Q4_K and v in Q6_K make a q/k/v projection of two
    segments; qwen2's q/k/v biases are added after them."""
    path = make_tiny_gguf(tmp_path, "qwen2", quant=q4_k_m, **CONFIG)
    llm = LLM(path, device="cpu", kv_cache_memory="16MB")
    attn = engine_model(llm).layers[0].self_attn
    assert [s.format for s in attn.qkv_proj.segments] == ["Q4_K", "Q6_K"]
    assert attn.qkv_proj.bias is not None
    assert [s.format for s in engine_model(llm).layers[0].mlp.down_proj.segments] == ["Q6_K"]
    assert engine_model(llm).layers[0].fused is None  # two segments: module by module
    assert greedy(llm) == file_greedy(path)


def test_tensor_parallel_splits_blocks_and_dequantizes_what_does_not_split(tmp_path, caplog):
    """Two ranks: q and gate/up split by rows (any), the one KV head's rows
    replicated on both, down_proj split by its input on a block boundary
    (512 / 2 = 256: one Q6_K block); o_proj's half input (128) would cut its
    Q4_K blocks, so it is dequantized, and says so."""
    path = make_tiny_gguf(tmp_path, "llama", quant=q4_k_m, **{**CONFIG, "num_key_value_heads": 1})
    expected = file_greedy(path)
    with caplog.at_level(logging.INFO, logger="pllm"):
        llm = LLM(path, device="cpu", kv_cache_memory="16MB", tensor_parallel_size=2)
    try:
        assert greedy(llm) == expected
        layer = engine_model(llm).layers[0]
        assert isinstance(layer.self_attn.qkv_proj, QuantLinear)
        assert isinstance(layer.mlp.down_proj, QuantLinear)
        assert not isinstance(layer.self_attn.o_proj, QuantLinear)
        assert any("dequantized at load" in r.getMessage() and "Q4_K" in r.getMessage()
                   for r in caplog.records)
        assert any("kept in full precision" in r.getMessage() and "o_proj" in r.getMessage()
                   for r in caplog.records)
    finally:
        llm.shutdown()


@needs_kernel
def test_pipeline_stages_keep_their_own_blocks(tmp_path, caplog):
    """Two stages of a Q4_K_M-like file (tied head, so the last stage holds
    the Q8_0 embedding for it): transformers' tokens; rank 0 keeps its
    layer's blocks and neither loads nor dequantizes the other stage's."""
    path = make_tiny_gguf(tmp_path, "llama", quant=q4_k_m, tie_word_embeddings=True, **CONFIG)
    expected = file_greedy(path)
    with caplog.at_level(logging.INFO, logger="pllm"):
        llm = LLM(path, device="cpu", kv_cache_memory="16MB", pipeline_parallel_size=2)
    try:
        assert greedy(llm) == expected
        model = engine_model(llm)
        assert isinstance(model.layers[0].self_attn.qkv_proj, QuantLinear)
        assert isinstance(model.embed_tokens, QuantEmbedding)
        assert not list(model.layers[1].parameters())  # the other stage's
        assert not any("dequantized at load" in r.getMessage() for r in caplog.records)
    finally:
        llm.shutdown()


def test_quantization_none_and_dtype_dequantize(tmp_path):
    path = make_tiny_gguf(tmp_path, "llama", quant="Q4_1", **CONFIG)
    expected = file_greedy(path)
    for kwargs in (dict(quantization="none"), dict(dtype="float32")):
        llm = LLM(path, device="cpu", kv_cache_memory="16MB", **kwargs)
        assert llm.llm_engine.config.model.quantization == "none"
        assert not list(quant_modules(engine_model(llm)))
        assert greedy(llm) == expected


def test_the_default_model_keeps_its_q4_1_blocks_under_150_mb():
    """SmolLM2-135M's Q4_1 file: the engine's weights (blocks, norms) as the
    file holds them, the LM head reading the embedding's Q8_0 blocks."""
    llm = LLM(kv_cache_memory="64MB")
    model = engine_model(llm)
    assert llm.llm_engine.config.model.quantization == "gguf"
    storages = {}
    for module in quant_modules(model):
        for w in ([module.table] if isinstance(module, QuantEmbedding) else module.weights()):
            storages[w.data.untyped_storage().data_ptr()] = w.data.untyped_storage().nbytes()
    for p in model.parameters():
        storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    total = sum(storages.values())
    print(f"default model weights: {total / 1e6:.1f} MB")
    assert 90e6 < total < 150e6
    assert model.lm_head.segments[0].data.data_ptr() == model.embed_tokens.table.data.data_ptr()


# ---- choosing: kept, dequantized, or refused --------------------------------


def _platform(formats=()):
    return SimpleNamespace(name="testchip", capabilities=PlatformCapabilities(weight_formats=formats))


def _info(formats):
    return SimpleNamespace(weight_formats=tuple(formats))


def test_auto_keeps_the_blocks_a_platform_multiplies(caplog):
    chip = _platform(("Q4_K", "Q8_0"))
    assert resolve_quantization("auto", "auto", _info(["Q4_K"]), chip) == "gguf"
    assert resolve_quantization("auto", "auto", _info([]), chip) == "none"
    assert resolve_quantization("auto", "bfloat16", _info(["Q4_K"]), chip) == "none"
    with caplog.at_level(logging.WARNING, logger="pllm"):
        assert resolve_quantization("auto", "auto", _info(["Q4_K", "Q6_K"]), chip) == "gguf"
        assert resolve_quantization("auto", "auto", _info(["Q6_K"]), chip) == "none"
    messages = [r.getMessage() for r in caplog.records]
    assert any("does not multiply GGUF Q6_K" in m for m in messages), messages
    assert any("multiplies none of this model's GGUF formats (Q6_K; it multiplies: Q4_K, Q8_0)"
               in m for m in messages), messages


def test_gguf_is_refused_where_nothing_could_stay_quantized():
    with pytest.raises(ValueError, match=r"testchip multiplies none of this model's GGUF formats "
                                         r"\(Q4_1\); it multiplies: none"):
        resolve_quantization("gguf", "auto", _info(["Q4_1"]), _platform())
    with pytest.raises(ValueError, match="this model has none"):
        resolve_quantization("gguf", "auto", _info([]), _platform(("Q4_1",)))
    with pytest.raises(ValueError, match="float32 activations; dtype=bfloat16"):
        resolve_quantization("gguf", "bfloat16", _info(["Q4_1"]), _platform(("Q4_1",)))


def test_gguf_on_an_hf_folder_is_refused(tmp_path):
    folder = make_tiny_model(tmp_path / "m", "llama")
    with pytest.raises(ValueError, match="this model has none"):
        LLM(folder, device="cpu", kv_cache_memory="16MB", quantization="gguf")
    with pytest.raises(ValueError, match="quantization='q3' is not one of auto, none, gguf"):
        LLM(folder, device="cpu", kv_cache_memory="16MB", quantization="q3")


def test_describe_model_lists_the_formats_once(tmp_path):
    from pllm.loader import load_model

    path = make_tiny_gguf(tmp_path, "llama", quant=q4_k_m, **CONFIG)
    loaded = load_model(path)
    info = describe_model(loaded.hf_config, 1, loaded.weight_formats.values())
    assert info.weight_formats == ("Q4_K", "Q6_K", "Q8_0")


# ---- the pieces -------------------------------------------------------------


def _weight(fmt: str, rows: int, cols: int, seed: int = 0) -> GGUFWeight:
    import gguf
    import numpy as np

    from pllm.loader.testing import random_blocks

    rng = np.random.default_rng(seed)
    if fmt in ("Q4_K", "Q5_K", "Q6_K"):
        data = random_blocks(fmt, (rows, cols), rng)
    else:
        values = rng.standard_normal((rows, cols), dtype=np.float32)
        data = gguf.quants.quantize(values, gguf.GGMLQuantizationType[fmt])
    return GGUFWeight.from_blocks(torch.from_numpy(np.ascontiguousarray(data)), fmt)


def test_rows_and_columns_of_blocks():
    w = _weight("Q4_1", 6, 96)
    dense = w.dequantize()
    assert w.shape == (6, 96)
    torch.testing.assert_close(w.narrow(0, 2, 3).dequantize(), dense[2:5], rtol=0, atol=0)
    torch.testing.assert_close(w.narrow(1, 32, 64).dequantize(), dense[:, 32:], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"columns \[16, 48\) of a Q4_1 tensor cut its blocks of 32"):
        w.narrow(1, 16, 32)
    a, b = w.split([2, 4])
    joined = cat_rows([a, b])
    assert isinstance(joined, GGUFWeight) and torch.equal(joined.data, w.data)
    mixed = cat_rows([a, _weight("Q8_0", 4, 96)])
    assert isinstance(mixed, list) and len(mixed) == 2
    with pytest.raises(ValueError, match="unknown GGUF format 'Q2_K'"):
        GGUFWeight.from_blocks(w.data, "Q2_K")
    with pytest.raises(ValueError, match="not whole Q8_0 blocks of 34"):
        GGUFWeight.from_blocks(w.data, "Q8_0")


@needs_kernel
def test_a_linear_of_mixed_segments_and_the_embedding_match_the_reference():
    from pllm.platforms.cpu.gguf_linear import use_gguf_kernels

    segments = [_weight("Q4_K", 40, 256, 1), torch.randn(8, 256), _weight("Q6_K", 24, 256, 2)]
    linear = QuantLinear(256, 72, bias=True)
    linear.bias.data.normal_()
    linear.load(segments)
    table = _weight("Q8_0", 50, 256, 3)
    embedding = QuantEmbedding(50, 256)
    embedding.load(table)
    holder = torch.nn.ModuleDict({"linear": linear, "embedding": embedding})
    x = torch.randn(5, 256)
    ids = torch.tensor([[0, 49, 7], [7, 3, 3]])
    dense = torch.cat([segments[0].dequantize(), segments[1], segments[2].dequantize()])
    want_y, want_rows = x @ dense.T + linear.bias, table.dequantize()[ids]
    torch.testing.assert_close(linear(x), want_y, rtol=1e-4, atol=1e-4)  # the reference
    torch.testing.assert_close(embedding(ids), want_rows, rtol=0, atol=0)
    use_gguf_kernels(holder)
    assert linear.matmul is not reference_matmul
    torch.testing.assert_close(linear(x), want_y, rtol=1e-4, atol=1e-4)  # the kernel
    torch.testing.assert_close(embedding(ids), want_rows, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit a linear 256 -> 72"):
        linear.load(segments[:2])


def test_without_the_kernel_the_blocks_are_dequantized_once(monkeypatch, caplog):
    import pllm.platforms.cpu.gguf_linear as gguf_linear

    monkeypatch.setattr(gguf_linear, "_module", lambda: None)
    linear = QuantLinear(96, 6, bias=False)
    w = _weight("Q4_0", 6, 96)
    linear.load(w)
    with caplog.at_level(logging.WARNING):
        gguf_linear.use_gguf_kernels(torch.nn.Sequential(linear))
    assert isinstance(linear.segments[0], torch.Tensor)
    assert "dequantized to float32 at load" in caplog.text
    x = torch.randn(3, 96)
    torch.testing.assert_close(linear(x), x @ w.dequantize().T)
    embedding = QuantEmbedding(6, 96)
    embedding.load(w)
    gguf_linear.use_gguf_kernels(torch.nn.Sequential(embedding))
    ids = torch.tensor([5, 0, 5])
    assert torch.equal(embedding(ids), w.dequantize()[ids])


# ---- int8 weight-only -------------------------------------------------------


def test_int8_per_channel_rounds_each_row_on_its_own_scale():
    from pllm.models.quant import int8_per_channel

    w = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 2.0])[:, None]
    q = int8_per_channel(w)
    assert q.format == "Q8_0" and q.shape == (5, 64)
    back = q.dequantize()
    scale = (w.abs().amax(dim=1) / 127).half().float()
    assert torch.all((back - w).abs() <= scale[:, None] / 2 * 1.001 + 1e-12)
    assert torch.equal(back[3], torch.zeros(64))
    # One scale per row: every block of a row carries the same two bytes.
    blocks = q.data.reshape(5, 2, 34)
    assert torch.equal(blocks[:, 0, :2], blocks[:, 1, :2])


def int8_greedy(folder: str) -> list[list[int]]:
    """transformers' greedy tokens with every matrix of ``folder`` rounded
    as ``--quantization int8`` rounds it."""
    from transformers import AutoModelForCausalLM

    from pllm.models.quant import int8_per_channel

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in hf.parameters():
            if param.dim() == 2:
                param.copy_(int8_per_channel(param).dequantize())
    return hf_greedy(hf, prompts(), MAX_NEW)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_matches_transformers_on_the_rounded_weights(tmp_path, arch):
    """An HF folder rounded to per-channel int8 at load: transformers given
    the same rounded values (every matrix; the embedding and a tied head too)."""
    folder = make_tiny_model(tmp_path / arch, arch, **CONFIG)
    expected = int8_greedy(folder)
    llm = LLM(folder, device="cpu", kv_cache_memory="16MB", quantization="int8")
    assert llm.llm_engine.config.model.quantization == "int8"
    model = engine_model(llm)
    assert {"Q8_0"} == set().union(*(m.formats for m in quant_modules(model)
                                     if isinstance(m, QuantLinear)))
    assert isinstance(model.embed_tokens, QuantEmbedding)
    assert greedy(llm) == expected


def test_int8_on_two_ranks_with_a_tied_head(tmp_path):
    """The tied LM head reads each rank's vocabulary rows of the int8
    embedding (a view, not a copy); one KV head replicated."""
    folder = make_tiny_model(tmp_path / "tied", "llama", tie_word_embeddings=True,
                             **{**CONFIG, "num_key_value_heads": 1})
    expected = int8_greedy(folder)
    llm = LLM(folder, device="cpu", kv_cache_memory="16MB", quantization="int8",
              tensor_parallel_size=2)
    try:
        model = engine_model(llm)
        head, table = model.lm_head.segments[0], model.embed_tokens.table
        assert head.data.untyped_storage().data_ptr() == table.data.untyped_storage().data_ptr()
        assert greedy(llm) == expected
    finally:
        llm.shutdown()


def test_int8_is_refused_where_q8_0_is_not_multiplied():
    with pytest.raises(ValueError, match="quantization='int8' stores weights as Q8_0 blocks"):
        resolve_quantization("int8", "auto", _info([]), _platform(("Q4_K",)))
    assert resolve_quantization("int8", "auto", _info(["Q4_1"]), _platform(("Q8_0",))) == "int8"
