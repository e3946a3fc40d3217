// y[M, N] = x[M, K] @ W^T with W [N, K] kept in a GGUF block format: each
// weight row is K / block_elems consecutive ggml blocks (a GGUF tensor's raw
// bytes seen as uint8 [N, row_bytes]). Nothing is dequantized ahead of time.
//
// Every format is read as 32-element sub-blocks; element i of a sub-block is
//     d[i / 16] * q[i] + m          (q 8-bit, signed or unsigned)
// which is how the kernels below see them:
//
//   Q8_0  34 B: | d f16 | q int8 x32 |                               q signed
//   Q4_0  18 B: | d f16 | 16 B: lo nibble = q[i], hi = q[i+16] | -8   q signed
//   Q4_1  20 B: | d f16 | m f16 | 16 B nibbles as Q4_0 |              q unsigned
//   Q4_K 144 B: | d f16 | dmin f16 | 12 B 6-bit (sc, mn) x8 | 128 B nibbles |
//               sub j: bytes 32*(j/2).., nibble j%2; d*sc[j]*q - dmin*mn[j]
//   Q5_K 176 B: | d | dmin | 12 B scales | 32 B qh: bit j = q's 5th bit | 128 B |
//   Q6_K 210 B: | 128 B ql nibbles | 64 B qh 2-bit | 16 x int8 scale | d f16 |
//               16-element scales: sub j uses sc[2j], sc[2j+1]; q - 32
//
// Two products per call:
// - few rows (decode): each thread takes a share of W's rows; each sub-block
//   is decoded once into registers and used for all (up to 8) rows of x.
//   Activations stay fp32 (weights widened to fp32 lanes, FMA) or, with
//   ``q8``, are quantized per 32 elements (scale dx, and dx * sum(q) for the
//   formats with an offset) and the products are 8-bit integer dot products.
//   The 32-element formats (Q4_0, Q4_1, Q8_0) take a path of their own
//   (see "block by block" below): several weight rows per pass over x, the
//   scales as vectors, and the offset term kept apart.
// - many rows (prefill): tiles of W's rows are dequantized into a per-thread
//   fp32 scratch and multiplied by at::mm; W is never dequantized whole.
//
// ISA paths: portable scalar (always), AVX2 + FMA + F16C, and AVX-512 (BW +
// VL): the few-row products on 16 lanes (fp32, and 512-bit integer dot
// products, VNNI where the compiler targets it, for q8); the rest of the
// AVX-512 path (dequantizing tiles, sub-block decoding) is the AVX2 code.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PLLM_GGUF_AVX2 1
#include <immintrin.h>
#endif
#if defined(PLLM_GGUF_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PLLM_GGUF_AVX512 1
#endif

namespace gguf {

enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };
constexpr int kMaxRows = 8;  // rows of x sharing one decoded sub-block
constexpr int64_t kPrefetchRows = 16;  // weight rows read ahead in the few-row product

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef __F16C__
  return _cvtsh_ss(h);
#else  // exact either way: every fp16 is an fp32
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while ((man & 0x400) == 0) { man <<= 1; --exp; }
    bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// The 6-bit (scale, min) pair j of a Q4_K / Q5_K super-block.
inline void k_scale_min(const uint8_t* s, int j, int& sc, int& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
    mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// A format: block size and bytes, q's signedness, whether m is used, the
// scales of sub-block j, its quants as ints (portable) and as 32 bytes (AVX2).
struct Q8_0 {
  static constexpr int kElems = 32, kBytes = 34;
  static constexpr bool kSigned = true, kMin = false;
  static void scales(const uint8_t* b, int, float d[2], float& m) { d[0] = d[1] = half_to_float(b); m = 0.0f; }
  static void quants(const uint8_t* b, int, int q[32]) {
    for (int i = 0; i < 32; ++i) q[i] = static_cast<int8_t>(b[2 + i]);
  }
#ifdef PLLM_GGUF_AVX2
  static __m256i quants8(const uint8_t* b, int) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)); }
#endif
};

