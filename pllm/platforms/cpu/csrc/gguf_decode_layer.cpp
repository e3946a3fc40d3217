// The one-call decoder layer of ``decode_layer.cpp`` over weights kept in GGUF
// block formats: the same norms, rotary, KV write and paged attention, with
// each projection a ``gguf_linear`` product (one weight tensor per
// projection, in any of its formats; fp32 or 8-bit activations). What it
// saves at batch 1 is the same as for fp32 weights: the Python module calls
// and torch dispatches between the layer's kernels.

namespace {

struct BlockProjection {
  const torch::Tensor& w;  // uint8 [N, row_bytes]
  int64_t qtype, in_features;
  const c10::optional<torch::Tensor>& b;
  bool q8;
  int64_t few_rows;
  torch::Tensor operator()(const torch::Tensor& x) const {
    torch::Tensor out = gguf_linear(x, w, qtype, in_features, q8, 0, few_rows, 0);
    return b.has_value() ? out.add_(b.value()) : out;
  }
};

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> gguf_decode_layer_attn(
    torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor positions,
    torch::Tensor input_norm, double eps,
    torch::Tensor qkv_w, int64_t qkv_type, c10::optional<torch::Tensor> qkv_b,
    torch::Tensor o_w, int64_t o_type, c10::optional<torch::Tensor> o_b,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    torch::Tensor cos, torch::Tensor sin,
    torch::Tensor kv_cache, double k_scale, double v_scale, torch::Tensor slots,
    torch::Tensor block_tables, torch::Tensor seq_lens,
    double scale, int64_t sliding_window, bool q8, int64_t few_rows) {
  const int64_t hidden = x.size(1), q_size = num_heads * head_dim;
  return layer_attn(x, residual, positions, input_norm, eps,
                    BlockProjection{qkv_w, qkv_type, hidden, qkv_b, q8, few_rows},
                    BlockProjection{o_w, o_type, q_size, o_b, q8, few_rows}, num_heads,
                    num_kv_heads, head_dim, cos, sin, kv_cache, k_scale, v_scale, slots,
                    block_tables, seq_lens, scale, sliding_window);
}

std::tuple<torch::Tensor, torch::Tensor> gguf_decode_layer_mlp(
    torch::Tensor o, torch::Tensor res, torch::Tensor post_norm, double eps,
    torch::Tensor gate_up_w, int64_t gate_up_type, c10::optional<torch::Tensor> gate_up_b,
    torch::Tensor down_w, int64_t down_type, c10::optional<torch::Tensor> down_b,
    int64_t intermediate, bool q8, int64_t few_rows) {
  const int64_t hidden = o.size(1);
  return layer_mlp(o, res, post_norm, eps,
                   BlockProjection{gate_up_w, gate_up_type, hidden, gate_up_b, q8, few_rows},
                   BlockProjection{down_w, down_type, intermediate, down_b, q8, few_rows});
}

std::tuple<torch::Tensor, torch::Tensor> gguf_decode_layer(
    torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor positions,
    torch::Tensor input_norm, torch::Tensor post_norm, double eps,
    torch::Tensor qkv_w, int64_t qkv_type, c10::optional<torch::Tensor> qkv_b,
    torch::Tensor o_w, int64_t o_type, c10::optional<torch::Tensor> o_b,
    torch::Tensor gate_up_w, int64_t gate_up_type, c10::optional<torch::Tensor> gate_up_b,
    torch::Tensor down_w, int64_t down_type, c10::optional<torch::Tensor> down_b,
    int64_t intermediate, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    torch::Tensor cos, torch::Tensor sin,
    torch::Tensor kv_cache, double k_scale, double v_scale, torch::Tensor slots,
    torch::Tensor block_tables, torch::Tensor seq_lens,
    double scale, int64_t sliding_window, bool q8, int64_t few_rows) {
  auto [o, res] = gguf_decode_layer_attn(x, residual, positions, input_norm, eps, qkv_w, qkv_type,
                                         qkv_b, o_w, o_type, o_b, num_heads, num_kv_heads, head_dim,
                                         cos, sin, kv_cache, k_scale, v_scale, slots, block_tables,
                                         seq_lens, scale, sliding_window, q8, few_rows);
  return gguf_decode_layer_mlp(o, res, post_norm, eps, gate_up_w, gate_up_type, gate_up_b, down_w,
                               down_type, down_b, intermediate, q8, few_rows);
}
