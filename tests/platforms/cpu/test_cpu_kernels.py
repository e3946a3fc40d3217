"""The CPU platform's compiled kernels and their pure-torch fallbacks: each
path matches the reference (attention) or the model's own torch code
(linear, RMSNorm, SiLU-and-mul, rotary), on odd sizes that exercise the
vector remainders; over 8-bit caches, the compiled write equals
``quantize`` bit for bit and the compiled decode reads what ``dequantize``
gives."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import pllm.platforms.cpu.attention as cpu_attention
import pllm.platforms.cpu.layers as cpu_layers
import pllm.platforms.cpu.linear as cpu_linear
from pllm.core.kv_cache.fp8 import dequantize, quantize
from pllm.models.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from pllm.platforms.common.host_linear import (
    PACK_SHARE,
    HostLinear,
    every_batch_packing,
    mkl_packing,
    should_pack,
)
from pllm.platforms.cpu.attention import CPUAttentionBackend
from pllm.platforms.cpu.kernels import cpu_ops, paged_decode_op
from pllm.platforms.cpu.layers import use_cpu_layers
from pllm.platforms.cpu.linear import CPULinear
from pllm.testing.conformance import check_attention_backend
from pllm.testing.metadata import build_metadata
from pllm.testing.reference import reference_attention

FP8_FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]

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


@pytest.fixture
def host_gemm(monkeypatch):
    """Force the packed product that serves every batch (``PLLM_HOST_GEMM``);
    skip where this torch has no MKL and MKL is asked for."""
    def force(choice: str) -> None:
        if choice == "mkl" and not mkl_packing():
            pytest.skip("this torch has no MKL packed product")
        monkeypatch.setenv("PLLM_HOST_GEMM", choice)
        every_batch_packing.cache_clear()

    yield force
    every_batch_packing.cache_clear()


@needs_compiler
def test_compiled_decode_kernel_builds_and_matches_the_reference():
    assert paged_decode_op() is not None, "the kernel failed to build; see the warning in the log"
    check_attention_backend(CPUAttentionBackend())
    for kv_dtype in FP8_FORMATS:
        check_attention_backend(CPUAttentionBackend(), kv_cache_dtype=kv_dtype)


def test_torch_paths_match_the_reference(monkeypatch):
    monkeypatch.setattr(cpu_attention, "paged_decode_op", lambda: None)
    monkeypatch.setattr(cpu_attention, "cpu_ops", lambda: None)
    check_attention_backend(CPUAttentionBackend())
    for kv_dtype in FP8_FORMATS:
        check_attention_backend(CPUAttentionBackend(), kv_cache_dtype=kv_dtype)


def test_soft_capped_prefill_in_row_chunks_matches_the_reference(monkeypatch):
    """The soft-capped prefill goes by chunks of query rows: chunks of 4
    rows (uneven against the chunk lengths) give the reference's result."""
    import functools

    from pllm.testing.conformance import DEFAULT_CASES, check_attention_case

    monkeypatch.setattr(cpu_attention, "_soft_capped_prefill",
                        functools.partial(cpu_attention._soft_capped_prefill, rows=4))
    for case in DEFAULT_CASES:
        if case.soft_cap is not None:
            check_attention_case(CPUAttentionBackend(), case)
            check_attention_case(CPUAttentionBackend(), case, dtype=torch.bfloat16)


