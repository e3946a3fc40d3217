// Paged attention for single-token decodes (fp32 queries; an fp32 or 8-bit
// cache), on the CPU platform's head-major cache layout:
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
//
// A soft-cap ``c`` > 0 (Gemma 2) bends each scaled score ``s`` into
// ``c * tanh(s / c)`` before the softmax.
//
// An 8-bit cache (float8_e4m3fn or float8_e5m2) is read as fp32 times
// k_scale (v_scale), exactly what ``dequantize`` gives (``Fp8Reader``). Each
// task converts its span of K rows into fp32 scratch, scores them as above,
// then does the same with the V rows: steps 1-3 run unchanged on the scratch.

#include <algorithm>
#include <array>
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

// ``cap * tanh(scale * s / cap)`` in place, as ``cap * (1 - 2 / (e^{2x} + 1))``
// (``v8_exp`` clamps its argument, so the ends come out as +-cap, not NaN).
inline void soft_cap_scores(float* s, int64_t n, float scale, float cap) {
  const V8 k = v8_set1(2.0f * scale / cap), one = v8_set1(1.0f), two = v8_set1(2.0f);
  const V8 vcap = v8_set1(cap);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const V8 e = v8_exp(v8_mul(v8_load(s + t), k));
    v8_store(s + t, v8_mul(vcap, v8_sub(one, v8_div(two, v8_add(e, one)))));
  }
  for (; t < n; ++t) s[t] = cap * std::tanh(s[t] * scale / cap);
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

// scores[g][t - start] = q_g . K[t] for the group's query heads, t in [start, len).
inline void score_span(const SeqView& sv, const float* k_head, int64_t d, const float* qs,
                       int64_t group, float* scores, int64_t span) {
  const int64_t bs = sv.block_size;
  for (int64_t t = sv.start; t < sv.len;) {
    const int64_t off = t % bs;
    const int64_t count = std::min(bs - off, sv.len - t);
    const float* k = k_head + (static_cast<int64_t>(sv.table[t / bs]) * bs + off) * d;
    float* sc = scores + (t - sv.start);
    const int64_t next = (t + count) / bs;
    const float* next_k =
        next * bs < sv.len ? k_head + static_cast<int64_t>(sv.table[next]) * bs * d : nullptr;
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
}

// An 8-bit cache format read as fp32 times ``scale``: ``dequantize``, exactly.
#if defined(__AVX2__) && defined(__F16C__) && !defined(PLLM_FP8_TABLE)
// Both formats widen exactly to fp16, and fp16 -> fp32 is exact: float8_e5m2
// is the top byte of the fp16 of the same value; float8_e4m3fn's exponent and
// mantissa moved to bits 7-13 are the fp16 of x / 256 (a bias 8 below fp16's),
// normal or subnormal alike, and its one NaN (magnitude 0x7F) gets fp16's
// all-ones exponent. The 256 is folded into the scale (a power of two: exact).
// ``tests/test_cpu_kernels.py`` reads every byte of both formats back.
struct Fp8Reader {
  bool e5m2;
  float scale;

  inline V8 read8(const uint8_t* src) const {
    const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
    if (e5m2) return v8_mul({_mm256_cvtph_ps(_mm_slli_epi16(b, 8))}, v8_set1(scale));
    const __m128i mag = _mm_and_si128(b, _mm_set1_epi16(0x7F));
    const __m128i sign = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8);
    const __m128i nan = _mm_and_si128(_mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7F)),
                                      _mm_set1_epi16(0x7C00));
    const __m128i h = _mm_or_si128(_mm_or_si128(_mm_slli_epi16(mag, 7), sign), nan);
    return v8_mul({_mm256_cvtph_ps(h)}, v8_set1(scale * 256.0f));
  }
};

Fp8Reader fp8_reader(c10::ScalarType dtype, double scale) {
  TORCH_CHECK(dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2,
              "8-bit caches are float8_e4m3fn or float8_e5m2");
  return {dtype == at::kFloat8_e5m2, static_cast<float>(scale)};
}
#else
// Portable: a table of every byte's value (torch's own conversion) times the scale.
struct Fp8Reader {
  std::array<float, 256> table;

  inline V8 read8(const uint8_t* src) const {
    float r[8];
    for (int i = 0; i < 8; ++i) r[i] = table[src[i]];
    return v8_load(r);
  }
};

template <typename F8>
Fp8Reader fp8_reader(float scale) {
  Fp8Reader r;
  for (int b = 0; b < 256; ++b)
    r.table[b] = static_cast<float>(F8(static_cast<uint8_t>(b), F8::from_bits())) * scale;
  return r;
}