#ifdef PLLM_GGUF_AVX2
inline __m256i nibbles16(const uint8_t* p) {  // 16 bytes: lo nibbles, then hi nibbles
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0f);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(x, 4), mask), _mm_and_si128(x, mask));
}
inline __m256i nibbles32(const uint8_t* p, int shift) {  // 32 bytes, lo (0) or hi (4) nibbles
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_and_si256(_mm256_srl_epi16(x, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(0x0f));
}
#endif

struct Q4_0 {
  static constexpr int kElems = 32, kBytes = 18;
  static constexpr bool kSigned = true, kMin = false;
  static void scales(const uint8_t* b, int, float d[2], float& m) { d[0] = d[1] = half_to_float(b); m = 0.0f; }
  static void quants(const uint8_t* b, int, int q[32]) {
    for (int i = 0; i < 16; ++i) {
      q[i] = (b[2 + i] & 0xf) - 8;
      q[i + 16] = (b[2 + i] >> 4) - 8;
    }
  }
#ifdef PLLM_GGUF_AVX2
  static __m256i quants8(const uint8_t* b, int) { return _mm256_sub_epi8(nibbles16(b + 2), _mm256_set1_epi8(8)); }
#endif
};

struct Q4_1 {
  static constexpr int kElems = 32, kBytes = 20;
  static constexpr bool kSigned = false, kMin = true;
  static void scales(const uint8_t* b, int, float d[2], float& m) {
    d[0] = d[1] = half_to_float(b);
    m = half_to_float(b + 2);
  }
  static void quants(const uint8_t* b, int, int q[32]) {
    for (int i = 0; i < 16; ++i) {
      q[i] = b[4 + i] & 0xf;
      q[i + 16] = b[4 + i] >> 4;
    }
  }
#ifdef PLLM_GGUF_AVX2
  static __m256i quants8(const uint8_t* b, int) { return nibbles16(b + 4); }
#endif
};

struct Q4_K {
  static constexpr int kElems = 256, kBytes = 144;
  static constexpr bool kSigned = false, kMin = true;
  static void scales(const uint8_t* b, int j, float d[2], float& m) {
    int sc, mn;
    k_scale_min(b + 4, j, sc, mn);
    d[0] = d[1] = half_to_float(b) * static_cast<float>(sc);
    m = -(half_to_float(b + 2) * static_cast<float>(mn));
  }
  static void quants(const uint8_t* b, int j, int q[32]) {
    const uint8_t* qs = b + 16 + 32 * (j / 2);
    for (int i = 0; i < 32; ++i) q[i] = (qs[i] >> (4 * (j % 2))) & 0xf;
  }
#ifdef PLLM_GGUF_AVX2
  static __m256i quants8(const uint8_t* b, int j) { return nibbles32(b + 16 + 32 * (j / 2), 4 * (j % 2)); }
#endif
};

struct Q5_K {
  static constexpr int kElems = 256, kBytes = 176;
  static constexpr bool kSigned = false, kMin = true;
  static void scales(const uint8_t* b, int j, float d[2], float& m) { Q4_K::scales(b, j, d, m); }
  static void quants(const uint8_t* b, int j, int q[32]) {
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + 48 + 32 * (j / 2);
    for (int i = 0; i < 32; ++i) q[i] = ((qs[i] >> (4 * (j % 2))) & 0xf) | (((qh[i] >> j) & 1) << 4);
  }
#ifdef PLLM_GGUF_AVX2
  static __m256i quants8(const uint8_t* b, int j) {
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
    const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
    return _mm256_or_si256(nibbles32(b + 48 + 32 * (j / 2), 4 * (j % 2)), _mm256_slli_epi16(hi, 4));
  }
#endif
};

struct Q6_K {
  static constexpr int kElems = 256, kBytes = 210;
  static constexpr bool kSigned = true, kMin = false;
  static void scales(const uint8_t* b, int j, float d[2], float& m) {
    const float d0 = half_to_float(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    d[0] = d0 * static_cast<float>(sc[2 * j]);
    d[1] = d0 * static_cast<float>(sc[2 * j + 1]);
    m = 0.0f;
  }
  static void quants(const uint8_t* b, int j, int q[32]) {
    const int h = j / 4, t = j % 4;
    const uint8_t* ql = b + 64 * h + 32 * (t % 2);
    const uint8_t* qh = b + 128 + 32 * h;
    for (int i = 0; i < 32; ++i) q[i] = (((ql[i] >> (4 * (t / 2))) & 0xf) | (((qh[i] >> (2 * t)) & 3) << 4)) - 32;
  }
#ifdef PLLM_GGUF_AVX2
  static __m256i quants8(const uint8_t* b, int j) {
    const int h = j / 4, t = j % 4;
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
    const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t)), _mm256_set1_epi8(3));
    const __m256i q = _mm256_or_si256(nibbles32(b + 64 * h + 32 * (t % 2), 4 * (t / 2)), _mm256_slli_epi16(hi, 4));
    return _mm256_sub_epi8(q, _mm256_set1_epi8(32));
  }
#endif
};

// Activations quantized per 32 elements: q = round(x / dx), dx = amax / 127;
// sx = dx * sum(q) carries the offset term of the formats with an m.
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  int64_t K = 0;
  int64_t nsub() const { return K / 32; }
};

inline void quantize_rows(const float* x, int64_t M, int64_t K, QuantizedRows& out) {
  out.K = K;
  out.q.resize(M * K);
  out.d.resize(M * (K / 32));
  out.s.resize(M * (K / 32));
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
  for (int64_t g = 0; g < M * (K / 32); ++g) {
    const float* p = x + g * 32;
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(p[i]));
    const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int i = 0; i < 32; ++i) {
      const int v = static_cast<int>(std::nearbyint(p[i] * id));
      out.q[g * 32 + i] = static_cast<int8_t>(v);
      sum += v;
    }
    out.d[g] = d;
    out.s[g] = d * static_cast<float>(sum);
  }
}

// ---- portable ---------------------------------------------------------------

template <class F>
void dequant_row_scalar(const uint8_t* w, int64_t K, float* out) {
  for (int64_t b = 0; b < K / F::kElems; ++b)
    for (int j = 0; j < F::kElems / 32; ++j) {
      const uint8_t* blk = w + b * F::kBytes;
      float d[2], m;
      int q[32];
      F::scales(blk, j, d, m);
      F::quants(blk, j, q);
      float* o = out + b * F::kElems + j * 32;
      for (int i = 0; i < 32; ++i) o[i] = d[i / 16] * static_cast<float>(q[i]) + m;
    }
}

// One weight row against rows [0, mb) of x (fp32) or of qx (q8).
template <class F>
void row_f32_scalar(const float* x, int64_t ldx, int mb, const uint8_t* w, int64_t K, float* out, int64_t ldo) {
  float acc[kMaxRows] = {};
  float wv[32];
  for (int64_t b = 0; b < K / F::kElems; ++b)
    for (int j = 0; j < F::kElems / 32; ++j) {
      const uint8_t* blk = w + b * F::kBytes;
      float d[2], m;
      int q[32];
      F::scales(blk, j, d, m);
      F::quants(blk, j, q);
      for (int i = 0; i < 32; ++i) wv[i] = d[i / 16] * static_cast<float>(q[i]) + m;
      const int64_t k0 = b * F::kElems + j * 32;
      for (int r = 0; r < mb; ++r) {
        float s = 0.0f;
        for (int i = 0; i < 32; ++i) s += wv[i] * x[r * ldx + k0 + i];
        acc[r] += s;
      }
    }
  for (int r = 0; r < mb; ++r) out[r * ldo] = acc[r];
}

template <class F>
void row_q8_scalar(const QuantizedRows& xq, int64_t r0, int mb, const uint8_t* w, float* out, int64_t ldo) {
  const int64_t K = xq.K, nsub = xq.nsub();
  float acc[kMaxRows] = {};
  for (int64_t b = 0; b < K / F::kElems; ++b)
    for (int j = 0; j < F::kElems / 32; ++j) {
      const uint8_t* blk = w + b * F::kBytes;
      float d[2], m;
      int q[32];
      F::scales(blk, j, d, m);
      F::quants(blk, j, q);
      const int64_t g = b * (F::kElems / 32) + j;
      for (int r = 0; r < mb; ++r) {
        const int8_t* y = xq.q.data() + (r0 + r) * K + g * 32;
        int s0 = 0, s1 = 0;
        for (int i = 0; i < 16; ++i) s0 += q[i] * y[i];
        for (int i = 16; i < 32; ++i) s1 += q[i] * y[i];
        const int64_t at = (r0 + r) * nsub + g;
        acc[r] += (d[0] * static_cast<float>(s0) + d[1] * static_cast<float>(s1)) * xq.d[at];
        if (F::kMin) acc[r] += m * xq.s[at];
      }
    }
  for (int r = 0; r < mb; ++r) out[r * ldo] = acc[r];
}

