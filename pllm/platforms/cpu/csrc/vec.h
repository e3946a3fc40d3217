// Eight fp32 lanes: AVX2 + FMA where the compiler targets them (-march=native),
// plain loops that the compiler vectorises as it can everywhere else. Every
// kernel of the CPU platform is written against these few operations.

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

struct V8 {
  __m256 v;
};
static inline V8 v8_zero() { return {_mm256_setzero_ps()}; }
static inline V8 v8_set1(float x) { return {_mm256_set1_ps(x)}; }
static inline V8 v8_load(const float* p) { return {_mm256_loadu_ps(p)}; }
static inline void v8_store(float* p, V8 a) { _mm256_storeu_ps(p, a.v); }
static inline V8 v8_add(V8 a, V8 b) { return {_mm256_add_ps(a.v, b.v)}; }
static inline V8 v8_sub(V8 a, V8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
static inline V8 v8_mul(V8 a, V8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
static inline V8 v8_div(V8 a, V8 b) { return {_mm256_div_ps(a.v, b.v)}; }
static inline V8 v8_max(V8 a, V8 b) { return {_mm256_max_ps(a.v, b.v)}; }
static inline V8 v8_fma(V8 a, V8 b, V8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }  // a*b+c
static inline float v8_hsum(V8 a) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
static inline float v8_hmax(V8 a) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
// exp(x) for x in the float range (Cephes' range reduction and polynomial,
// about 2 ulp); inputs below -87 give about 1e-38, not 0.
static inline V8 v8_exp(V8 a) {
  __m256 x = _mm256_min_ps(_mm256_max_ps(a.v, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(y, _mm256_castsi256_ps(e))};
}
static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

#else  // portable lanes

#include <algorithm>
#include <cmath>

struct V8 {
  float v[8];
};
#define PLLM_V8_MAP(expr) \
  V8 r;                   \
  for (int i = 0; i < 8; ++i) r.v[i] = (expr); \
  return r
static inline V8 v8_zero() { PLLM_V8_MAP(0.0f); }
static inline V8 v8_set1(float x) { PLLM_V8_MAP(x); }
static inline V8 v8_load(const float* p) { PLLM_V8_MAP(p[i]); }
static inline void v8_store(float* p, V8 a) { for (int i = 0; i < 8; ++i) p[i] = a.v[i]; }
static inline V8 v8_add(V8 a, V8 b) { PLLM_V8_MAP(a.v[i] + b.v[i]); }
static inline V8 v8_sub(V8 a, V8 b) { PLLM_V8_MAP(a.v[i] - b.v[i]); }
static inline V8 v8_mul(V8 a, V8 b) { PLLM_V8_MAP(a.v[i] * b.v[i]); }
static inline V8 v8_div(V8 a, V8 b) { PLLM_V8_MAP(a.v[i] / b.v[i]); }
static inline V8 v8_max(V8 a, V8 b) { PLLM_V8_MAP(std::max(a.v[i], b.v[i])); }
static inline V8 v8_fma(V8 a, V8 b, V8 c) { PLLM_V8_MAP(a.v[i] * b.v[i] + c.v[i]); }
static inline V8 v8_exp(V8 a) { PLLM_V8_MAP(std::exp(a.v[i])); }
#undef PLLM_V8_MAP
static inline float v8_hsum(V8 a) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += a.v[i];
  return s;
}
static inline float v8_hmax(V8 a) {
  float m = a.v[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, a.v[i]);
  return m;
}
static inline void prefetch(const void* p) { __builtin_prefetch(p); }

#endif

// Eight weights as fp32 lanes: fp32 as they are, bf16 widened (its bits are
// the top half of an fp32's). ``PLLM_PORTABLE_BF16`` forces the plain loop,
// which hosts without AVX2 use.
static inline V8 load8(const float* p) { return v8_load(p); }
static inline V8 load8(const c10::BFloat16* p) {
#if defined(__AVX2__) && defined(__FMA__) && !defined(PLLM_PORTABLE_BF16)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
#else
  float f[8];
  for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(p[i]);
  return v8_load(f);
#endif
}

// out[i * ldo + j] = dot(x row i, w row j) over k < K, for an MB x NB tile
// of fp32 or bf16 weights (``load8``): each weight vector is loaded once for
// all MB rows of x. Rows are contiguous (x rows ``ldx`` apart, w rows ``ldw``
// apart). With ``PF``, the weight rows ``NB * ldw`` further on (the next
// tile) are prefetched as these stream.
template <int MB, int NB, bool PF, typename W = float>
static inline void dot_tile(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                            float* out, int64_t ldo) {
  V8 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = v8_zero();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    V8 wv[NB];
    for (int j = 0; j < NB; ++j) {
      if (PF) prefetch(w + j * ldw + k + NB * ldw);
      wv[j] = load8(w + j * ldw + k);
    }
    for (int i = 0; i < MB; ++i) {
      const V8 xv = v8_load(x + i * ldx + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = v8_fma(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      float s = v8_hsum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += x[i * ldx + kk] * static_cast<float>(w[j * ldw + kk]);
      out[i * ldo + j] = s;
    }
}
