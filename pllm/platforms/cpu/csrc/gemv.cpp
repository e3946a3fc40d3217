// y = W x for one row of activations, fp32: the batch-1 decode product.
// Memory-bound: each weight row is read once, rows split across OpenMP
// threads (MKL's single-row GEMV runs on one thread and reads ~11 GB/s here).
#include <torch/extension.h>

torch::Tensor gemv(torch::Tensor weight, torch::Tensor x) {  // [out, in], [in]
  TORCH_CHECK(weight.dtype() == torch::kFloat32 && x.dtype() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(weight.dim() == 2 && x.numel() == weight.size(1), "shape mismatch");
  weight = weight.contiguous();
  x = x.contiguous();
  const int64_t rows = weight.size(0), cols = weight.size(1);
  auto out = torch::empty({rows}, x.options());
  const float* w = weight.data_ptr<float>();
  const float* v = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* wr = w + r * cols;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < cols; ++c) acc += wr[c] * v[c];
    o[r] = acc;
  }
  return out;
}