// ---- AVX2 -------------------------------------------------------------------
#ifdef PLLM_GGUF_AVX2

inline float hsum256(__m256 a) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

// A sub-block's 32 quants as four vectors of 8 fp32 weights: d * q + m.
template <class F>
inline void widen(__m256i q, const float d[2], float m, __m256 wv[4]) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i part[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int c = 0; c < 4; ++c) {
    const __m256i v = F::kSigned ? _mm256_cvtepi8_epi32(part[c]) : _mm256_cvtepu8_epi32(part[c]);
    const __m256 f = _mm256_cvtepi32_ps(v);
    wv[c] = F::kMin ? _mm256_fmadd_ps(f, _mm256_set1_ps(d[c / 2]), _mm256_set1_ps(m))
                    : _mm256_mul_ps(f, _mm256_set1_ps(d[c / 2]));
  }
}

template <class F>
void dequant_row_avx2(const uint8_t* w, int64_t K, float* out) {
  for (int64_t b = 0; b < K / F::kElems; ++b)
    for (int j = 0; j < F::kElems / 32; ++j) {
      const uint8_t* blk = w + b * F::kBytes;
      float d[2], m;
      F::scales(blk, j, d, m);
      __m256 wv[4];
      widen<F>(F::quants8(blk, j), d, m, wv);
      float* o = out + b * F::kElems + j * 32;
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(o + 8 * c, wv[c]);
    }
}

// Few accumulators per row when there are few rows, to keep FMAs in flight.
template <class F, int MB>
void row_f32_avx2(const float* x, int64_t ldx, const uint8_t* w, int64_t K, float* out, int64_t ldo) {
  constexpr int NA = MB <= 2 ? 4 : (MB <= 4 ? 2 : 1);
  __m256 acc[MB][NA];
  for (int r = 0; r < MB; ++r)
    for (int a = 0; a < NA; ++a) acc[r][a] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / F::kElems; ++b)
    for (int j = 0; j < F::kElems / 32; ++j) {
      const uint8_t* blk = w + b * F::kBytes;
      float d[2], m;
      F::scales(blk, j, d, m);
      __m256 wv[4];
      widen<F>(F::quants8(blk, j), d, m, wv);
      const float* xs = x + b * F::kElems + j * 32;
      for (int r = 0; r < MB; ++r)
        for (int c = 0; c < 4; ++c)
          acc[r][c % NA] = _mm256_fmadd_ps(wv[c], _mm256_loadu_ps(xs + r * ldx + 8 * c), acc[r][c % NA]);
    }
  for (int r = 0; r < MB; ++r) {
    __m256 s = acc[r][0];
    for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[r][a]);
    out[r * ldo] = hsum256(s);
  }
}

// Eight int32 sums of four u8 * s8 products each.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef __AVXVNNI__
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// One sub-block against one row of qx: signed quants go through
// maddubs' unsigned operand as |q|, their signs moved onto x.
template <class F>
inline __m256 sub_dot_avx2(__m256i q, __m256i aq, const int8_t* y) {
  __m256i yv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y));
  if (F::kSigned) yv = _mm256_sign_epi8(yv, q);
  return _mm256_cvtepi32_ps(dot_u8s8(aq, yv));
}

template <class F, int MB>
void row_q8_avx2(const QuantizedRows& xq, int64_t r0, const uint8_t* w, float* out, int64_t ldo) {
  const int64_t K = xq.K, nsub = xq.nsub();
  __m256 acc[MB];
  float macc[MB];
  for (int r = 0; r < MB; ++r) {
    acc[r] = _mm256_setzero_ps();
    macc[r] = 0.0f;
  }
  const int8_t* qx = xq.q.data() + r0 * K;
  const float* dx = xq.d.data() + r0 * nsub;
  const float* sx = xq.s.data() + r0 * nsub;
  for (int64_t b = 0; b < K / F::kElems; ++b)
    for (int j = 0; j < F::kElems / 32; ++j) {
      const uint8_t* blk = w + b * F::kBytes;
      float d[2], m;
      F::scales(blk, j, d, m);
      const __m256i q = F::quants8(blk, j);
      const __m256i aq = F::kSigned ? _mm256_sign_epi8(q, q) : q;
      const __m256 dv = _mm256_set_m128(_mm_set1_ps(d[1]), _mm_set1_ps(d[0]));
      const int64_t g = b * (F::kElems / 32) + j;
      for (int r = 0; r < MB; ++r) {
        const __m256 p = sub_dot_avx2<F>(q, aq, qx + r * K + g * 32);
        acc[r] = _mm256_fmadd_ps(p, _mm256_mul_ps(dv, _mm256_set1_ps(dx[r * nsub + g])), acc[r]);
        if (F::kMin) macc[r] += m * sx[r * nsub + g];
      }
    }
  for (int r = 0; r < MB; ++r) out[r * ldo] = hsum256(acc[r]) + macc[r];
}

#endif  // PLLM_GGUF_AVX2

// ---- AVX-512: two sub-blocks per 512-bit integer dot product ----------------
#ifdef PLLM_GGUF_AVX512

inline __m512i dot_u8s8_512(__m512i u, __m512i s) {
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s);
#else
  return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
#endif
}

inline __m512 join256(__m256 a, __m256 b) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(a)), _mm256_castps_pd(b), 1));
}