@needs_compiler
@pytest.mark.parametrize("kv_dtype", FP8_FORMATS, ids=str)
@pytest.mark.parametrize(("window", "soft_cap"), [(None, None), (20, None), (None, 2.0), (20, 5.0)])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 2.0), (2.0, 0.37)])
def test_compiled_fp8_decode_matches_the_reference(kv_dtype, window, soft_cap, scales):
    """The compiled decode over an 8-bit cache: 9 query heads on 3 KV heads,
    contexts of 1 token to past 16 blocks, on and across block edges, with
    and without a sliding window and a logit soft-cap, and two padding rows
    (no context: zeros)."""
    gen = torch.Generator().manual_seed(0)
    block_size, num_kv_heads, head_dim = 16, 3, 64
    lens = [1, 15, 16, 17, 33, 100, 257, 48, 1, 1]  # the last two become padding rows
    md = build_metadata([(n - 1, 1) for n in lens], block_size, generator=gen)
    num_blocks = int(md.block_tables.max()) + 1
    shape = CPUAttentionBackend().kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    # Every byte reads back exactly (the test below); here, ordinary magnitudes.
    cache = quantize(torch.randn(shape, generator=gen) * 2, 1.0, kv_dtype)
    query = torch.randn(len(lens), 9, head_dim, generator=gen)
    seq_lens = torch.tensor(lens[:-2] + [0, 0], dtype=torch.int32)
    k_scale, v_scale = scales
    out = paged_decode_op()(query, cache, md.block_tables, seq_lens, head_dim**-0.5, window or 0,
                            k_scale, v_scale, soft_cap or 0.0)
    want = reference_attention(query, cache.permute(0, 2, 3, 1, 4), md, scale=head_dim**-0.5,
                               sliding_window=window, k_scale=k_scale, v_scale=v_scale,
                               soft_cap=soft_cap)
    torch.testing.assert_close(out[:-2], want[:-2], rtol=1e-5, atol=1e-5 * v_scale)
    assert not out[-2:].any(), "padding rows must be zeros"


@pytest.fixture(scope="module")
def table_paged_decode():
    """``paged_decode`` built with the portable 8-bit reader (a table of the
    256 values), which builds without AVX2/F16C use; this host would
    otherwise never compile it."""
    from pllm.platforms.cpu.kernels import build

    module = build("pllm_cpu_paged_decode_table", ("vec.h", "paged_decode.cpp"),
                   ["paged_decode"], defines=["PLLM_FP8_TABLE"])
    return module.paged_decode


@needs_compiler
@pytest.mark.parametrize("reader", ["simd", "table"])
@pytest.mark.parametrize("kv_dtype", FP8_FORMATS, ids=str)
@pytest.mark.parametrize("v_scale", [1.0, 0.37, 3.0])
def test_compiled_fp8_decode_reads_every_byte_exactly(kv_dtype, v_scale, reader, request):
    """A one-token context gives back its V row exactly (probability 1), so a
    row of all 256 bytes must come back as ``dequantize`` reads them: NaN,
    infinities and subnormals included; through the fp16 widening (AVX2) and
    through the portable table."""
    op = paged_decode_op() if reader == "simd" else request.getfixturevalue("table_paged_decode")
    head_dim = 256
    cache = torch.zeros(2, 1, 2, 16, head_dim, dtype=torch.uint8)
    every_byte = torch.arange(256, dtype=torch.uint8)
    cache[1, 0, 1, 0] = every_byte  # V of the token in block 1, offset 0
    query = torch.randn(1, 2, head_dim)
    out = op(query, cache.view(kv_dtype), torch.tensor([[1]], dtype=torch.int32),
             torch.tensor([1], dtype=torch.int32), head_dim**-0.5, 0, 1.0, v_scale, 0.0)
    want = dequantize(every_byte.view(kv_dtype), v_scale)
    torch.testing.assert_close(out[0], want.expand(2, -1), rtol=0, atol=0, equal_nan=True)


