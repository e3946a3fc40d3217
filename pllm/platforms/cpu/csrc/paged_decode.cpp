// Paged attention for single-token decodes, fp32, on the CPU platform's
// head-major cache layout:
//
//   kv_cache[0 = K | 1 = V][kv_head][block][offset_in_block][head_dim]
//
// One OpenMP task per (sequence, KV head) reads that head's K and V exactly
// once, straight from the blocks named by the block table (no gather copy),
// for all query heads of its GQA group, with a two-pass softmax in fp32.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

torch::Tensor paged_decode(torch::Tensor query,         // [n, Hq, D] fp32
                           torch::Tensor kv_cache,      // [2, Hkv, NB, BS, D] fp32
                           torch::Tensor block_tables,  // [n, W] int32
                           torch::Tensor seq_lens,      // [n] int32
                           double scale, int64_t sliding_window) {
  TORCH_CHECK(query.dtype() == torch::kFloat32 && kv_cache.dtype() == torch::kFloat32, "fp32 only");
  query = query.contiguous();
  kv_cache = kv_cache.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  const int64_t n = query.size(0), hq = query.size(1), d = query.size(2);
  const int64_t hkv = kv_cache.size(1), nb = kv_cache.size(2), bs = kv_cache.size(3);
  const int64_t group = hq / hkv, width = block_tables.size(1);
  auto out = torch::empty_like(query);
  const float* q = query.data_ptr<float>();
  const float* k_base = kv_cache.data_ptr<float>();
  const float* v_base = k_base + hkv * nb * bs * d;
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t h = 0; h < hkv; ++h) {
      const int64_t len = lens[s];
      const int64_t start = sliding_window > 0 ? std::max<int64_t>(0, len - sliding_window) : 0;
      const int64_t span = len - start;
      std::vector<float> scores(group * span);
      std::vector<float> acc(group * d, 0.0f);
      const float* qs = q + (s * hq + h * group) * d;
      const float* k_head = k_base + h * nb * bs * d;
      const float* v_head = v_base + h * nb * bs * d;
      // Pass 1: scores.
      for (int64_t t = start; t < len; ++t) {
        const int64_t block = tables[s * width + t / bs];
        const float* kt = k_head + (block * bs + t % bs) * d;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qs + g * d;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < d; ++i) dot += qg[i] * kt[i];
          scores[g * span + (t - start)] = dot * fscale;
        }
      }
      // Softmax per query head.
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * span;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < span; ++t) mx = std::max(mx, sg[t]);
        float sum = 0.0f;
        for (int64_t t = 0; t < span; ++t) {
          sg[t] = std::exp(sg[t] - mx);
          sum += sg[t];
        }
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < span; ++t) sg[t] *= inv;
      }
      // Pass 2: weighted sum of V.
      for (int64_t t = start; t < len; ++t) {
        const int64_t block = tables[s * width + t / bs];
        const float* vt = v_head + (block * bs + t % bs) * d;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * span + (t - start)];
          float* ag = acc.data() + g * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) ag[i] += p * vt[i];
        }
      }
      float* os = o + (s * hq + h * group) * d;
      std::copy(acc.begin(), acc.end(), os);
    }
  }
  return out;
}