template <class F, int MB>
void row_q8_avx512(const QuantizedRows& xq, int64_t r0, const uint8_t* w, float* out, int64_t ldo) {
  constexpr int S = F::kElems / 32;
  const int64_t K = xq.K, nsub = xq.nsub();
  __m512 acc[MB];
  float macc[MB];
  for (int r = 0; r < MB; ++r) {
    acc[r] = _mm512_setzero_ps();
    macc[r] = 0.0f;
  }
  const int8_t* qx = xq.q.data() + r0 * K;
  const float* dx = xq.d.data() + r0 * nsub;
  const float* sx = xq.s.data() + r0 * nsub;
  int64_t g = 0;
  for (; g + 2 <= nsub; g += 2) {  // sub-blocks g and g + 1 are adjacent in x and in W's row
    const uint8_t* ba = w + (g / S) * F::kBytes;
    const uint8_t* bb = w + ((g + 1) / S) * F::kBytes;
    const int ja = static_cast<int>(g % S), jb = static_cast<int>((g + 1) % S);
    float da[2], db[2], ma, mb;
    F::scales(ba, ja, da, ma);
    F::scales(bb, jb, db, mb);
    const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(F::quants8(ba, ja)), F::quants8(bb, jb), 1);
    const __m512i aq = F::kSigned ? _mm512_abs_epi8(q) : q;
    const __mmask64 neg = _mm512_movepi8_mask(q);
    const __m512 dv = join256(_mm256_set_m128(_mm_set1_ps(da[1]), _mm_set1_ps(da[0])),
                              _mm256_set_m128(_mm_set1_ps(db[1]), _mm_set1_ps(db[0])));
    for (int r = 0; r < MB; ++r) {
      __m512i y = _mm512_loadu_si512(qx + r * K + g * 32);
      if (F::kSigned) y = _mm512_mask_sub_epi8(y, neg, _mm512_setzero_si512(), y);
      const __m512 p = _mm512_cvtepi32_ps(dot_u8s8_512(aq, y));
      const __m512 dxv = join256(_mm256_set1_ps(dx[r * nsub + g]), _mm256_set1_ps(dx[r * nsub + g + 1]));
      acc[r] = _mm512_fmadd_ps(p, _mm512_mul_ps(dv, dxv), acc[r]);
      if (F::kMin) macc[r] += ma * sx[r * nsub + g] + mb * sx[r * nsub + g + 1];
    }
  }
  if (g < nsub) {  // an odd last sub-block, 256 bits wide
    const uint8_t* blk = w + (g / S) * F::kBytes;
    const int j = static_cast<int>(g % S);
    float d[2], m;
    F::scales(blk, j, d, m);
    const __m256i q = F::quants8(blk, j);
    const __m256i aq = F::kSigned ? _mm256_sign_epi8(q, q) : q;
    const __m256 dv = _mm256_set_m128(_mm_set1_ps(d[1]), _mm_set1_ps(d[0]));
    for (int r = 0; r < MB; ++r) {
      const __m256 p = sub_dot_avx2<F>(q, aq, qx + r * K + g * 32);
      const __m256 t = _mm256_mul_ps(p, _mm256_mul_ps(dv, _mm256_set1_ps(dx[r * nsub + g])));
      acc[r] = _mm512_add_ps(acc[r], join256(t, _mm256_setzero_ps()));
      if (F::kMin) macc[r] += m * sx[r * nsub + g];
    }
  }
  for (int r = 0; r < MB; ++r) out[r * ldo] = _mm512_reduce_add_ps(acc[r]) + macc[r];
}

// fp32 activations on 16 lanes: a sub-block's 32 quants as two vectors of
// d * q + m (the same fused multiply-add per value as ``widen``, so the same
// weights as the AVX2 path), each against 16 of x.
template <class F>
inline void widen512(__m256i q, const float d[2], float m, __m512 wv[2]) {
  const __m128i part[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
  for (int c = 0; c < 2; ++c) {
    const __m512i v = F::kSigned ? _mm512_cvtepi8_epi32(part[c]) : _mm512_cvtepu8_epi32(part[c]);
    const __m512 f = _mm512_cvtepi32_ps(v);
    wv[c] = F::kMin ? _mm512_fmadd_ps(f, _mm512_set1_ps(d[c]), _mm512_set1_ps(m))
                    : _mm512_mul_ps(f, _mm512_set1_ps(d[c]));
  }
}

template <class F, int MB>
void row_f32_avx512(const float* x, int64_t ldx, const uint8_t* w, int64_t K, float* out, int64_t ldo) {
  constexpr int NA = MB <= 2 ? 4 : 2;  // accumulators per row: FMAs in flight
  __m512 acc[MB][NA];
  for (int r = 0; r < MB; ++r)
    for (int a = 0; a < NA; ++a) acc[r][a] = _mm512_setzero_ps();
  int64_t g = 0;
  for (int64_t b = 0; b < K / F::kElems; ++b)
    for (int j = 0; j < F::kElems / 32; ++j, ++g) {
      const uint8_t* blk = w + b * F::kBytes;
      float d[2], m;
      F::scales(blk, j, d, m);
      __m512 wv[2];
      widen512<F>(F::quants8(blk, j), d, m, wv);
      const float* xs = x + b * F::kElems + j * 32;
      const int a0 = NA == 4 ? static_cast<int>(g & 1) * 2 : 0;
      for (int r = 0; r < MB; ++r)
        for (int c = 0; c < 2; ++c)
          acc[r][a0 + c] = _mm512_fmadd_ps(wv[c], _mm512_loadu_ps(xs + r * ldx + 16 * c), acc[r][a0 + c]);
    }
  for (int r = 0; r < MB; ++r) {
    __m512 s = acc[r][0];
    for (int a = 1; a < NA; ++a) s = _mm512_add_ps(s, acc[r][a]);
    out[r * ldo] = _mm512_reduce_add_ps(s);
  }
}

#endif  // PLLM_GGUF_AVX512

// ---- the 32-element formats (Q4_0, Q4_1, Q8_0), block by block ---------------
// Their blocks lie back to back in a row, so the few-row products take them
// whole: NR weight rows at a time, sharing every load of x (and its scales)
// among them with NR accumulator chains side by side; a block's header (d,
// and m for Q4_1) widened as one vector; and the offset term accumulated on
// its own, as d_w * (q . x) + m * sum(x) per block (the same value as
// (d * q + m) . x but for fp32 rounding): Q4_1's m, and Q4_0's -8 * d (its
// quants are read unsigned, 0..15, so that q8 activations need no sign
// trick). The header vector is [d, m'] per block (m' = m for Q4_1, d for
// Q4_0 and Q8_0), times [0, sum(x)] per block of x, scaled by kOffset at the
// end (1, -8, or 0 for Q8_0, which has no offset).
//   AVX2: one block per step, 8 lanes; AVX-512: two blocks per step, 16 lanes
//   (one 512-bit integer dot product for q8).
#ifdef PLLM_GGUF_AVX2

inline __m128 headers_f16(const uint8_t* a, int off_a, const uint8_t* b, int off_b) {
  uint16_t h[4];
  std::memcpy(h, a, 2);
  std::memcpy(h + 1, a + off_a, 2);
  std::memcpy(h + 2, b, 2);
  std::memcpy(h + 3, b + off_b, 2);
  uint64_t bits;
  std::memcpy(&bits, h, 8);
  return _mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<long long>(bits)));
}

