"""The CPU platform's compiled kernels and their pure-torch fallbacks: each
path matches the reference (attention) or the model's own torch code
(linear, RMSNorm, SiLU-and-mul, rotary), on odd sizes that exercise the
vector remainders."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import pllm.platforms.cpu.attention as cpu_attention
import pllm.platforms.cpu.layers as cpu_layers
import pllm.platforms.cpu.linear as cpu_linear
from pllm.models.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from pllm.platforms.cpu.attention import CPUAttentionBackend
from pllm.platforms.cpu.kernels import cpu_ops, paged_decode_op
from pllm.platforms.cpu.layers import use_cpu_layers
from pllm.platforms.cpu.linear import CPULinear
from pllm.testing.conformance import check_attention_backend

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None,
                                    reason="no C++ compiler: the torch paths are used")


@pytest.fixture(params=["compiled", "torch"])
def kernels(request, monkeypatch):
    """Run a test once on the compiled kernels and once on the fallbacks."""
    if request.param == "compiled":
        if shutil.which("g++") is None:
            pytest.skip("no C++ compiler: the torch paths are used")
        assert cpu_ops() is not None, "the kernels failed to build; see the warning in the log"
    else:
        for module in (cpu_layers, cpu_linear, cpu_attention):
            monkeypatch.setattr(module, "cpu_ops", lambda: None)
        monkeypatch.setattr(cpu_attention, "paged_decode_op", lambda: None)
    return request.param


@needs_compiler
def test_compiled_decode_kernel_builds_and_matches_the_reference():
    assert paged_decode_op() is not None, "the kernel failed to build; see the warning in the log"
    check_attention_backend(CPUAttentionBackend())


def test_torch_paths_match_the_reference(monkeypatch):
    monkeypatch.setattr(cpu_attention, "paged_decode_op", lambda: None)
    monkeypatch.setattr(cpu_attention, "cpu_ops", lambda: None)
    check_attention_backend(CPUAttentionBackend())


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 24, 25, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows_out", [False, True])
def test_cpu_linear_matches_f_linear_at_every_batch_size(kernels, rows, bias, rows_out):
    torch.manual_seed(0)
    dense = nn.Linear(99, 203, bias=bias)  # odd sizes: remainders of every tile
    fast = CPULinear(dense, rows_out=rows_out)
    x = torch.randn(rows, 99)
    with torch.inference_mode():
        out = fast(x)
        torch.testing.assert_close(out, dense(x), rtol=1e-5, atol=1e-5)
    if rows_out:
        assert out.is_contiguous()


def _model_like(hidden: int = 203, heads: int = 4, kv_heads: int = 2, head_dim: int = 24):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=64)
    norm = RMSNorm(hidden, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    return nn.ModuleDict({"norm": norm, "act": SiluAndMul(),
                          "rotary": RotaryEmbedding(cfg, head_dim, 64)})


def test_cpu_layers_match_the_torch_modules(kernels):
    torch.manual_seed(0)
    ref = _model_like()
    fast = use_cpu_layers(_model_like())
    fast.load_state_dict(ref.state_dict())
    assert type(fast["norm"]).__name__ == "CPURMSNorm"
    x, residual = torch.randn(7, 203) * 4, torch.randn(7, 203)
    torch.testing.assert_close(fast["norm"](x), ref["norm"](x))
    out, new_residual = fast["norm"](x, residual.clone())
    want, want_residual = ref["norm"](x, residual)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(new_residual, want_residual)

    gate_up = torch.randn(5, 2 * 77) * 6  # large gates: exp over a wide range
    torch.testing.assert_close(fast["act"](gate_up), ref["act"](gate_up))
    column_major = (torch.randn(2 * 77, 5) * 6).t()  # as ``weight @ x.T`` returns it
    torch.testing.assert_close(fast["act"](column_major), ref["act"](column_major))

    # q and k as strided views of a fused QKV output, as the model makes them.
    qkv = torch.randn(6, (4 + 2 + 2) * 24)
    positions = torch.tensor([0, 1, 5, 17, 40, 63])

    def split(t):
        return t[:, : 4 * 24].view(6, 4, 24), t[:, 4 * 24 : 6 * 24].view(6, 2, 24)

    column_major = qkv.t().contiguous().t()  # as ``weight @ x.T`` returns a mid-size batch
    for layout in (qkv, column_major):
        want_q, want_k = ref["rotary"](positions, *split(layout.clone()))
        got_q, got_k = fast["rotary"](positions, *split(layout.clone()))
        torch.testing.assert_close(got_q, want_q)
        torch.testing.assert_close(got_k, want_k)


class _CountingOps:
    """The compiled module, counting ``decode_layer`` calls."""

    def __init__(self, ops):
        self.ops, self.fused_calls = ops, 0

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def decode_layer(self, *args):
        self.fused_calls += 1
        return self.ops.decode_layer(*args)


@needs_compiler
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("rows", [3, 30])  # few-row kernel, then weight @ x.T
def test_fused_decode_layer_matches_the_module_path(arch, rows, monkeypatch):
    """The one-call decoder layer (decode-only steps of a few sequences) gives
    the modules' result: GQA, QKV bias (qwen2), sliding window (mistral),
    contexts across block boundaries, the first layer (no residual yet)."""
    from transformers import AutoConfig

    from pllm.models.layers import ForwardContext
    from pllm.models.llama import ArchSpec, DecoderLayer, RotaryEmbedding
    from pllm.platforms.cpu.layers import CPUDecoderLayer
    from pllm.platforms.cpu.linear import use_cpu_linears
    from pllm.testing.metadata import build_metadata

    cfg = AutoConfig.for_model(arch, hidden_size=96, intermediate_size=200, num_attention_heads=6,
                               num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                               sliding_window=20)
    torch.manual_seed(0)
    spec = ArchSpec(cfg)
    layer = DecoderLayer(spec, 0, RotaryEmbedding(cfg, spec.head_dim, 128))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    layer = use_cpu_linears(layer).eval()
    backend = CPUAttentionBackend()
    md = build_metadata([(5 + 4 * i, 1) for i in range(rows)], block_size=8,
                        generator=torch.Generator().manual_seed(1))
    num_blocks = int(md.block_tables.max()) + 1
    cache = torch.randn(backend.kv_cache_shape(num_blocks, 8, spec.num_kv_heads, spec.head_dim))
    positions = md.seq_lens.long() - 1
    x = torch.randn(rows, 96)
    counting = _CountingOps(cpu_ops())
    monkeypatch.setattr(cpu_layers, "cpu_ops", lambda: counting)
    for residual in (None, torch.randn(rows, 96)):
        outs = []
        for cls in (DecoderLayer, CPUDecoderLayer):
            layer.__class__ = cls
            kv = cache.clone()
            ctx = ForwardContext(backend, md, [kv])
            res = None if residual is None else residual.clone()
            with torch.inference_mode():
                out, new_res = layer(positions, x.clone(), res, ctx)
            outs.append((out, new_res, kv))
        for want, got in zip(outs[0], outs[1]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert counting.fused_calls == 2, "the fused layer was not used"


def test_enforce_eager_keeps_decoder_layers_module_by_module(tiny_model_dir):
    """``--enforce-eager`` leaves the model's own DecoderLayer in place; the
    default gives it the one-call CPU layer. Both generate the same text."""
    from pllm import LLM, SamplingParams
    from pllm.models.llama import DecoderLayer
    from pllm.platforms.cpu.layers import CPUDecoderLayer

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    texts = {}
    for eager in (False, True):
        llm = LLM(model=str(tiny_model_dir), enforce_eager=eager, kv_cache_memory="16MiB")
        layers = llm.llm_engine.executor.worker.model.layers
        assert all(type(layer) is (DecoderLayer if eager else CPUDecoderLayer) for layer in layers)
        texts[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert texts[True] == texts[False]
