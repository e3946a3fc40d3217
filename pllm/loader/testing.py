"""Tiny random models on disk, for tests that need a real checkpoint in well under a second.

    folder = make_tiny_model(tmp_path / "m", arch="qwen2")       # HF folder, like a hub download
    gguf_path = make_tiny_gguf(tmp_path / "g", arch="llama")     # the same model as llama.cpp writes it

Both carry a real byte-level BPE tokenizer (trained here with ``tokenizers``)
with ChatML special tokens and a ChatML chat template.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen2_moe",
                      "qwen3_moe", "gemma2", "gemma3_text")

# HF model_type -> the GGUF architecture llama.cpp's converter writes it as
# (Mistral and Mixtral as "llama", Mixtral with expert counts set).
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2",
                      "qwen3": "qwen3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
                      "gemma2": "gemma2", "gemma3_text": "gemma3"}

# ids 0-2 as in SmolLM2: <|endoftext|> pads, <|im_start|> is BOS, <|im_end|> is EOS.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=320,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)

# What a family needs on top of the tiny defaults. Experts: four, two per
# token, a quarter of the dense MLP's width each. Gemma: a sliding-window
# layer (shorter than most test prompts) then a global one.
_TINY_ARCH_DEFAULTS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True),
    "gemma2": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=12),
    "gemma3_text": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=12),
}

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello, world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "One two three four five six seven eight nine ten 0123456789.",
    "A quick brown fox jumps over the lazy dog; the dog sleeps.",
]


def make_tiny_model(
    folder: str | os.PathLike,
    arch: str = "llama",
    *,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    **config_overrides,
) -> str:
    """Write a random ``arch`` model (fp32 safetensors) and tokenizer into ``folder``.

    ``config_overrides`` replace the tiny defaults (hidden 64, 2 layers, 4 query /
    2 KV heads, head_dim 16, vocab 320, untied lm_head). ``max_shard_size`` (e.g.
    ``"20KB"``) writes sharded safetensors with an index. Returns ``folder``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = str(folder)
    config = _tiny_config(arch, config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)  # fp32: the default dtype
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    tokenizer = make_tiny_tokenizer()
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={config.vocab_size} is below the tokenizer's {len(tokenizer)}")
    model.save_pretrained(folder, **save_kwargs)
    tokenizer.save_pretrained(folder)
    return folder