@needs_compiler
@pytest.mark.parametrize("kv_dtype", FP8_FORMATS, ids=str)
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 2.0), (0.37, 3.1)])
def test_compiled_fp8_write_is_bit_identical_to_quantize(kv_dtype, scales, monkeypatch):
    """Every value of the format, the ties between neighbours and the floats
    either side of them, subnormals, values past the range (saturated),
    infinities and NaN, from strided views of a QKV product as the model
    makes them; negative (padding) slots write nothing."""
    gen = torch.Generator().manual_seed(0)
    fmax = torch.finfo(kv_dtype).max
    grid = torch.arange(256, dtype=torch.uint8).view(kv_dtype).float()
    grid = grid[torch.isfinite(grid)].unique()
    ties = (grid[1:] + grid[:-1]) / 2
    inf = torch.tensor(float("inf"))
    special = torch.tensor([2 * fmax, -2 * fmax, float("inf"), -float("inf"), float("nan"), -0.0])
    values = torch.cat([grid, ties, ties.nextafter(inf), ties.nextafter(-inf), special,
                        torch.randn(3000, generator=gen) * fmax / 8,
                        torch.randn(3000, generator=gen) * 1e-3])
    heads, head_dim = 2, 64
    tokens = -(-len(values) // (heads * head_dim))
    values = torch.cat([values, torch.randn(tokens * heads * head_dim - len(values))])
    k_scale, v_scale = scales
    qkv = torch.randn(tokens, (4 + 2 * heads) * head_dim, generator=gen)
    key = qkv[:, 4 * head_dim : (4 + heads) * head_dim].view(tokens, heads, head_dim)
    value = qkv[:, (4 + heads) * head_dim :].view(tokens, heads, head_dim)
    perm = torch.randperm(len(values), generator=gen)
    key.copy_((values * k_scale).view_as(key))
    value.copy_((values[perm] * v_scale).view_as(value))

    block_size = 16
    num_blocks = -(-2 * tokens // block_size)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::7] = -1  # padding
    slots[3::11] = -5
    shape = CPUAttentionBackend().kv_cache_shape(num_blocks, block_size, heads, head_dim)
    garbage = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    got, want = garbage.clone().view(kv_dtype), garbage.clone().view(kv_dtype)
    cpu_ops().write_kv_(key, value, got, slots, k_scale, v_scale)
    monkeypatch.setattr(cpu_attention, "cpu_ops", lambda: None)  # the torch path: ``quantize``
    CPUAttentionBackend().write_kv(key, value, want, slots, k_scale=k_scale, v_scale=v_scale)
    assert not torch.equal(want.view(torch.uint8), garbage), "nothing was written"
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


# Every side of each routing threshold: the few-row kernel's (8 on AVX-512
# hosts, 12 on others with a packed product for every batch, 24 without),
# the fused decode layer's (12) and the unpacked products' (128).
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 12, 13, 24, 25, 64, 128, 129, 300])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows_out", [False, True])
@pytest.mark.parametrize("packing", [None, "mkl", "onednn"], ids=["unpacked", "mkl", "onednn"])
def test_cpu_linear_matches_f_linear_at_every_batch_size(kernels, host_gemm, rows, bias, rows_out,
                                                         packing):
    torch.manual_seed(0)
    pack = packing is not None
    if pack:
        host_gemm(packing)
    dense = nn.Linear(99, 203, bias=bias)  # odd sizes: remainders of every tile
    fast = CPULinear(dense, rows_out=rows_out, pack=pack)
    assert (fast._packed is not None) == (pack or rows_out)
    # The LM head keeps its oneDNN copy; the others take the forced one.
    if pack and not rows_out:
        assert fast.packing == packing and fast.every_batch
    else:
        assert fast.packing == ("onednn" if rows_out else None) and not fast.every_batch
    x = torch.randn(rows, 99)
    with torch.inference_mode():
        out = fast(x)
        torch.testing.assert_close(out, dense(x), rtol=1e-5, atol=1e-5)
    if rows_out:
        assert out.is_contiguous()


@pytest.mark.parametrize("isas, packed, want", [
    (("scalar", "avx2", "avx512"), True, 8), (("scalar", "avx2"), True, 12),
    (("scalar", "avx2", "avx512"), False, cpu_linear._FEW_ROWS)])
def test_the_few_row_cutoff_follows_the_kernels_build(monkeypatch, isas, packed, want):
    """Against a packed copy the single-row product wins up to 8 rows when the
    kernels are built with AVX-512 and 12 without (an AVX2 host, or an
    AVX-512 one built for x86-64-v3): what was built decides, not the CPU."""
    monkeypatch.setattr(cpu_linear, "available_isas", lambda: isas)
    assert cpu_linear.few_rows(packed) == want


@pytest.mark.parametrize("packing", ["mkl", "onednn"])
def test_one_packed_copy_serves_every_batch_size(host_gemm, packing):
    """HostLinear packs each weight once and runs every batch size on that
    copy (MKL's, packed for one batch size, is passed each call's own row
    count): checked against fp64 at every size from 1 to 300 rows (and
    column-major input), on shapes with remainders."""
    host_gemm(packing)
    torch.manual_seed(0)
    for out_features, in_features in ((203, 99), (960, 576), (17, 1536)):
        dense = nn.Linear(in_features, out_features)
        fast = HostLinear(dense, pack=True)
        assert fast.packing == packing and fast.every_batch
        w64, b64 = dense.weight.double(), dense.bias.double()
        for rows in [*range(1, 40), 63, 64, 65, 127, 128, 129, 200, 257, 300]:
            x = torch.randn(rows, in_features)
            if rows % 3 == 0:
                x = torch.randn(in_features, rows).t()  # a column-major view
            with torch.inference_mode():
                got = fast(x)
            want = x.double() @ w64.t() + b64
            assert (got.double() - want).abs().max().item() < 1e-4 * in_features ** 0.5, rows


