// The routed experts of a mixture-of-experts layer (``MoEBlock.experts_fn``),
// fp32 or bf16, in one call:
//
//   group    tokens sorted by expert (stable): slot p = (token, weight) and
//            its row xs[p] of x, in fp32
//   gate/up  act[p] = silu(w13[e][:I] xs[p]) * (w13[e][I:] xs[p])
//   down     ys[p] = weight[p] * (w2[e] act[p])
//   sum      out[t] = sum of ys over t's slots, in slot (= expert) order,
//            in fp32, then cast to x's dtype
//
// An expert with up to ``few_rows`` slots goes through tiles that read each
// of its weight rows once for all its slots; the tiles of all such experts
// (experts x column tiles) are shared out over the threads at once, so a
// decode step reads each chosen expert once, on every core, and an expert
// no token chose costs nothing. An expert with more slots (a prefill) runs
// its two products as GEMMs (``at::matmul``), which block for the cache.

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// out[m, n] = x[m] . w[n] for M rows of x and N rows of w (both K long):
// NB weight rows at a time (vec.h's ``dot_tile``, fp32 or bf16 weights),
// each streamed once for all M rows. 4 x 3 tiles
// fill the 16 AVX2 registers (12 sums, 3 weight vectors, 1 of x) and ran
// as fast as 3 x 4 in fp32 and up to 20% faster in bf16 (4-32 rows).
template <typename W>
void rows_times(const float* x, int64_t M, int64_t ldx, const W* w, int64_t N, int64_t ldw,
                int64_t K, float* out, int64_t ldo) {
  constexpr int MB = 4, NB = 3;
  int64_t n = 0;
  for (; n + NB <= N; n += NB) {
    int64_t m = 0;
    for (; m + MB <= M; m += MB) dot_tile<MB, NB, true>(x + m * ldx, ldx, w + n * ldw, ldw, K, out + m * ldo + n, ldo);
    const float* xm = x + m * ldx;
    float* om = out + m * ldo + n;
    if (M - m == 3) dot_tile<3, NB, true>(xm, ldx, w + n * ldw, ldw, K, om, ldo);
    if (M - m == 2) dot_tile<2, NB, true>(xm, ldx, w + n * ldw, ldw, K, om, ldo);
    if (M - m == 1) dot_tile<1, NB, true>(xm, ldx, w + n * ldw, ldw, K, om, ldo);
  }
  for (; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) dot_tile<1, 1, true>(x + m * ldx, ldx, w + n * ldw, ldw, K, out + m * ldo + n, ldo);
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

constexpr int64_t kTile = 12;  // output columns per task (4 tiles of 3): 24 gate/up rows, 12 down rows

struct Task {
  int64_t expert, col;
};

// The tiled path over the experts ``small`` (each with its slots' rows
// [offset[e], offset[e] + count[e]) of xs): gate/up tiles, then down tiles.
template <typename W>
void small_experts(const std::vector<int64_t>& small, const int64_t* offset, const int64_t* count,
                   const float* xs, const W* w13, const W* w2, const float* scale, float* act,
                   float* ys, int64_t H, int64_t I) {
  std::vector<Task> up_tasks, down_tasks;
  for (int64_t e : small) {
    for (int64_t c = 0; c < I; c += kTile) up_tasks.push_back({e, c});
    for (int64_t c = 0; c < H; c += kTile) down_tasks.push_back({e, c});
  }
  const int64_t num_up = up_tasks.size(), num_down = down_tasks.size();
#pragma omp parallel
  {
    std::vector<float> gu;  // this thread's gate and up tile
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < num_up; ++t) {
      const int64_t e = up_tasks[t].expert, c = up_tasks[t].col, n = std::min(kTile, I - c);
      const int64_t rows = count[e], first = offset[e];
      gu.resize(2 * rows * kTile);
      float* g = gu.data();
      float* u = g + rows * kTile;
      const W* we = w13 + e * 2 * I * H;
      rows_times(xs + first * H, rows, H, we + c * H, n, H, H, g, kTile);
      rows_times(xs + first * H, rows, H, we + (I + c) * H, n, H, H, u, kTile);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < n; ++j)
          act[(first + r) * I + c + j] = silu(g[r * kTile + j]) * u[r * kTile + j];
    }
    // (the implicit barrier: every act row is written before the down tiles)
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < num_down; ++t) {
      const int64_t e = down_tasks[t].expert, c = down_tasks[t].col, n = std::min(kTile, H - c);
      const int64_t rows = count[e], first = offset[e];
      float* y = ys + first * H + c;
      rows_times(act + first * I, rows, I, w2 + (e * H + c) * I, n, I, I, y, H);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < n; ++j) y[r * H + j] *= scale[first + r];
    }
  }
}

// One expert's slots through two GEMMs (its weights widened to fp32 first
// when bf16: the GEMMs of this host run fp32 far faster).
void large_expert(const torch::Tensor& xs, const torch::Tensor& w13, const torch::Tensor& w2,
                  const torch::Tensor& scale, const torch::Tensor& ys, int64_t e, int64_t first,
                  int64_t rows, int64_t I) {
  torch::Tensor x = xs.narrow(0, first, rows);
  torch::Tensor h = at::matmul(x, w13[e].to(torch::kFloat32).t());
  torch::Tensor act = at::silu(h.narrow(1, 0, I)).mul_(h.narrow(1, I, I));
  torch::Tensor y = at::matmul(act, w2[e].to(torch::kFloat32).t());
  torch::Tensor dst = ys.narrow(0, first, rows);
  at::mul_out(dst, y, scale.narrow(0, first, rows).unsqueeze(1));
}

}  // namespace

