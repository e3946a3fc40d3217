// Paged attention for single-token decodes, fp32, on the CPU platform's
// head-major cache layout:
//
//   kv_cache[0 = K | 1 = V][kv_head][block][offset_in_block][head_dim]
//
// One OpenMP task per (sequence, KV head) reads that head's K and V straight
// from the blocks named by the block table (no gather copy), for all query
// heads of its GQA group at once:
//   1. scores: each K vector loaded is used for up to 3 query heads and each
//      query vector for 4 tokens (``dot_tile``), one horizontal sum per score;
//   2. softmax in fp32 with a vectorised exp;
//   3. P V: up to 3 heads x 32 output lanes accumulate in registers while the
//      V rows stream past.
// head_dim must be a multiple of 8 (the Python side checks).

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <int NB>
inline void score_tokens(const float* q, int64_t group, int64_t d, const float* k, float* scores,
                         int64_t span) {
  int64_t g = 0;
  for (; g + 3 <= group; g += 3) dot_tile<3, NB, false>(q + g * d, d, k, d, d, scores + g * span, span);
  if (group - g == 2) dot_tile<2, NB, false>(q + g * d, d, k, d, d, scores + g * span, span);
  if (group - g == 1) dot_tile<1, NB, false>(q + g * d, d, k, d, d, scores + g * span, span);
}

// Softmax of ``n`` scores in place (after scaling); returns 1 / sum.
inline float softmax_unnormalised(float* s, int64_t n, float scale) {
  float mx = -std::numeric_limits<float>::infinity();
  int64_t t = 0;
  if (n >= 8) {
    V8 m = v8_load(s);
    for (t = 8; t + 8 <= n; t += 8) m = v8_max(m, v8_load(s + t));
    mx = v8_hmax(m);
  }
  for (; t < n; ++t) mx = std::max(mx, s[t]);
  const V8 vscale = v8_set1(scale), vshift = v8_set1(mx * scale);
  V8 vsum = v8_zero();
  for (t = 0; t + 8 <= n; t += 8) {
    const V8 e = v8_exp(v8_sub(v8_mul(v8_load(s + t), vscale), vshift));
    v8_store(s + t, e);
    vsum = v8_add(vsum, e);
  }
  float sum = v8_hsum(vsum);
  for (; t < n; ++t) {
    s[t] = std::exp(s[t] * scale - mx * scale);
    sum += s[t];
  }
  return 1.0f / sum;
}

// Blocks sit anywhere in the cache, so the hardware prefetcher stalls at
// every block boundary: while one block is read, the next one is requested.
inline void prefetch_floats(const float* p, int64_t count) {
  for (int64_t i = 0; i < count; i += 16) prefetch(p + i);  // one 64-byte line each
}

struct SeqView {
  const int32_t* table;
  int64_t block_size, start, len;
};

// out[g][d0 : d0 + 8 * DB] = inv[g] * sum_t p[g][t] V[t][d0 : ...] for GB heads.
template <int GB, int DB>
inline void weighted_values(const SeqView& sv, const float* v_head, int64_t d, int64_t d0,
                            const float* probs, int64_t span, const float* inv, float* out) {
  V8 acc[GB][DB];
  for (int g = 0; g < GB; ++g)
    for (int b = 0; b < DB; ++b) acc[g][b] = v8_zero();
  for (int64_t t = sv.start; t < sv.len;) {
    const int64_t off = t % sv.block_size;
    const int64_t count = std::min(sv.block_size - off, sv.len - t);
    const float* row = v_head + (static_cast<int64_t>(sv.table[t / sv.block_size]) * sv.block_size + off) * d + d0;
    const float* p = probs + (t - sv.start);
    const int64_t next = (t + count) / sv.block_size;
    const float* next_row = next * sv.block_size < sv.len
        ? v_head + static_cast<int64_t>(sv.table[next]) * sv.block_size * d + d0 : nullptr;
    for (int64_t j = 0; j < count; ++j, row += d) {
      if (next_row != nullptr) prefetch_floats(next_row + j * d, 8 * DB);
      V8 vv[DB];
      for (int b = 0; b < DB; ++b) vv[b] = v8_load(row + 8 * b);
      for (int g = 0; g < GB; ++g) {
        const V8 pg = v8_set1(p[g * span + j]);
        for (int b = 0; b < DB; ++b) acc[g][b] = v8_fma(pg, vv[b], acc[g][b]);
      }
    }
    t += count;
  }
  for (int g = 0; g < GB; ++g) {
    const V8 scale = v8_set1(inv[g]);
    for (int b = 0; b < DB; ++b) v8_store(out + g * d + d0 + 8 * b, v8_mul(acc[g][b], scale));
  }
}