// [v0, v1, 0, 0] from two adjacent floats.
inline __m128 load2(const float* p) { return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p))); }

inline float hsum128(__m128 m) {
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps(m, m, 1)));
}

// A block's 16 bytes of nibbles as fp32: elements 0-7, 8-15 (low nibbles),
// 16-23, 24-31 (high nibbles).
inline void nibbles_f32x4(const uint8_t* p, __m256 f[4]) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i a = _mm256_cvtepu8_epi32(v), b = _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8));
  const __m256i mask = _mm256_set1_epi32(0x0f);
  f[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, mask));
  f[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, mask));
  f[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
  f[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}

template <class F>
struct Blocks;

// Q4_0 and Q4_1: a header, then 16 bytes of nibbles at QuantsAt; m' is the
// fp16 at MinAt (d itself, at 0, for Q4_0), scaled by Offset.
template <int QuantsAt, int MinAt, int Offset>
struct NibbleBlocks {
  static constexpr float kOffset = Offset;
  static constexpr bool kSigned = false;
  static constexpr int kQuants = QuantsAt;  // where the quants start in a block
  static __m128 header(const uint8_t* a, const uint8_t* b) { return headers_f16(a, MinAt, b, MinAt); }
  static __m256i quants(const uint8_t* b) { return nibbles16(b + kQuants); }
  static void widen(const uint8_t* b, __m256 f[4]) { nibbles_f32x4(b + kQuants, f); }
};

template <>
struct Blocks<Q4_0> : NibbleBlocks<2, 0, -8> {};

template <>
struct Blocks<Q4_1> : NibbleBlocks<4, 2, 1> {};

template <>
struct Blocks<Q8_0> {
  static constexpr float kOffset = 0.0f;
  static constexpr bool kSigned = true;
  static constexpr int kQuants = 2;
  static __m128 header(const uint8_t* a, const uint8_t* b) { return headers_f16(a, 0, b, 0); }
  static __m256i quants(const uint8_t* b) { return Q8_0::quants8(b, 0); }
  static void widen(const uint8_t* b, __m256 f[4]) {
    for (int c = 0; c < 4; ++c)
      f[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * c))));
  }
};

template <class F>
constexpr bool kWholeBlocks = std::is_same_v<F, Q4_0> || std::is_same_v<F, Q4_1> || std::is_same_v<F, Q8_0>;

// What the block products take of x: per row and block g, dx8 holds its
// scale eight times (q8) and x2 holds [0, its offset sum] (q8: dx * sum(q);
// fp32: sum(x)).
struct BlockRows {
  const QuantizedRows* xq = nullptr;  // q8 activations, or fp32 x (xq null)
  const float* x = nullptr;
  std::vector<float> dx8, x2;
  int64_t K = 0, nblk = 0;
};

inline void block_rows(const float* x, const QuantizedRows* xq, int64_t M, int64_t K, BlockRows& out) {
  out.xq = xq;
  out.x = x;
  out.K = K;
  out.nblk = K / 32;
  const int64_t n = M * out.nblk;
  out.x2.assign(2 * n, 0.0f);
  if (xq != nullptr) {
    out.dx8.resize(8 * n);
    for (int64_t g = 0; g < n; ++g) {
      std::fill_n(out.dx8.data() + 8 * g, 8, xq->d[g]);
      out.x2[2 * g + 1] = xq->s[g];
    }
  } else {
    for (int64_t g = 0; g < n; ++g) {
      const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(x + 32 * g), _mm256_loadu_ps(x + 32 * g + 8)),
                                     _mm256_add_ps(_mm256_loadu_ps(x + 32 * g + 16), _mm256_loadu_ps(x + 32 * g + 24)));
      out.x2[2 * g + 1] = hsum256(s);
    }
  }
}

