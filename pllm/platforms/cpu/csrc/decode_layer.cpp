// One decoder layer of the Llama family for a decode-only step of a few
// sequences, in one call: RMSNorm (+ residual), QKV, rotary, KV write, paged
// attention, output projection, RMSNorm (+ residual), gate/up, SiLU-and-mul,
// down. The same kernels the layer's modules call one by one; what this
// saves is the 20-30 Python module calls and torch dispatches per layer,
// which at batch 1 cost about a third as much time as reading the weights.
// Returns (mlp_out, residual) as the layer's torch code does.

std::tuple<torch::Tensor, torch::Tensor> decode_layer(
    torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor positions,
    torch::Tensor input_norm, torch::Tensor post_norm, double eps,
    torch::Tensor qkv_w, c10::optional<torch::Tensor> qkv_b,
    torch::Tensor o_w, c10::optional<torch::Tensor> o_b,
    torch::Tensor gate_up_w, c10::optional<torch::Tensor> gate_up_b,
    torch::Tensor down_w, c10::optional<torch::Tensor> down_b,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    torch::Tensor cos, torch::Tensor sin,
    torch::Tensor kv_cache, torch::Tensor slots, torch::Tensor block_tables, torch::Tensor seq_lens,
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
  torch::Tensor qkv = linear_small(h, qkv_w, qkv_b);
  torch::Tensor q = qkv.narrow(1, 0, q_size).view({m, num_heads, head_dim});
  torch::Tensor k = qkv.narrow(1, q_size, kv_size).view({m, num_kv_heads, head_dim});
  torch::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({m, num_kv_heads, head_dim});
  rotary_(q, k, positions, cos, sin);
  write_kv_(k, v, kv_cache, slots);
  torch::Tensor attn = paged_decode(q, kv_cache, block_tables, seq_lens, scale, sliding_window);
  torch::Tensor o = linear_small(attn.view({m, q_size}), o_w, o_b);
  h = add_rms_norm_(o, res, post_norm, eps);
  torch::Tensor act = silu_and_mul(linear_small(h, gate_up_w, gate_up_b));
  return {linear_small(act, down_w, down_b), res};
}