def test_a_weight_whose_mkl_layout_fails_the_check_gets_onednn_copies(host_gemm, monkeypatch,
                                                                    caplog):
    """The load-time check: where MKL's copy, packed for one batch size,
    gives other products than F.linear at other batch sizes, the layer takes
    a oneDNN copy instead (logged), and its products stay right."""
    import pllm.platforms.common.host_linear as host_linear

    host_gemm("mkl")
    real_ops = torch.ops.mkl
    real = real_ops._mkl_linear

    class WrongAtOtherSizes:
        @staticmethod
        def _mkl_linear(x, packed, weight, bias, rows):
            out = real(x, packed, weight, bias, rows)
            return out if rows == host_linear.SMALL_BATCH else out + 1

        _mkl_reorder_linear_weight = staticmethod(torch.ops.mkl._mkl_reorder_linear_weight)

    monkeypatch.setattr(host_linear, "_layout_checked", {})
    monkeypatch.setattr(torch.ops, "mkl", WrongAtOtherSizes)
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    with caplog.at_level("WARNING"):
        fast = HostLinear(dense, pack=True)
    assert fast.packing == "onednn" and not fast.every_batch
    assert "differs from F.linear" in caplog.text
    x = torch.randn(200, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), dense(x), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(host_linear, "_layout_checked", {})
    monkeypatch.setattr(torch.ops, "mkl", real_ops)
    assert HostLinear(dense, pack=True).packing == "mkl"  # the real product passes


@pytest.mark.parametrize("mkl_s, onednn_s, want", [
    (3.0, 1.4, "onednn"),  # an AMD EPYC: MKL off its fast paths
    (1.6, 2.2, "mkl"),     # an Intel Xeon
    (1.0, 0.82, "onednn"), # an AMD EPYC held to AVX2: 1.31x the throughput on oneDNN's
    (1.0, 0.93, "mkl"),    # a close call keeps MKL
])
def test_the_packed_product_for_every_batch_is_the_one_measured_faster(
        monkeypatch, caplog, mkl_s, onednn_s, want):
    import pllm.platforms.common.host_linear as host_linear

    if not mkl_packing():
        pytest.skip("this torch has no MKL packed product: nothing to choose")
    monkeypatch.delenv("PLLM_HOST_GEMM", raising=False)
    monkeypatch.setattr(host_linear, "_time_packings", lambda: (mkl_s, onednn_s))
    every_batch_packing.cache_clear()
    try:
        with caplog.at_level("INFO"):
            assert every_batch_packing() == want
        assert f"{1e3 * mkl_s:.2f} ms on MKL's, {1e3 * onednn_s:.2f} ms on oneDNN's" in caplog.text
    finally:
        every_batch_packing.cache_clear()


def test_the_measurement_times_both_products_and_a_bad_choice_is_refused(monkeypatch):
    if mkl_packing():
        from pllm.platforms.common.host_linear import _time_packings

        mkl_s, onednn_s = _time_packings(64, 32, rows=(3, 40), reps=2)
        assert 0 < mkl_s < 1 and 0 < onednn_s < 1
    monkeypatch.setenv("PLLM_HOST_GEMM", "blas")
    every_batch_packing.cache_clear()
    try:
        with pytest.raises(ValueError, match="PLLM_HOST_GEMM='blas'.*auto, mkl or onednn"):
            every_batch_packing()
    finally:
        every_batch_packing.cache_clear()