// Rows [r0, r0 + MB) of x against NR weight rows from w; out[r * ldo + i]
// for x row r and weight row i, plus carry[r * NR + i] when given. Blocks
// [b0, nblk) only: the AVX-512 kernel leaves an odd last block here, with
// its sums so far as the carry.
template <class F, int MB, int NR>
void rows_blocks_avx2(const BlockRows& xr, int64_t r0, const uint8_t* w, int64_t row_bytes, int64_t b0,
                      const float* carry, float* out, int64_t ldo) {
  using B = Blocks<F>;
  const int64_t nblk = xr.nblk;
  const bool q8 = xr.xq != nullptr;
  __m256 acc[MB][NR];
  __m128 macc[MB][NR];
  for (int r = 0; r < MB; ++r)
    for (int i = 0; i < NR; ++i) {
      acc[r][i] = _mm256_setzero_ps();
      macc[r][i] = _mm_setzero_ps();
    }
  for (int64_t b = b0; b < nblk; ++b) {
    __m128 hd[NR];
    __m256 dv[NR];
    for (int i = 0; i < NR; ++i) {
      const uint8_t* blk = w + i * row_bytes + b * F::kBytes;
      hd[i] = B::header(blk, blk);
      dv[i] = _mm256_broadcastss_ps(hd[i]);
    }
    if (q8) {
      __m256i q[NR], aq[NR];
      for (int i = 0; i < NR; ++i) {
        q[i] = B::quants(w + i * row_bytes + b * F::kBytes);
        aq[i] = B::kSigned ? _mm256_sign_epi8(q[i], q[i]) : q[i];
      }
      for (int r = 0; r < MB; ++r) {
        const int64_t g = (r0 + r) * nblk + b;
        const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.xq->q.data() + g * 32));
        const __m256 dxv = _mm256_loadu_ps(xr.dx8.data() + 8 * g);
        const __m128 sxv = load2(xr.x2.data() + 2 * g);
        for (int i = 0; i < NR; ++i) {
          const __m256i ys = B::kSigned ? _mm256_sign_epi8(y, q[i]) : y;
          const __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(dot_u8s8(aq[i], ys)), dxv);
          acc[r][i] = _mm256_fmadd_ps(p, dv[i], acc[r][i]);
          if (B::kOffset != 0.0f) macc[r][i] = _mm_fmadd_ps(hd[i], sxv, macc[r][i]);
        }
      }
    } else {
      __m256 f[NR][4];
      for (int i = 0; i < NR; ++i) B::widen(w + i * row_bytes + b * F::kBytes, f[i]);
      for (int r = 0; r < MB; ++r) {
        const int64_t g = (r0 + r) * nblk + b;
        const float* xp = xr.x + g * 32;
        const __m128 sxv = load2(xr.x2.data() + 2 * g);
        for (int i = 0; i < NR; ++i) {
          __m256 t = _mm256_mul_ps(f[i][0], _mm256_loadu_ps(xp));
          for (int c = 1; c < 4; ++c) t = _mm256_fmadd_ps(f[i][c], _mm256_loadu_ps(xp + 8 * c), t);
          acc[r][i] = _mm256_fmadd_ps(t, dv[i], acc[r][i]);
          if (B::kOffset != 0.0f) macc[r][i] = _mm_fmadd_ps(hd[i], sxv, macc[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int i = 0; i < NR; ++i) {
      // macc's lane 1 holds m' * sum; lane 3 is 0 here (one block per step)
      float v = hsum256(acc[r][i]) + B::kOffset * hsum128(macc[r][i]);
      if (carry != nullptr) v += carry[r * NR + i];
      out[r * ldo + i] = v;
    }
}

#endif  // PLLM_GGUF_AVX2

#ifdef PLLM_GGUF_AVX512

// Two blocks' 16 bytes of nibbles (at a, at b) as 64 quants in element
// order: [a lo nibbles, a hi nibbles, b lo, b hi].
inline __m512i nibbles_pair(const uint8_t* a, const uint8_t* b) {
  const __m512i t = _mm512_inserti64x4(
      _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))),
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b))), 1);
  return _mm512_and_si512(_mm512_mask_srli_epi16(t, 0xFF00FF00u, t, 4), _mm512_set1_epi8(0x0f));
}

// A block's 32 quants in fp32: elements 0-15 in f0, 16-31 in f1.
template <class F>
inline void widen16(const uint8_t* b, __m512& f0, __m512& f1) {
  const uint8_t* qs = b + Blocks<F>::kQuants;
  if constexpr (Blocks<F>::kSigned) {  // Q8_0
    f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs))));
    f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16))));
  } else {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    f0 = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0f)));
    f1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  }
}

template <class F>
inline __m512i quants_pair(const uint8_t* b) {
  const uint8_t* qs = b + Blocks<F>::kQuants;
  if constexpr (Blocks<F>::kSigned)
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs))),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + F::kBytes)), 1);
  else
    return nibbles_pair(qs, qs + F::kBytes);
}

// As rows_blocks_avx2, two blocks per step; an odd last block is left to it.
template <class F, int MB, int NR>
void rows_blocks_avx512(const BlockRows& xr, int64_t r0, const uint8_t* w, int64_t row_bytes, float* out,
                        int64_t ldo) {
  using B = Blocks<F>;
  const int64_t nblk = xr.nblk, npair = nblk / 2;
  const bool q8 = xr.xq != nullptr;
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
  const __m512i second = _mm512_set1_epi32(2);
  __m512 acc[MB][NR];
  __m128 macc[MB][NR];
  for (int r = 0; r < MB; ++r)
    for (int i = 0; i < NR; ++i) {
      acc[r][i] = _mm512_setzero_ps();
      macc[r][i] = _mm_setzero_ps();
    }
  for (int64_t p = 0; p < npair; ++p) {
    __m128 hd[NR];
    for (int i = 0; i < NR; ++i) {
      const uint8_t* blk = w + i * row_bytes + 2 * p * F::kBytes;
      hd[i] = B::header(blk, blk + F::kBytes);  // [d_a, m'_a, d_b, m'_b]
    }
    if (q8) {
      __m512i aq[NR];
      __m512 dw[NR];
      __mmask64 neg[NR];
      for (int i = 0; i < NR; ++i) {
        const __m512i q = quants_pair<F>(w + i * row_bytes + 2 * p * F::kBytes);
        aq[i] = B::kSigned ? _mm512_abs_epi8(q) : q;
        neg[i] = B::kSigned ? _mm512_movepi8_mask(q) : 0;
        dw[i] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(hd[i]));
      }
      for (int r = 0; r < MB; ++r) {
        const int64_t g = (r0 + r) * nblk + 2 * p;
        const __m512i y = _mm512_loadu_si512(xr.xq->q.data() + g * 32);
        const __m512 dxv = _mm512_loadu_ps(xr.dx8.data() + 8 * g);
        const __m128 sxv = _mm_loadu_ps(xr.x2.data() + 2 * g);
        for (int i = 0; i < NR; ++i) {
          const __m512i ys = B::kSigned ? _mm512_mask_sub_epi8(y, neg[i], _mm512_setzero_si512(), y) : y;
          const __m512 prod = _mm512_mul_ps(_mm512_cvtepi32_ps(dot_u8s8_512(aq[i], ys)), dxv);
          acc[r][i] = _mm512_fmadd_ps(prod, dw[i], acc[r][i]);
          if (B::kOffset != 0.0f) macc[r][i] = _mm_fmadd_ps(hd[i], sxv, macc[r][i]);
        }
      }
    } else {
      __m512 f[NR][4], da[NR], db[NR];
      for (int i = 0; i < NR; ++i) {
        const uint8_t* blk = w + i * row_bytes + 2 * p * F::kBytes;
        widen16<F>(blk, f[i][0], f[i][1]);
        widen16<F>(blk + F::kBytes, f[i][2], f[i][3]);
        da[i] = _mm512_broadcastss_ps(hd[i]);
        db[i] = _mm512_permutexvar_ps(second, _mm512_castps128_ps512(hd[i]));
      }
      for (int r = 0; r < MB; ++r) {
        const int64_t g = (r0 + r) * nblk + 2 * p;
        const float* xp = xr.x + g * 32;
        const __m512 x0 = _mm512_loadu_ps(xp), x1 = _mm512_loadu_ps(xp + 16);
        const __m512 x2 = _mm512_loadu_ps(xp + 32), x3 = _mm512_loadu_ps(xp + 48);
        const __m128 sxv = _mm_loadu_ps(xr.x2.data() + 2 * g);
        for (int i = 0; i < NR; ++i) {
          const __m512 ta = _mm512_fmadd_ps(f[i][1], x1, _mm512_mul_ps(f[i][0], x0));
          const __m512 tb = _mm512_fmadd_ps(f[i][3], x3, _mm512_mul_ps(f[i][2], x2));
          acc[r][i] = _mm512_fmadd_ps(tb, db[i], _mm512_fmadd_ps(ta, da[i], acc[r][i]));
          if (B::kOffset != 0.0f) macc[r][i] = _mm_fmadd_ps(hd[i], sxv, macc[r][i]);
        }
      }
    }
  }
  float sums[MB * NR];
  for (int r = 0; r < MB; ++r)
    for (int i = 0; i < NR; ++i)
      sums[r * NR + i] = _mm512_reduce_add_ps(acc[r][i]) + B::kOffset * hsum128(macc[r][i]);
  if (nblk % 2) {  // an odd last block: one 8-lane step, adding the sums so far
    for (int i = 0; i < NR; ++i) {
      float part[MB];
      for (int r = 0; r < MB; ++r) part[r] = sums[r * NR + i];
      rows_blocks_avx2<F, MB, 1>(xr, r0, w + i * row_bytes, row_bytes, nblk - 1, part, out + i, ldo);
    }
    return;
  }
  for (int r = 0; r < MB; ++r)
    for (int i = 0; i < NR; ++i) out[r * ldo + i] = sums[r * NR + i];
}

