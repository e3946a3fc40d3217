"""GGUF files of Gemma 2, Gemma 3 and the mixture-of-experts families, written
as llama.cpp's converter writes them (Gemma's norms plus one, experts stacked,
Mixtral as "llama" with expert counts): pllm loads them and its greedy tokens
equal transformers' on the original model holding the file's weights."""

from __future__ import annotations

import random

import pytest
import torch
from parity import hf_greedy, pllm_greedy
from safetensors.torch import load_file

from pllm import LLM
from pllm.loader import ModelLoadError, load_model
from pllm.loader.testing import make_tiny_gguf

GEMMA3_LAYERS = ["sliding_attention"] * 5 + ["full_attention"]  # llama.cpp's fixed pattern

# Values away from the config classes' defaults, so that one dropped on the
# way through GGUF changes the tokens. Gemma's query scale is the head size
# (16): llama.cpp derives it, a GGUF file cannot carry another.
FAMILIES = {
    "mixtral": dict(),
    "qwen2_moe": dict(),  # a shared expert; top-k weights not renormalised
    "qwen3_moe": dict(),  # top-k weights renormalised, q/k norms
    "gemma2": dict(tie_word_embeddings=True, query_pre_attn_scalar=16,
                   attn_logit_softcapping=20.0, final_logit_softcapping=10.0),
    "gemma3_text": dict(
        tie_word_embeddings=True, query_pre_attn_scalar=16, num_hidden_layers=6,
        layer_types=GEMMA3_LAYERS, final_logit_softcapping=5.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 500000.0}}),
}
QUANTS = ("F32", "Q8_0")
MAX_NEW = 12
PROMPT_LENS = (5, 17, 30)  # Gemma's window is 12: the longer ones slide


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLLM_CACHE_DIR", str(tmp_path_factory.mktemp("pllm-cache")))
        yield


@pytest.fixture(scope="module", params=[(a, q) for a in FAMILIES for q in QUANTS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def family_gguf(request, tmp_path_factory):
    arch, quant = request.param
    folder = tmp_path_factory.mktemp(f"{arch}-{quant}")
    path = make_tiny_gguf(folder, arch, quant=quant, **FAMILIES[arch])
    return arch, quant, path, str(folder / "hf")


def file_weights_model(hf_dir: str, quant: str):
    """transformers' model of ``hf_dir`` with the weights the GGUF file holds:
    each quantized tensor through gguf's quantize and dequantize (norms and
    routers stay F32 in the file, as llama.cpp keeps them)."""
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if quant == "F32":
        return model
    qtype = gguf.GGMLQuantizationType[quant]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and not name.endswith("gate.weight"):  # not a router
                stored = gguf.quants.quantize(param.numpy(), qtype)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(stored, qtype)))
    return model


def prompts(vocab: int = 300) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


def test_greedy_tokens_match_transformers(family_gguf):
    arch, quant, path, hf_dir = family_gguf
    expected = hf_greedy(file_weights_model(hf_dir, quant), prompts(), MAX_NEW)
    llm = LLM(model=path, device="cpu", kv_cache_memory="16MB")
    assert pllm_greedy(llm, prompts(), MAX_NEW) == expected


def test_f32_recovers_the_checkpoint(family_gguf):
    """Stacked experts come back under the checkpoint's per-expert names, the
    config as the original's, Gemma's norms without llama.cpp's + 1."""
    arch, quant, path, hf_dir = family_gguf
    if quant != "F32":
        pytest.skip("exact weights only from an F32 file")
    loaded = load_model(path)
    assert loaded.hf_config.model_type == arch
    original = load_model(hf_dir).hf_config
    for key in ("num_local_experts", "num_experts", "num_experts_per_tok", "norm_topk_prob",
                "moe_intermediate_size", "shared_expert_intermediate_size", "sliding_window",
                "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
                "final_logit_softcapping", "rope_parameters", "tie_word_embeddings"):
        assert getattr(loaded.hf_config, key, None) == getattr(original, key, None), key
    got = dict(loaded.weights())
    reference = load_file(f"{hf_dir}/model.safetensors")
    assert got.keys() == reference.keys()
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)


def test_a_missing_expert_tensor_is_named(tmp_path):
    path = make_tiny_gguf(tmp_path, "mixtral", omit=("blk.1.ffn_up_exps.weight",))
    with pytest.raises(ModelLoadError, match=r"tiny-mixtral\.gguf lacks 1 tensor\(s\).*"
                       r"blk\.1\.ffn_up_exps\.weight \(for model\.layers\.1\.block_sparse_moe"
                       r"\.experts\.\*\.w3\.weight\)"):
        load_model(path)


@pytest.mark.parametrize("arch, key", [
    ("mixtral", "llama.expert_used_count"),
    ("qwen2_moe", "qwen2moe.expert_shared_feed_forward_length"),
    ("qwen3_moe", "qwen3moe.expert_feed_forward_length"),
    ("gemma2", "gemma2.attention.sliding_window"),
])
def test_a_missing_metadata_key_is_named(tmp_path, arch, key):
    path = make_tiny_gguf(tmp_path, arch, omit=(key,), **FAMILIES[arch])
    with pytest.raises(ModelLoadError, match=rf"tiny-{arch}\.gguf lacks the metadata key "
                                             rf"{key.replace('.', r'[.]')}"):
        load_model(path)


def test_gemma3_without_a_window_has_only_global_layers(tmp_path):
    # llama.cpp's reading of a Gemma 3 file with no sliding_window key.
    path = make_tiny_gguf(tmp_path, "gemma3_text", tie_word_embeddings=True,
                          query_pre_attn_scalar=16, layer_types=["full_attention"] * 2)
    config = load_model(path).hf_config
    assert config.layer_types == ["full_attention"] * 2 and config.sliding_window is None