def make_draft_copy(target: str | os.PathLike, folder: str | os.PathLike, *, noise: float,
                    seed: int = 0) -> str:
    """A draft model for speculative decoding tests: ``target`` (a folder
    :func:`make_tiny_model` wrote) with Gaussian noise of ``noise`` times
    each weight's standard deviation added, and its tokenizer. Small noise
    gives a draft that agrees with its target often but not always; 0 a
    draft that always agrees. Returns ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(folder)
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1:
                param.add_(torch.randn(param.shape, generator=gen) * param.std() * noise)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(target)).save_pretrained(folder)
    return folder


def make_tiny_tokenizer():
    """A byte-level BPE fast tokenizer (about 300 tokens) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_CONFIG["vocab_size"] - 16,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[BOS_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        pad_token=SPECIAL_TOKENS[PAD_ID],
        unk_token=SPECIAL_TOKENS[PAD_ID],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_gguf(
    folder: str | os.PathLike,
    arch: str = "llama",
    *,
    quant: str | Callable[[str], str] = "F32",
    seed: int = 0,
    omit: tuple[str, ...] = (),
    **config_overrides,
) -> str:
    """Write a tiny model as llama.cpp's converter would: ``folder/hf`` (the HF original)
    and ``folder/tiny-<arch>.gguf``, whose path is returned.

    As llama.cpp: Q/K rows permuted for llama/mistral/mixtral; Gemma's norm
    weights stored plus one (llama.cpp's RMSNorm scales by the weight, HF
    Gemma's by 1 + weight) and Gemma 2's lm_head left out; each layer's
    experts stacked into one [num_experts, ...] tensor per projection.
    ``quant`` applies to 2-D and 3-D weights; norms and routers stay F32. It is
    "F32", "F16", or a block format: "Q8_0", "Q4_0", "Q4_1" quantize the
    weights with ``gguf``; "Q4_K", "Q5_K", "Q6_K", which ``gguf`` cannot
    quantize to, are random blocks (scales drawn so that values stay near
    the weights' size), so that the file, not ``folder/hf``, is the reference
    (transformers' GGUF loading dequantizes it). A callable maps each GGUF
    tensor name to one of these (files mixing formats, as llama.cpp's Q4_K_M). A Gemma whose layer pattern or query scale llama.cpp
    would not derive from the file is a ValueError (GGUF cannot carry them).
    ``omit`` names GGUF tensors and metadata keys to leave out (a damaged file).
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    config = _tiny_config(arch, config_overrides)
    gguf_arch = GGUF_ARCHITECTURES.get(arch, arch)
    if gguf_arch in ("gemma2", "gemma3"):
        _check_gemma_fits_gguf(config, gguf_arch)
    hf_dir = make_tiny_model(folder / "hf", arch, seed=seed, **config_overrides)
    path = folder / f"tiny-{arch}.gguf"

    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_name(f"tiny {arch}")
    _add_hparams(writer, config, gguf_arch)
    writer.add_file_type(_file_type(quant if isinstance(quant, str) else "mixed"))
    _add_tokenizer(writer, Path(hf_dir) / "tokenizer.json", config.vocab_size)
    for key in omit:
        writer.kv_data[0].pop(key, None)

    name_map = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch),
        config.num_hidden_layers,
    )
    for gguf_name, weights in _gguf_tensors(
        load_file(os.path.join(hf_dir, "model.safetensors")), config, gguf_arch, name_map
    ):
        if gguf_name in omit:
            continue
        # llama.cpp keeps routers in F32 whatever the file type.
        tensor_quant = quant if isinstance(quant, str) else quant(gguf_name)
        if ".ffn_gate_inp" in gguf_name:
            tensor_quant = "F32"
        _add_tensor(writer, gguf_name, weights, tensor_quant, rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _add_hparams(writer, config, gguf_arch: str) -> None:
    """The metadata keys llama.cpp's converter writes for ``gguf_arch``."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if gguf_arch == "gemma2":  # no rope keys: llama.cpp's defaults
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
        return
    writer.add_rope_dimension_count(config.head_dim)
    if gguf_arch == "gemma3":
        import gguf

        full = _rope_params(config, "full_attention")
        writer.add_rope_freq_base(float(full["rope_theta"]))
        if full.get("rope_type", "default") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if "sliding_attention" in config.layer_types:
            writer.add_sliding_window(config.sliding_window)
        return
    writer.add_rope_freq_base(float(_rope_theta(config)))
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", 0)
    if num_experts:
        writer.add_expert_count(num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if gguf_arch in ("qwen2moe", "qwen3moe"):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if gguf_arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def _gguf_tensors(hf_tensors: dict, config, gguf_arch: str, name_map):
    """(GGUF name, array) as llama.cpp's converter writes the HF tensors."""
    import numpy as np

    experts: dict[str, dict[int, np.ndarray]] = {}
    for hf_name, weights in hf_tensors.items():
        if gguf_arch == "gemma2" and hf_name == "lm_head.weight":
            continue  # llama.cpp's Gemma 2 converter never writes it
        if gguf_arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
            weights = weights + 1
        base, _, suffix = hf_name.rpartition(".")
        expert = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)", base)
        if expert:  # stacked below, one tensor per layer and projection
            merged = f"{expert[1]}.{expert[3]}"
            experts.setdefault(merged, {})[int(expert[2])] = weights
            continue
        if gguf_arch == "llama" and base.endswith("q_proj"):
            weights = llama_cpp_permute(weights, config.num_attention_heads)
        elif gguf_arch == "llama" and base.endswith("k_proj"):
            weights = llama_cpp_permute(weights, config.num_key_value_heads)
        elif base.endswith("shared_expert_gate"):
            weights = weights.reshape(-1)  # llama.cpp's shape: [hidden]
        yield f"{name_map.get_name(base)}.{suffix}", np.ascontiguousarray(weights)
    for merged, by_expert in experts.items():
        stacked = np.stack([by_expert[e] for e in sorted(by_expert)])
        yield f"{name_map.get_name(merged)}.weight", stacked


def _check_gemma_fits_gguf(config, gguf_arch: str) -> None:
    """llama.cpp derives Gemma's layer pattern, local rope base and query
    scale from the architecture and size, not from the file."""
    num_layers = config.num_hidden_layers
    period = 2 if gguf_arch == "gemma2" else 6
    kinds = ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
             for i in range(num_layers)]
    if gguf_arch == "gemma3" and "sliding_attention" not in config.layer_types:
        kinds = ["full_attention"] * num_layers  # no window in the file: all global
    if list(config.layer_types) != kinds:
        raise ValueError(f"layer_types={config.layer_types} is not llama.cpp's {gguf_arch} "
                         f"pattern {kinds}")
    big = num_layers == (46 if gguf_arch == "gemma2" else 62)  # the 27B models
    scalar = config.hidden_size // config.num_attention_heads if big else config.head_dim
    if config.query_pre_attn_scalar != scalar:
        raise ValueError(f"query_pre_attn_scalar={config.query_pre_attn_scalar} is not the "
                         f"{scalar} llama.cpp derives for this {gguf_arch}")
    if gguf_arch == "gemma3":
        local = _rope_params(config, "sliding_attention")
        if local.get("rope_type", "default") != "default" or local["rope_theta"] != 10000.0:
            raise ValueError(f"local rope {local} is not llama.cpp's (default, base 10000)")