template <int GB>
inline void weighted_values_heads(const SeqView& sv, const float* v_head, int64_t d, const float* probs,
                                  int64_t span, const float* inv, float* out) {
  int64_t d0 = 0;
  for (; d0 + 32 <= d; d0 += 32) weighted_values<GB, 4>(sv, v_head, d, d0, probs, span, inv, out);
  switch ((d - d0) / 8) {
    case 3: weighted_values<GB, 3>(sv, v_head, d, d0, probs, span, inv, out); break;
    case 2: weighted_values<GB, 2>(sv, v_head, d, d0, probs, span, inv, out); break;
    case 1: weighted_values<GB, 1>(sv, v_head, d, d0, probs, span, inv, out); break;
    default: break;
  }
}

}  // namespace

torch::Tensor paged_decode(torch::Tensor query,         // [n, Hq, D] fp32
                           torch::Tensor kv_cache,      // [2, Hkv, NB, BS, D] fp32
                           torch::Tensor block_tables,  // [n, W] int32
                           torch::Tensor seq_lens,      // [n] int32
                           double scale, int64_t sliding_window) {
  TORCH_CHECK(query.dtype() == torch::kFloat32 && kv_cache.dtype() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(query.size(2) % 8 == 0, "head_dim must be a multiple of 8");
  TORCH_CHECK(kv_cache.is_contiguous(), "the KV cache must be contiguous");
  query = query.contiguous();
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
      if (span <= 0) {  // a padding row (no context): zeros, not 0/0
        std::fill_n(o + (s * hq + h * group) * d, group * d, 0.0f);
        continue;
      }
      thread_local std::vector<float> scratch;
      if (static_cast<int64_t>(scratch.size()) < group * (span + 1))
        scratch.resize(group * (span + 1));
      float* scores = scratch.data();        // [group][span]
      float* inv = scores + group * span;    // [group]
      const SeqView sv{tables + s * width, bs, start, len};
      const float* qs = q + (s * hq + h * group) * d;
      const float* k_head = k_base + h * nb * bs * d;
      const float* v_head = v_base + h * nb * bs * d;

      for (int64_t t = start; t < len;) {
        const int64_t off = t % bs;
        const int64_t count = std::min(bs - off, len - t);
        const float* k = k_head + (static_cast<int64_t>(sv.table[t / bs]) * bs + off) * d;
        float* sc = scores + (t - start);
        const int64_t next = (t + count) / bs;
        const float* next_k = next * bs < len ? k_head + static_cast<int64_t>(sv.table[next]) * bs * d : nullptr;
        int64_t j = 0;
        for (; j + 4 <= count; j += 4) {
          if (next_k != nullptr) prefetch_floats(next_k + j * d, 4 * d);
          score_tokens<4>(qs, group, d, k + j * d, sc + j, span);
        }
        for (; j < count; ++j) {
          if (next_k != nullptr) prefetch_floats(next_k + j * d, d);
          score_tokens<1>(qs, group, d, k + j * d, sc + j, span);
        }
        t += count;
      }
      for (int64_t g = 0; g < group; ++g) inv[g] = softmax_unnormalised(scores + g * span, span, fscale);

      float* os = o + (s * hq + h * group) * d;
      int64_t g = 0;
      for (; g + 3 <= group; g += 3)
        weighted_values_heads<3>(sv, v_head, d, scores + g * span, span, inv + g, os + g * d);
      if (group - g == 2) weighted_values_heads<2>(sv, v_head, d, scores + g * span, span, inv + g, os + g * d);
      if (group - g == 1) weighted_values_heads<1>(sv, v_head, d, scores + g * span, span, inv + g, os + g * d);
    }
  }
  return out;
}