#endif  // PLLM_GGUF_AVX512

// ---- dispatch -----------------------------------------------------------------

template <class Fn>
void with_format(int64_t qtype, Fn&& fn) {
  switch (qtype) {  // ggml's type ids
    case 2: fn(Q4_0{}); break;
    case 3: fn(Q4_1{}); break;
    case 8: fn(Q8_0{}); break;
    case 12: fn(Q4_K{}); break;
    case 13: fn(Q5_K{}); break;
    case 14: fn(Q6_K{}); break;
    default: TORCH_CHECK(false, "unsupported GGUF type id ", qtype);
  }
}

template <class Fn>
void with_rows(int mb, Fn&& fn) {  // a compile-time row count 1..8
  switch (mb) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

inline std::vector<int64_t> runnable_isas() {
  std::vector<int64_t> isas{kScalar};
#ifdef PLLM_GGUF_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back(kAvx2);
#endif
#ifdef PLLM_GGUF_AVX512
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    isas.push_back(kAvx512);
#endif
  return isas;
}

inline int64_t pick_isa(int64_t isa) {
  const auto isas = runnable_isas();
  if (isa == kAuto) return isas.back();
  TORCH_CHECK(std::find(isas.begin(), isas.end(), isa) != isas.end(), "ISA path ", isa,
              " is not compiled in or not supported by this CPU");
  return isa;
}

template <class F>
void dequant_row(int64_t isa, const uint8_t* w, int64_t K, float* out) {
#ifdef PLLM_GGUF_AVX2
  if (isa >= kAvx2) return dequant_row_avx2<F>(w, K, out);
#endif
  dequant_row_scalar<F>(w, K, out);
}

#ifdef PLLM_GGUF_AVX2
// A layer's weights are read once per step, cold: while weight rows
// [n, n + count) are decoded, ask for the ones kPrefetchRows ahead.
inline void prefetch_ahead(const uint8_t* w, int64_t n, int64_t count, int64_t N, int64_t row_bytes) {
  const int64_t from = n + kPrefetchRows, rows = std::min(count, N - from);
  for (int64_t at = 0; at < rows * row_bytes; at += 64)
    _mm_prefetch(reinterpret_cast<const char*>(w + from * row_bytes + at), _MM_HINT_T0);
}

// The few-row products of the 32-element formats (rows_blocks_avx2 /
// rows_blocks_avx512): groups of four weight rows shared out among the
// threads; within a group, as many weight rows per call as keep the
// accumulators in registers (more for fewer rows of x).
template <class F>
void few_rows_blocks(int64_t isa, const float* x, const QuantizedRows* xq, int64_t M, int64_t K, const uint8_t* w,
                     int64_t N, int64_t row_bytes, float* out) {
  constexpr int64_t kGroup = 4;
  BlockRows xr;
  block_rows(x, xq, M, K, xr);
  const int64_t groups = (N + kGroup - 1) / kGroup;
#pragma omp parallel for schedule(static)
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t n0 = gi * kGroup, nn = std::min(kGroup, N - n0);
    const uint8_t* wg = w + n0 * row_bytes;
    prefetch_ahead(w, n0, nn, N, row_bytes);
    for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
      const int mb = static_cast<int>(std::min<int64_t>(kMaxRows, M - r0));
      with_rows(mb, [&](auto rows) {
        constexpr int MB = decltype(rows)::value;
        auto call = [&](auto nr, int64_t i) {
          constexpr int NR = decltype(nr)::value;
          float* o = out + r0 * N + n0 + i;
#ifdef PLLM_GGUF_AVX512
          if (isa == kAvx512) return rows_blocks_avx512<F, MB, NR>(xr, r0, wg + i * row_bytes, row_bytes, o, N);
#endif
          rows_blocks_avx2<F, MB, NR>(xr, r0, wg + i * row_bytes, row_bytes, 0, nullptr, o, N);
        };
        constexpr int NR = MB <= 2 ? 4 : (MB <= 4 ? 2 : 1);
        int64_t i = 0;
        if (nn == kGroup)
          for (; i + NR <= nn; i += NR) call(std::integral_constant<int, NR>{}, i);
        for (; i < nn; ++i) call(std::integral_constant<int, 1>{}, i);
      });
    }
  }
}
#endif

