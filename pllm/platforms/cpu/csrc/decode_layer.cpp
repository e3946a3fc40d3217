// One decoder layer of the Llama family for a decode-only step, in one call:
// RMSNorm (+ residual), QKV, rotary, KV write, paged attention, output
// projection, RMSNorm (+ residual), gate/up, SiLU-and-mul, down. The same
// kernels and products the layer's modules use one by one (``linear_small``
// up to ``few_rows`` rows, else ``weight @ x.T``, whose column-major result
// the next kernels take as it is); what this saves is the 20-30 Python module
// calls and torch dispatches per layer, which at batch 1 cost about a third
// as much time as reading the weights. Returns (mlp_out, residual) as the
// layer's torch code does. The cache is fp32 or 8-bit (float8_e4m3fn,
// float8_e5m2: K/V stored divided by k_scale/v_scale, as ``write_kv_`` and
// ``paged_decode`` take them; the scales are unused with an fp32 cache).

namespace {

// Heads [m, heads, head_dim] of the QKV product's columns [offset, offset + heads * head_dim):
// a view when head vectors are contiguous (row-major product), a copy when
// the product came back column-major (rotary and the KV write need them contiguous).
torch::Tensor qkv_heads(const torch::Tensor& qkv, int64_t offset, int64_t heads, int64_t head_dim) {
  torch::Tensor t = qkv.narrow(1, offset, heads * head_dim).reshape({qkv.size(0), heads, head_dim});
  return t.stride(2) == 1 ? t : t.contiguous();
}

torch::Tensor decode_linear(const torch::Tensor& x, const torch::Tensor& w,
                            const c10::optional<torch::Tensor>& b, int64_t few_rows) {
  if (x.size(0) <= few_rows) return linear_small(x, w, b);
  torch::Tensor out = at::matmul(w, x.t()).t();
  return b.has_value() ? out + b.value() : out;
}

// A projection with fp32 weights, as the layer's CPULinear runs it.
struct DenseProjection {
  const torch::Tensor& w;
  const c10::optional<torch::Tensor>& b;
  int64_t few_rows;
  torch::Tensor operator()(const torch::Tensor& x) const { return decode_linear(x, w, b, few_rows); }
};

// The attention half over any projection type (``Proj(x) -> x @ W^T + b``).
template <class Proj>
std::tuple<torch::Tensor, torch::Tensor> layer_attn(
    torch::Tensor x, const c10::optional<torch::Tensor>& residual, const torch::Tensor& positions,
    const torch::Tensor& input_norm, double eps, const Proj& qkv_proj, const Proj& o_proj,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, const torch::Tensor& cos,
    const torch::Tensor& sin, torch::Tensor kv_cache, double k_scale, double v_scale,
    const torch::Tensor& slots, const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
    double scale, int64_t sliding_window) {
  const int64_t m = x.size(0);
  torch::Tensor res, h;
  if (residual.has_value()) {
    res = residual.value().contiguous();
    h = add_rms_norm_(x, res, input_norm, eps);
  } else {
    res = x.contiguous();
    h = rms_norm(res, input_norm, eps);
  }
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  torch::Tensor qkv = qkv_proj(h);
  torch::Tensor q = qkv_heads(qkv, 0, num_heads, head_dim);
  torch::Tensor k = qkv_heads(qkv, q_size, num_kv_heads, head_dim);
  torch::Tensor v = qkv_heads(qkv, q_size + kv_size, num_kv_heads, head_dim);
  rotary_(q, k, positions, cos, sin);
  write_kv_(k, v, kv_cache, slots, k_scale, v_scale);
  torch::Tensor attn = paged_decode(q, kv_cache, block_tables, seq_lens, scale, sliding_window,
                                    k_scale, v_scale, 0.0);  // no soft-cap in a fused layer
  return {o_proj(attn.view({m, q_size})), res};
}

// The MLP half over any projection type.
template <class Proj>
std::tuple<torch::Tensor, torch::Tensor> layer_mlp(torch::Tensor o, torch::Tensor res,
                                                   const torch::Tensor& post_norm, double eps,
                                                   const Proj& gate_up_proj, const Proj& down_proj) {
  torch::Tensor h = add_rms_norm_(o, res, post_norm, eps);
  torch::Tensor act = silu_and_mul(gate_up_proj(h));
  return {down_proj(act), res};
}

}  // namespace

// The attention half: the input norm (with the residual add), QKV, rotary, the
// KV write, paged attention and o_proj. Returns (o_proj output, residual).
std::tuple<torch::Tensor, torch::Tensor> decode_layer_attn(
    torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor positions,
    torch::Tensor input_norm, double eps,
    torch::Tensor qkv_w, c10::optional<torch::Tensor> qkv_b,
    torch::Tensor o_w, c10::optional<torch::Tensor> o_b,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    torch::Tensor cos, torch::Tensor sin,
    torch::Tensor kv_cache, double k_scale, double v_scale, torch::Tensor slots,
    torch::Tensor block_tables, torch::Tensor seq_lens,
    double scale, int64_t sliding_window, int64_t few_rows) {
  return layer_attn(x, residual, positions, input_norm, eps, DenseProjection{qkv_w, qkv_b, few_rows},
                    DenseProjection{o_w, o_b, few_rows}, num_heads, num_kv_heads, head_dim, cos, sin,
                    kv_cache, k_scale, v_scale, slots, block_tables, seq_lens, scale, sliding_window);
}

// The MLP half: the post-attention norm (adding ``o`` into the residual in
// place), gate/up, SiLU-and-mul and down_proj. Returns (down_proj output, residual).
std::tuple<torch::Tensor, torch::Tensor> decode_layer_mlp(
    torch::Tensor o, torch::Tensor res, torch::Tensor post_norm, double eps,
    torch::Tensor gate_up_w, c10::optional<torch::Tensor> gate_up_b,
    torch::Tensor down_w, c10::optional<torch::Tensor> down_b, int64_t few_rows) {
  return layer_mlp(o, res, post_norm, eps, DenseProjection{gate_up_w, gate_up_b, few_rows},
                   DenseProjection{down_w, down_b, few_rows});
}

// The whole layer in one call (one rank); under tensor parallelism the two
// halves run apart, with an all-reduce after each.
std::tuple<torch::Tensor, torch::Tensor> decode_layer(
    torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor positions,
    torch::Tensor input_norm, torch::Tensor post_norm, double eps,
    torch::Tensor qkv_w, c10::optional<torch::Tensor> qkv_b,
    torch::Tensor o_w, c10::optional<torch::Tensor> o_b,
    torch::Tensor gate_up_w, c10::optional<torch::Tensor> gate_up_b,
    torch::Tensor down_w, c10::optional<torch::Tensor> down_b,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    torch::Tensor cos, torch::Tensor sin,
    torch::Tensor kv_cache, double k_scale, double v_scale, torch::Tensor slots,
    torch::Tensor block_tables, torch::Tensor seq_lens,
    double scale, int64_t sliding_window, int64_t few_rows) {
  auto [o, res] = decode_layer_attn(x, residual, positions, input_norm, eps, qkv_w, qkv_b, o_w, o_b,
                                    num_heads, num_kv_heads, head_dim, cos, sin, kv_cache,
                                    k_scale, v_scale, slots, block_tables, seq_lens, scale,
                                    sliding_window, few_rows);
  return decode_layer_mlp(o, res, post_norm, eps, gate_up_w, gate_up_b, down_w, down_b, few_rows);
}