def test_linear_weights_are_packed_only_when_the_copies_fit():
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    size = 2 * 64 * 128 * 4
    assert should_pack(model, available_bytes=int(size / PACK_SHARE))
    assert not should_pack(model, available_bytes=int(size / PACK_SHARE) - 1)
    assert not should_pack(model.to(torch.bfloat16), available_bytes=2**40)  # fp32 copies only


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
@pytest.mark.parametrize("rows", [3, 12, 30])  # few-row kernel; then weight @ x.T, or the modules
@pytest.mark.parametrize("kv_dtype", [torch.float32, *FP8_FORMATS], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_fused_decode_layer_matches_the_module_path(arch, rows, kv_dtype, packed, monkeypatch):
    """The one-call decoder layer (decode-only steps of a few sequences) gives
    the modules' result: GQA, QKV bias (qwen2), sliding window (mistral),
    contexts across block boundaries, the first layer (no residual yet), and
    8-bit caches with non-unit scales (the same bytes written). Beside
    modules packed for every batch it takes up to 12 rows and leaves more to
    them."""
    from transformers import AutoConfig

    from pllm.models.layers import ForwardContext
    from pllm.models.llama import ArchSpec, DecoderLayer, RotaryEmbedding
    from pllm.platforms.cpu.layers import CPUFusedDecodeLayer
    from pllm.platforms.cpu.linear import use_cpu_linears

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
    fp8 = kv_dtype != torch.float32
    if fp8:
        cache = quantize(cache, 1.0, kv_dtype)
        layer.self_attn.attn.k_scale, layer.self_attn.attn.v_scale = 0.37, 2.5
    positions = md.seq_lens.long() - 1
    x = torch.randn(rows, 96)
    counting = _CountingOps(cpu_ops())
    monkeypatch.setattr(cpu_layers, "cpu_ops", lambda: counting)
    for residual in (None, torch.randn(rows, 96)):
        outs = []
        for fused in (None, CPUFusedDecodeLayer(layer.dense_weights(), packed=packed)):
            layer.fused = fused
            kv = cache.clone()
            ctx = ForwardContext(backend, md, [kv])
            res = None if residual is None else residual.clone()
            with torch.inference_mode():
                out, new_res = layer(positions, x.clone(), res, ctx)
            outs.append((out, new_res, kv.view(torch.uint8) if fp8 else kv))  # bytes: equal
        for want, got in zip(outs[0], outs[1]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    takes = rows <= 12 or not packed
    assert counting.fused_calls == (2 if takes else 0), "the fused layer was (not) used"


def test_enforce_eager_keeps_decoder_layers_module_by_module(tiny_model_dir):
    """``--enforce-eager`` leaves the decoder layers module by module; the
    default gives each the one-call CPU hook. Both generate the same text."""
    from pllm import LLM, SamplingParams
    from pllm.platforms.cpu.layers import CPUFusedDecodeLayer

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    texts = {}
    for eager in (False, True):
        llm = LLM(model=str(tiny_model_dir), enforce_eager=eager, kv_cache_memory="16MiB")
        layers = llm.llm_engine.executor.worker.model.layers
        assert all((layer.fused is None) if eager else isinstance(layer.fused, CPUFusedDecodeLayer)
                   for layer in layers)
        texts[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert texts[True] == texts[False]


@needs_compiler
@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_cache_generates_the_same_with_and_without_kernels(tiny_model_dir, kv_cache_dtype,
                                                                monkeypatch):
    """An 8-bit cache end to end: the compiled write, decode and one-call
    layers give the torch paths' tokens and top-5 logprobs."""
    from pllm import LLM, SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5)
    prompts = [[5, 6, 7, 8], [9, 10, 11] * 7, [12] * 19]
    runs = []
    for compiled in (True, False):
        if not compiled:
            for module in (cpu_layers, cpu_linear, cpu_attention):
                monkeypatch.setattr(module, "cpu_ops", lambda: None)
            monkeypatch.setattr(cpu_attention, "paged_decode_op", lambda: None)
        llm = LLM(model=str(tiny_model_dir), kv_cache_memory="4MiB",
                  kv_cache_dtype=kv_cache_dtype)
        runs.append(llm.generate(prompts, params, use_tqdm=False))
    for got, want in zip(*runs):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for top_got, top_want in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
            assert top_got.keys() == top_want.keys()
            for token, lp in top_want.items():
                assert abs(top_got[token].logprob - lp.logprob) < 1e-4
