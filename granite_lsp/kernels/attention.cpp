// Attention of one new token over the KV cache, fused (decode).
#include "common.h"
#include "ops.h"

namespace granite {
namespace {

// ---------------------------------------------------------------------------------------------
// Attention of one new token over the KV cache (decode). In torch ops this is two batched
// matmuls over a strided view of the cache plus a softmax, ~1 ms a layer at 1,400 keys on one
// thread, mostly overhead; here each KV head (with its group of query heads) is one task that
// reads its keys and values once.

struct DecodeAttention {
  const float* q;  // [nq, hd]
  const float* k;  // [nkv, cap, hd]
  const float* v;  // [nkv, cap, hd]
  float* out;      // [nq, hd]
  float* scores;   // [nkv, L] scratch, one row per task
  int64_t nq, nkv, hd, cap, L;
  float scale;
};

void attention_kv_head(const void* ctx, int64_t g) {
  const auto& a = *static_cast<const DecodeAttention*>(ctx);
  const int64_t per = a.nq / a.nkv, hd = a.hd, L = a.L;
  const float* K = a.k + g * a.cap * hd;
  const float* V = a.v + g * a.cap * hd;
  float* p = a.scores + g * L;
  for (int64_t h = g * per; h < (g + 1) * per; ++h) {
    const float* q = a.q + h * hd;
    float best = -INFINITY;
    for (int64_t l = 0; l < L; ++l) {
      const float* kr = K + l * hd;
      __m256 acc = _mm256_setzero_ps();
      int64_t d = 0;
      for (; d + 8 <= hd; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kr + d), acc);
      float sc = hsum(acc);
      for (; d < hd; ++d) sc += q[d] * kr[d];
      sc *= a.scale;
      p[l] = sc;
      best = std::max(best, sc);
    }
    // softmax, 8 at a time through exp8
    const __m256 m = _mm256_set1_ps(best);
    __m256 tot = _mm256_setzero_ps();
    int64_t l = 0;
    for (; l + 8 <= L; l += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + l), m));
      _mm256_storeu_ps(p + l, e);
      tot = _mm256_add_ps(tot, e);
    }
    float sum = hsum(tot);
    for (; l < L; ++l) {
      p[l] = std::exp(p[l] - best);
      sum += p[l];
    }
    const float inv = 1.0f / sum;
    float* o = a.out + h * hd;
    for (int64_t d = 0; d < hd; ++d) o[d] = 0.0f;
    for (l = 0; l < L; ++l) {
      const float w = p[l] * inv;
      const float* vr = V + l * hd;
      const __m256 wv = _mm256_set1_ps(w);
      int64_t d = 0;
      for (; d + 8 <= hd; d += 8)
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(vr + d), _mm256_loadu_ps(o + d)));
      for (; d < hd; ++d) o[d] += w * vr[d];
    }
  }
}

}  // namespace

// q [nq * hd] fp32; k, v [nkv, cap, hd] fp32, the first `length` positions valid -> [1, nq * hd].
at::Tensor attention_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t length, double scale,
                            int64_t threads) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "k, v: [nkv, cap, hd]");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "attention_decode: fp32 contiguous");
  const int64_t nkv = k.size(0), cap = k.size(1), hd = k.size(2);
  TORCH_CHECK(hd > 0 && q.numel() % hd == 0, "q: [nq * hd]");
  const int64_t nq = q.numel() / hd;
  TORCH_CHECK(nkv > 0 && nq % nkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(length >= 1 && length <= cap, "length: 1 .. capacity");
  at::Tensor out = at::empty({1, nq * hd}, q.options());
  const auto scores = scratch(size_t(nkv * length));
  DecodeAttention a{q.data_ptr<float>(),
                    k.data_ptr<float>(),
                    v.data_ptr<float>(),
                    out.data_ptr<float>(),
                    scores.get(),
                    nq,
                    nkv,
                    hd,
                    cap,
                    length,
                    float(scale)};
  pool().run(&attention_kv_head, &a, nkv, thread_count(threads) - 1);
  return out;
}

}  // namespace granite
