// RMSNorm, residual add + RMSNorm and SwiGLU over rows of fp32 activations.
#include "common.h"
#include "ops.h"

namespace granite {
namespace {

// RMSNorm of rows [r0, r1) of x [T, D] into out, scaled by w [D].
void rms_norm_rows(const float* xp, const float* wp, float* op, int64_t D, float eps, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) rms_norm_row(xp + r * D, wp, op + r * D, D, eps);
}

// Elementwise ops over rows: a handful of rows (decode) on the calling thread, more on the pool.
constexpr int64_t kRowsPerTask = 32;

}  // namespace

// RMSNorm of each row of x [T, D] scaled by w [D], like torch's F.rms_norm in fp32 (whose
// composite implementation costs ~20-60 us per 768-wide row in dispatch; a decode step has 65).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, int64_t threads) {
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1, "x: contiguous fp32");
  TORCH_CHECK(w.is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x.size(-1),
              "w: fp32 [D]");
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  at::Tensor out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_rows(rows, kRowsPerTask, thread_count(threads),
                [&](int64_t r0, int64_t r1) { rms_norm_rows(xp, wp, op, D, float(eps), r0, r1); });
  return out;
}

// x += alpha * h (in place, the residual stream), then RMSNorm(x) * w: the two ops that sit
// between every pair of sub-blocks, fused.
at::Tensor add_rms_norm(const at::Tensor& x, const at::Tensor& h, double alpha, const at::Tensor& w, double eps,
                        int64_t threads) {
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1, "x: contiguous fp32");
  TORCH_CHECK(h.is_cpu() && h.scalar_type() == at::kFloat && h.is_contiguous() && h.numel() == x.numel(), "h: like x");
  TORCH_CHECK(w.is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x.size(-1),
              "w: fp32 [D]");
  float* xp = x.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const float a = float(alpha);
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  at::Tensor out = at::empty_like(x);
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_rows(rows, kRowsPerTask, thread_count(threads), [&](int64_t r0, int64_t r1) {
    const __m256 av = _mm256_set1_ps(a);
    int64_t i = r0 * D;
    const int64_t end = r1 * D;
    for (; i + 8 <= end; i += 8)
      _mm256_storeu_ps(xp + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(hp + i), _mm256_loadu_ps(xp + i)));
    for (; i < end; ++i) xp[i] += a * hp[i];
    rms_norm_rows(xp, wp, op, D, float(eps), r0, r1);
  });
  return out;
}

// silu(gate) * up for gu = [gate | up] rows [T, 2I] -> [T, I] (the SwiGLU between the MLP's matmuls).
at::Tensor swiglu(const at::Tensor& gu, int64_t threads) {
  TORCH_CHECK(
      gu.is_cpu() && gu.scalar_type() == at::kFloat && gu.is_contiguous() && gu.dim() == 2 && gu.size(1) % 2 == 0,
      "gu: contiguous fp32 [T, 2I]");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  at::Tensor out = at::empty({T, I}, gu.options());
  const float* g = gu.data_ptr<float>();
  float* o = out.data_ptr<float>();
  parallel_rows(T, kRowsPerTask / 4, thread_count(threads), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) silu_row(g + t * 2 * I, g + t * 2 * I + I, o + t * I, I);
  });
  return out;
}

}  // namespace granite
