// y = x W^T (+ b) in fp32 for the few rows of a decode step.
//
// With one to a couple of dozen rows the product is bound by reading W, and
// a general GEMM wastes most of that read: MKL runs a single row on one
// thread (about 11 GB/s here) and packs W on every call for a few rows. Here
// each thread streams its share of W's rows exactly once, and every weight
// vector it loads is used for all rows of x (``dot_tile``), so the product
// runs near memory bandwidth up to about 16 rows.

torch::Tensor linear_small(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && weight.dtype() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "shape mismatch");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (M == 1) {  // one row: four independent accumulators keep the loads in flight
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float* wr = wp + n * K;
      V8 a = v8_zero(), b = v8_zero(), c = v8_zero(), d = v8_zero();
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        a = v8_fma(v8_load(wr + k), v8_load(xp + k), a);
        b = v8_fma(v8_load(wr + k + 8), v8_load(xp + k + 8), b);
        c = v8_fma(v8_load(wr + k + 16), v8_load(xp + k + 16), c);
        d = v8_fma(v8_load(wr + k + 24), v8_load(xp + k + 24), d);
      }
      float acc = v8_hsum(v8_add(v8_add(a, b), v8_add(c, d)));
      for (; k < K; ++k) acc += wr[k] * xp[k];
      op[n] = acc;
    }
  } else {
    constexpr int NB = 4;  // weight rows per tile
    const int64_t tiles = N / NB;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const float* w = wp + t * NB * K;
      float* o = op + t * NB;
      int64_t m = 0;
      for (; m + 3 <= M; m += 3) dot_tile<3, NB, true>(xp + m * K, K, w, K, K, o + m * N, N);
      if (M - m == 2) dot_tile<2, NB, true>(xp + m * K, K, w, K, K, o + m * N, N);
      if (M - m == 1) dot_tile<1, NB, true>(xp + m * K, K, w, K, K, o + m * N, N);
    }
    for (int64_t n = tiles * NB; n < N; ++n)
      for (int64_t m = 0; m < M; ++m) dot_tile<1, 1, false>(xp + m * K, K, wp + n * K, K, K, op + m * N + n, N);
  }
  if (bias.has_value()) out.add_(bias.value());
  return out;
}