template <class F>
void few_rows(int64_t isa, const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, int64_t row_bytes,
              bool q8, float* out) {
  QuantizedRows xq;
  if (q8) quantize_rows(x, M, K, xq);
#ifdef PLLM_GGUF_AVX2
  if constexpr (kWholeBlocks<F>) {
    if (isa >= kAvx2) return few_rows_blocks<F>(isa, x, q8 ? &xq : nullptr, M, K, w, N, row_bytes, out);
  }
#endif
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* wr = w + n * row_bytes;
#ifdef PLLM_GGUF_AVX2
    prefetch_ahead(w, n, 1, N, row_bytes);
#endif
    for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
      const int mb = static_cast<int>(std::min<int64_t>(kMaxRows, M - r0));
      float* o = out + r0 * N + n;
      if (isa == kScalar) {
        if (q8)
          row_q8_scalar<F>(xq, r0, mb, wr, o, N);
        else
          row_f32_scalar<F>(x + r0 * K, K, mb, wr, K, o, N);
        continue;
      }
#ifdef PLLM_GGUF_AVX2
      with_rows(mb, [&](auto rows) {
        constexpr int MB = decltype(rows)::value;
#ifdef PLLM_GGUF_AVX512
        if (isa == kAvx512) {
          if (!q8) return row_f32_avx512<F, MB>(x + r0 * K, K, wr, K, o, N);
          return row_q8_avx512<F, MB>(xq, r0, wr, o, N);
        }
#endif
        if (!q8) return row_f32_avx2<F, MB>(x + r0 * K, K, wr, K, o, N);
        row_q8_avx2<F, MB>(xq, r0, wr, o, N);
      });
#endif
    }
  }
}

// Tiles of ``tile`` weight rows dequantized into each thread's scratch and
// multiplied there; BLAS runs single-threaded inside the parallel region.
template <class F>
void tiled(int64_t isa, const torch::Tensor& x, const uint8_t* w, int64_t N, int64_t K, int64_t row_bytes,
           int64_t tile, torch::Tensor& out) {
  const int64_t num_tiles = (N + tile - 1) / tile;
  // ATen calls in OpenMP threads: each thread takes the caller's inference
  // mode (thread-local), so writing into an inference tensor is allowed.
  const bool inference = c10::InferenceMode::is_enabled();
#pragma omp parallel
  {
    c10::InferenceMode guard(inference);
    auto scratch = torch::empty({tile, K}, x.options());
    float* s = scratch.data_ptr<float>();
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tiles; ++t) {
      const int64_t n0 = t * tile, nt = std::min(tile, N - n0);
      for (int64_t i = 0; i < nt; ++i) dequant_row<F>(isa, w + (n0 + i) * row_bytes, K, s + i * K);
      auto dst = out.narrow(1, n0, nt);
      at::mm_out(dst, x, scratch.narrow(0, 0, nt).t());
    }
  }
}

int64_t check_weight(const torch::Tensor& w, int64_t qtype, int64_t K) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(),
              "the weight must be contiguous uint8 [N, row_bytes]");
  int64_t row_bytes = 0;
  with_format(qtype, [&](auto f) {
    using F = decltype(f);
    TORCH_CHECK(K > 0 && K % F::kElems == 0, "in_features ", K, " is not a multiple of ", F::kElems);
    row_bytes = K / F::kElems * F::kBytes;
  });
  TORCH_CHECK(w.size(1) == row_bytes, "weight rows are ", w.size(1), " bytes, expected ", row_bytes);
  return row_bytes;
}

}  // namespace gguf

// y = x W^T; ``few_rows``: the most rows of x that take the few-row product;
// ``tile_rows``: weight rows per tile of the many-row product (0: about
// 256 KiB of fp32 each, at least 32 rows).
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor weight, int64_t qtype, int64_t in_features, bool q8,
                          int64_t isa, int64_t few_rows, int64_t tile_rows) {
  const int64_t row_bytes = gguf::check_weight(weight, qtype, in_features);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == in_features,
              "x must be fp32 [M, in_features]");
  x = x.contiguous();
  isa = gguf::pick_isa(isa);
  const int64_t M = x.size(0), N = weight.size(0), K = in_features;
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const uint8_t* w = weight.data_ptr<uint8_t>();
  gguf::with_format(qtype, [&](auto f) {
    using F = decltype(f);
    if (M <= few_rows) {
      gguf::few_rows<F>(isa, x.data_ptr<float>(), M, K, w, N, row_bytes, q8, out.data_ptr<float>());
    } else {
      const int64_t tile = tile_rows > 0 ? tile_rows : std::max<int64_t>(32, (65536 / K) / 16 * 16);
      gguf::tiled<F>(isa, x, w, N, K, row_bytes, tile, out);
    }
  });
  return out;
}

// The weight in fp32 [N, in_features], dequantized row by row in parallel.
torch::Tensor gguf_dequantize(torch::Tensor weight, int64_t qtype, int64_t in_features, int64_t isa) {
  const int64_t row_bytes = gguf::check_weight(weight, qtype, in_features);
  isa = gguf::pick_isa(isa);
  const int64_t N = weight.size(0), K = in_features;
  auto out = torch::empty({N, K}, weight.options().dtype(torch::kFloat32));
  const uint8_t* w = weight.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  gguf::with_format(qtype, [&](auto f) {
    using F = decltype(f);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) gguf::dequant_row<F>(isa, w + n * row_bytes, K, o + n * K);
  });
  return out;
}

// The ISA paths this build and this CPU run: 1 portable, 2 AVX2, 3 AVX-512.
std::vector<int64_t> gguf_isas() { return gguf::runnable_isas(); }