// sum_k weights[t, k] * expert[ids[t, k]](x[t]) for x [T, H] (fp32 or bf16),
// w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I] in x's dtype,
// weights [T, k] (any float dtype, read as fp32) and ids [T, k] (int64).
// Experts with more than ``few_rows`` slots run as GEMMs.
torch::Tensor moe_experts(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, torch::Tensor weights,
                          torch::Tensor ids, int64_t few_rows) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "fp32 or bf16 x only");
  TORCH_CHECK(w13.scalar_type() == dtype && w2.scalar_type() == dtype, "weights must be in x's dtype");
  TORCH_CHECK(x.dim() == 2 && w13.dim() == 3 && w2.dim() == 3 && ids.dim() == 2, "shape mismatch");
  TORCH_CHECK(ids.scalar_type() == at::kLong && weights.sizes() == ids.sizes(), "ids/weights mismatch");
  const int64_t T = x.size(0), H = x.size(1), E = w13.size(0), I = w13.size(1) / 2, top_k = ids.size(1);
  TORCH_CHECK(ids.size(0) == T && w13.size(1) == 2 * I && w13.size(2) == H && w2.size(0) == E &&
                  w2.size(1) == H && w2.size(2) == I, "shape mismatch");
  at::NoGradGuard no_grad;
  w13 = w13.contiguous();
  w2 = w2.contiguous();
  ids = ids.contiguous();
  const torch::Tensor xf = x.to(torch::kFloat32).contiguous();
  const torch::Tensor wf = weights.to(torch::kFloat32).contiguous();
  const int64_t S = T * top_k;  // slots
  const int64_t* idp = ids.data_ptr<int64_t>();

  // Group: a counting sort of the slots by expert, stable as grouped_experts' argsort.
  std::vector<int64_t> count(E, 0), offset(E, 0), slot(S);  // slot[t * top_k + j]
  for (int64_t f = 0; f < S; ++f) {
    TORCH_CHECK(idp[f] >= 0 && idp[f] < E, "expert id ", idp[f], " is outside [0, ", E, ")");
    ++count[idp[f]];
  }
  for (int64_t e = 1; e < E; ++e) offset[e] = offset[e - 1] + count[e - 1];
  {
    std::vector<int64_t> cursor(offset);
    for (int64_t f = 0; f < S; ++f) slot[f] = cursor[idp[f]]++;
  }
  auto opts = x.options().dtype(torch::kFloat32);
  torch::Tensor xs = torch::empty({S, H}, opts), scale = torch::empty({S}, opts);
  torch::Tensor act = torch::empty({S, I}, opts), ys = torch::empty({S, H}, opts);
  const float* xfp = xf.data_ptr<float>();
  const float* wfp = wf.data_ptr<float>();
  float* xsp = xs.data_ptr<float>();
  float* sp = scale.data_ptr<float>();
#pragma omp parallel for schedule(static) if (S * H >= (1 << 15))
  for (int64_t f = 0; f < S; ++f) {
    std::copy_n(xfp + (f / top_k) * H, H, xsp + slot[f] * H);
    sp[slot[f]] = wfp[f];
  }

  std::vector<int64_t> small;
  for (int64_t e = 0; e < E; ++e) {
    if (count[e] == 0) continue;
    if (count[e] <= few_rows)
      small.push_back(e);
    else
      large_expert(xs, w13, w2, scale, ys, e, offset[e], count[e], I);
  }
  if (!small.empty()) {
    if (dtype == at::kFloat)
      small_experts(small, offset.data(), count.data(), xsp, w13.data_ptr<float>(), w2.data_ptr<float>(),
                    sp, act.data_ptr<float>(), ys.data_ptr<float>(), H, I);
    else
      small_experts(small, offset.data(), count.data(), xsp, w13.data_ptr<c10::BFloat16>(),
                    w2.data_ptr<c10::BFloat16>(), sp, act.data_ptr<float>(), ys.data_ptr<float>(), H, I);
  }

  // Sum each token's slots in slot order (the order grouped_experts adds them in).
  torch::Tensor out = torch::empty({T, H}, x.options());
  const float* ysp = ys.data_ptr<float>();
  float* out32 = dtype == at::kFloat ? out.data_ptr<float>() : nullptr;
  c10::BFloat16* out16 = dtype == at::kFloat ? nullptr : out.data_ptr<c10::BFloat16>();
  constexpr int64_t kSpan = 256;
#pragma omp parallel if (S * H >= (1 << 15))
  {
    std::vector<int64_t> own(top_k);
    float acc[kSpan];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      std::copy_n(slot.data() + t * top_k, top_k, own.data());
      std::sort(own.begin(), own.end());
      for (int64_t h0 = 0; h0 < H; h0 += kSpan) {
        const int64_t n = std::min(kSpan, H - h0);
        std::fill_n(acc, n, 0.0f);
        for (int64_t j = 0; j < top_k; ++j) {
          const float* y = ysp + own[j] * H + h0;
          for (int64_t i = 0; i < n; ++i) acc[i] += y[i];
        }
        if (out32 != nullptr)
          std::copy_n(acc, n, out32 + t * H + h0);
        else
          for (int64_t i = 0; i < n; ++i) out16[t * H + h0 + i] = c10::BFloat16(acc[i]);
      }
    }
  }
  return out;
}