Fp8Reader fp8_reader(c10::ScalarType dtype, double scale) {
  const float s = static_cast<float>(scale);
  if (dtype == at::kFloat8_e5m2) return fp8_reader<c10::Float8_e5m2>(s);
  TORCH_CHECK(dtype == at::kFloat8_e4m3fn, "8-bit caches are float8_e4m3fn or float8_e5m2");
  return fp8_reader<c10::Float8_e4m3fn>(s);
}
#endif

// Rows [start, len) of one KV head of an 8-bit cache as fp32, contiguous in out[span][d].
inline void decode_span(const SeqView& sv, const uint8_t* head, int64_t d, const Fp8Reader& fmt,
                        float* out) {
  const int64_t bs = sv.block_size;
  for (int64_t t = sv.start; t < sv.len;) {
    const int64_t off = t % bs;
    const int64_t count = std::min(bs - off, sv.len - t);
    const uint8_t* src = head + (static_cast<int64_t>(sv.table[t / bs]) * bs + off) * d;
    const int64_t next = (t + count) / bs;
    if (next * bs < sv.len) {  // the next block, 64 bytes a line
      const uint8_t* next_src = head + static_cast<int64_t>(sv.table[next]) * bs * d;
      for (int64_t i = 0; i < std::min(bs, sv.len - next * bs) * d; i += 64) prefetch(next_src + i);
    }
    float* dst = out + (t - sv.start) * d;
    for (int64_t i = 0; i < count * d; i += 8) v8_store(dst + i, fmt.read8(src + i));
    t += count;
  }
}

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
                           torch::Tensor kv_cache,      // [2, Hkv, NB, BS, D] fp32 or 8-bit
                           torch::Tensor block_tables,  // [n, W] int32
                           torch::Tensor seq_lens,      // [n] int32
                           double scale, int64_t sliding_window,
                           double k_scale, double v_scale,  // 8-bit caches only
                           double soft_cap) {               // 0: none
  const bool fp8 = kv_cache.element_size() == 1;
  TORCH_CHECK(query.dtype() == torch::kFloat32 && (fp8 || kv_cache.dtype() == torch::kFloat32),
              "fp32 queries, fp32 or 8-bit cache only");
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
  const int64_t v_offset = hkv * nb * bs * d;  // elements from K to V
  const float* k_base = fp8 ? nullptr : kv_cache.data_ptr<float>();
  const uint8_t* k8_base = fp8 ? static_cast<const uint8_t*>(kv_cache.data_ptr()) : nullptr;
  Fp8Reader k_fmt{}, v_fmt{};  // 8-bit caches only
  if (fp8) {
    k_fmt = fp8_reader(kv_cache.scalar_type(), k_scale);
    v_fmt = fp8_reader(kv_cache.scalar_type(), v_scale);
  }
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(soft_cap);
  static const int32_t kFirstBlock = 0;  // the table of an 8-bit task's fp32 scratch

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
      const int64_t need = group * (span + 1) + (fp8 ? span * d : 0);
      if (static_cast<int64_t>(scratch.size()) < need) scratch.resize(need);
      float* scores = scratch.data();        // [group][span]
      float* inv = scores + group * span;    // [group]
      float* rows = inv + group;             // [span][D], 8-bit caches: K, then V, in fp32
      const SeqView sv{tables + s * width, bs, start, len};
      const float* qs = q + (s * hq + h * group) * d;
      const int64_t head = h * nb * bs * d;

      // An 8-bit cache: both passes read fp32 scratch, as one block of ``span`` tokens.
      const SeqView flat{&kFirstBlock, span, 0, span};
      if (fp8) {
        decode_span(sv, k8_base + head, d, k_fmt, rows);
        score_span(flat, rows, d, qs, group, scores, span);
      } else {
        score_span(sv, k_base + head, d, qs, group, scores, span);
      }
      // The scale goes into the cap's argument; the softmax then takes 1.
      if (cap > 0.0f) soft_cap_scores(scores, group * span, fscale, cap);
      const float softmax_scale = cap > 0.0f ? 1.0f : fscale;
      for (int64_t g = 0; g < group; ++g)
        inv[g] = softmax_unnormalised(scores + g * span, span, softmax_scale);

      if (fp8) decode_span(sv, k8_base + v_offset + head, d, v_fmt, rows);
      const SeqView& v_view = fp8 ? flat : sv;
      const float* v_head = fp8 ? rows : k_base + v_offset + head;
      float* os = o + (s * hq + h * group) * d;
      int64_t g = 0;
      for (; g + 3 <= group; g += 3)
        weighted_values_heads<3>(v_view, v_head, d, scores + g * span, span, inv + g, os + g * d);
      if (group - g == 2)
        weighted_values_heads<2>(v_view, v_head, d, scores + g * span, span, inv + g, os + g * d);
      if (group - g == 1)
        weighted_values_heads<1>(v_view, v_head, d, scores + g * span, span, inv + g, os + g * d);
    }
  }
  return out;
}