def _rope_params(config, layer_type: str) -> dict:
    # transformers 5: per kind of layer; 4.x: rope_theta / rope_local_base_freq / rope_scaling.
    params = getattr(config, "rope_parameters", None)
    if params and layer_type in params:
        return params[layer_type]
    if layer_type == "sliding_attention":
        return {"rope_type": "default", "rope_theta": config.rope_local_base_freq}
    return {"rope_theta": config.rope_theta, **(config.rope_scaling or {})}


def _tiny_config(arch: str, overrides: dict):
    from transformers import AutoConfig

    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not one of {', '.join(TINY_ARCHITECTURES)}")
    values = {**_TINY_CONFIG, **_TINY_ARCH_DEFAULTS.get(arch, {}), **overrides}
    if "head_dim" not in overrides and "hidden_size" in overrides:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    return AutoConfig.for_model(arch, **values)


def _rope_theta(config) -> float:
    # transformers 5 keeps it in rope_parameters; 4.x as an attribute.
    theta = getattr(config, "rope_theta", None)
    return theta if theta is not None else config.rope_parameters["rope_theta"]


def llama_cpp_permute(weights, num_heads: int):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute, for HF -> GGUF.
    return (
        weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


QUANTIZED = ("Q8_0", "Q4_0", "Q4_1")  # gguf quantizes to these
RANDOM_BLOCKS = ("Q4_K", "Q5_K", "Q6_K")  # written as random blocks


def _add_tensor(writer, name: str, weights, quant: str, rng) -> None:
    import gguf
    import numpy as np

    if weights.ndim < 2 or quant == "F32":
        writer.add_tensor(name, weights.astype(np.float32))
    elif quant == "F16":
        writer.add_tensor(name, weights.astype(np.float16))
    elif quant in QUANTIZED:
        qtype = gguf.GGMLQuantizationType[quant]
        writer.add_tensor(name, gguf.quants.quantize(weights, qtype), raw_dtype=qtype)
    elif quant in RANDOM_BLOCKS:
        qtype = gguf.GGMLQuantizationType[quant]
        writer.add_tensor(name, random_blocks(quant, weights.shape, rng), raw_dtype=qtype)
    else:
        raise ValueError(f"quant={quant!r} is not one of F32, F16, "
                         f"{', '.join(QUANTIZED + RANDOM_BLOCKS)}")


def random_blocks(fmt: str, shape: tuple[int, ...], rng, scale: float = 0.05):
    """Random uint8 blocks of K-quant ``fmt`` for a ``shape`` tensor (last
    dimension a multiple of 256), their fp16 scales set so that values stay
    within about ``scale``: super-block scale ``d`` (and ``dmin``) positive
    and small, the 6-bit or 8-bit sub-block scales and the quants random."""
    import gguf
    import numpy as np

    values, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt]]
    if shape[-1] % values:
        raise ValueError(f"{fmt} needs rows that are a multiple of {values}, got {shape}")
    blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // values, nbytes), dtype=np.uint8)
    # Largest |sub-scale * quant|: 63 * 15 (Q4_K), 63 * 31 (Q5_K), 127 * 32 (Q6_K).
    reach = {"Q4_K": 63 * 15, "Q5_K": 63 * 31, "Q6_K": 127 * 32}[fmt]
    d = (rng.uniform(0.5, 1.0, (*blocks.shape[:-1], 1)) * scale / reach).astype(np.float16)
    if fmt == "Q6_K":  # d is the block's last two bytes
        blocks[..., -2:] = d.view(np.uint8)
    else:  # d, then dmin
        blocks[..., 0:2] = d.view(np.uint8)
        blocks[..., 2:4] = d.view(np.uint8)
    return blocks.reshape(*shape[:-1], -1)


def _file_type(quant: str) -> int:
    import gguf

    return {
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S,
        "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_S,
        "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
        "mixed": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    }[quant]


def _add_tokenizer(writer, tokenizer_json: Path, vocab_size: int) -> None:
    """The tokenizer as llama.cpp stores a GPT-2 style BPE: tokens, types, merges, ids."""
    import gguf

    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    types = [
        gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens
    ]
    # Rows beyond the tokenizer's vocabulary get placeholder tokens, as llama.cpp pads them.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
