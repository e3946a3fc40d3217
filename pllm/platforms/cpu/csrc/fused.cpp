// The small per-layer ops of a decoder, fused so each reads its input once
// and costs one call instead of several: RMSNorm (optionally after adding
// the residual), SiLU(gate) * up, and rotary embedding applied in place.
// fp32, rows split across OpenMP threads when there are enough of them.

#include <algorithm>
#include <cmath>
#include <limits>

namespace {

constexpr int64_t kParallelElements = 1 << 15;  // below this one thread is faster

inline void rms_norm_row(const float* x, const float* w, float eps, int64_t h, float* out) {
  V8 acc = v8_zero();
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    const V8 v = v8_load(x + i);
    acc = v8_fma(v, v, acc);
  }
  float sq = v8_hsum(acc);
  for (; i < h; ++i) sq += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(sq / static_cast<float>(h) + eps);
  const V8 vinv = v8_set1(inv);
  for (i = 0; i + 8 <= h; i += 8) v8_store(out + i, v8_mul(v8_load(w + i), v8_mul(v8_load(x + i), vinv)));
  for (; i < h; ++i) out[i] = w[i] * (x[i] * inv);
}

void check_rows(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && weight.dtype() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && x.size(1) == weight.size(0), "shape mismatch");
}

}  // namespace

namespace {

// RMSNorm of each row of x [M, H]; with ``residual``, first residual += x
// (in place) and normalise the sum.
torch::Tensor norm_rows(torch::Tensor x, float* residual, torch::Tensor weight, double eps) {
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t m = x.size(0), h = x.size(1);
  auto out = torch::empty({m, h}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
#pragma omp parallel for schedule(static) if (m * h >= kParallelElements)
  for (int64_t r = 0; r < m; ++r) {
    const float* row = xp + r * h;
    if (residual != nullptr) {
      float* sum = residual + r * h;
      int64_t i = 0;
      for (; i + 8 <= h; i += 8) v8_store(sum + i, v8_add(v8_load(sum + i), v8_load(row + i)));
      for (; i < h; ++i) sum[i] += row[i];
      row = sum;
    }
    rms_norm_row(row, wp, static_cast<float>(eps), h, op + r * h);
  }
  return out;
}

}  // namespace

// RMSNorm of each row of x [M, H].
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, weight);
  return norm_rows(x, nullptr, weight, eps);
}

// residual += x (in place), then RMSNorm of the new residual.
torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  check_rows(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.dtype() == torch::kFloat32, "residual mismatch");
  TORCH_CHECK(residual.is_contiguous(), "residual must be contiguous");
  return norm_rows(x, residual.data_ptr<float>(), weight, eps);
}

namespace {

inline void silu_mul_span(const float* gate, const float* up, float* out, int64_t n) {
  const V8 one = v8_set1(1.0f), zero = v8_zero();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const V8 g = v8_load(gate + i);
    const V8 silu = v8_div(g, v8_add(one, v8_exp(v8_sub(zero, g))));
    v8_store(out + i, v8_mul(silu, v8_load(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

}  // namespace

// x [M, 2I] = [gate | up] -> silu(gate) * up, [M, I]. x is either row-major
// or column-major (the transposed view the few-row GEMM path returns); the
// result has the same layout, so no transpose is ever copied.
torch::Tensor silu_and_mul(torch::Tensor x) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) % 2 == 0, "fp32 [M, 2I] only");
  const int64_t m = x.size(0), inter = x.size(1) / 2;
  const bool column_major = m > 1 && x.stride(0) == 1 && x.stride(1) == m;
  if (!column_major) x = x.contiguous();
  auto out = column_major ? torch::empty_strided({m, inter}, {1, m}, x.options())
                          : torch::empty({m, inter}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (column_major) {  // gate = the first I * m floats, up = the next
    const int64_t total = inter * m, chunk = 4096;
#pragma omp parallel for schedule(static) if (total >= kParallelElements)
    for (int64_t c = 0; c < total; c += chunk)
      silu_mul_span(xp + c, xp + total + c, op + c, std::min(chunk, total - c));
    return out;
  }
#pragma omp parallel for schedule(static) if (m * inter >= kParallelElements)
  for (int64_t r = 0; r < m; ++r) silu_mul_span(xp + r * 2 * inter, xp + r * 2 * inter + inter, op + r * inter, inter);
  return out;
}

// Rotary embedding (rotate-half layout) in place on q [T, Hq, D] and
// k [T, Hk, D]; the last dim must be contiguous, the others may be strided
// (views of the fused QKV output). cos/sin: [max_positions, D / 2].
void rotary_(torch::Tensor q, torch::Tensor k, torch::Tensor positions, torch::Tensor cos,
             torch::Tensor sin) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(positions.dtype() == torch::kInt64, "positions must be int64");
  cos = cos.contiguous();
  sin = sin.contiguous();
  positions = positions.contiguous();
  const int64_t tokens = q.size(0), half = q.size(2) / 2;
  TORCH_CHECK(cos.size(1) == half && k.size(2) == q.size(2), "rotary shape mismatch");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  struct Part {
    float* base;
    int64_t heads, s0, s1;
  };
  const Part parts[2] = {{q.data_ptr<float>(), q.size(1), q.stride(0), q.stride(1)},
                         {k.data_ptr<float>(), k.size(1), k.stride(0), k.stride(1)}};
#pragma omp parallel for schedule(static) if (tokens * (q.size(1) + k.size(1)) * half >= kParallelElements)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = cp + pos[t] * half;
    const float* s = sp + pos[t] * half;
    for (const Part& part : parts) {
      for (int64_t h = 0; h < part.heads; ++h) {
        float* x1 = part.base + t * part.s0 + h * part.s1;
        float* x2 = x1 + half;
        int64_t i = 0;
        for (; i + 8 <= half; i += 8) {
          const V8 a = v8_load(x1 + i), b = v8_load(x2 + i), vc = v8_load(c + i), vs = v8_load(s + i);
          v8_store(x1 + i, v8_sub(v8_mul(a, vc), v8_mul(b, vs)));
          v8_store(x2 + i, v8_add(v8_mul(b, vc), v8_mul(a, vs)));
        }
        for (; i < half; ++i) {
          const float a = x1[i], b = x2[i];
          x1[i] = a * c[i] - b * s[i];
          x2[i] = b * c[i] + a * s[i];
        }
      }
    }
  }
}

namespace {

// x / scale rounded to the 8-bit float F8 (nearest, ties to even), saturated to
// its largest finite value: ``pllm.core.kv_cache.fp8.quantize``, whose clamp
// and ``.to()`` are these very comparisons and torch's own conversion.
template <typename F8>
inline void quantize_row(const float* x, int64_t d, float scale, uint8_t* out) {
  const float fmax = static_cast<float>(std::numeric_limits<F8>::max());
  for (int64_t i = 0; i < d; ++i) {
    const float y = std::min(std::max(x[i] / scale, -fmax), fmax);  // NaN stays NaN, as in clamp_
    out[i] = F8(y).x;
  }
}

}  // namespace

// Store one step's K and V [T, Hk, D] (the last dim contiguous, the others
// may be strided views of the QKV output) into the head-major cache
// [2, Hk, blocks, block_size, D] at the flat slots; slot -1 is skipped. An
// 8-bit cache (float8_e4m3fn or float8_e5m2) gets K / k_scale and V / v_scale,
// quantized; an fp32 one the values as they are (the scales unused).
void write_kv_(torch::Tensor key, torch::Tensor value, torch::Tensor kv_cache, torch::Tensor slots,
               double k_scale, double v_scale) {
  const auto cache_dtype = kv_cache.scalar_type();
  TORCH_CHECK(key.dtype() == torch::kFloat32 && value.dtype() == torch::kFloat32 &&
                  (cache_dtype == at::kFloat || cache_dtype == at::kFloat8_e4m3fn ||
                   cache_dtype == at::kFloat8_e5m2),
              "fp32 K/V into an fp32, float8_e4m3fn or float8_e5m2 cache only");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1 && kv_cache.is_contiguous(),
              "layout mismatch");
  TORCH_CHECK(slots.dtype() == torch::kInt64, "slots must be int64");
  slots = slots.contiguous();
  const int64_t tokens = key.size(0), heads = key.size(1), d = key.size(2);
  const int64_t per_head = kv_cache.size(2) * kv_cache.size(3) * d;
  const float* kp = key.data_ptr<float>();
  const float* vp = value.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1);
  const int64_t vs0 = value.stride(0), vs1 = value.stride(1);
  const int64_t num_slots = kv_cache.size(2) * kv_cache.size(3);
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(sp[t] < num_slots, "slot ", sp[t], " is outside the cache");
  const float k_div = static_cast<float>(k_scale), v_div = static_cast<float>(v_scale);
  // Rounding to 8 bits costs about as much per element as 8 copies.
  const int64_t work = tokens * heads * d * (cache_dtype == at::kFloat ? 1 : 8);
  // row(head vector, element offset in the cache, scale) stores one K or V vector.
  auto store = [&](auto row) {
#pragma omp parallel for schedule(static) if (work >= kParallelElements)
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t slot = sp[t];
      if (slot < 0) continue;
      for (int64_t h = 0; h < heads; ++h) {
        row(kp + t * ks0 + h * ks1, h * per_head + slot * d, k_div);
        row(vp + t * vs0 + h * vs1, (heads + h) * per_head + slot * d, v_div);
      }
    }
  };
  if (cache_dtype == at::kFloat) {
    float* cache = kv_cache.data_ptr<float>();
    store([&](const float* x, int64_t at, float) { std::copy_n(x, d, cache + at); });
  } else if (cache_dtype == at::kFloat8_e4m3fn) {
    uint8_t* cache = static_cast<uint8_t*>(kv_cache.data_ptr());
    store([&](const float* x, int64_t at, float scale) {
      quantize_row<c10::Float8_e4m3fn>(x, d, scale, cache + at);
    });
  } else {
    uint8_t* cache = static_cast<uint8_t*>(kv_cache.data_ptr());
    store([&](const float* x, int64_t at, float scale) {
      quantize_row<c10::Float8_e5m2>(x, d, scale, cache + at);
    });
  }
}
