// Attention over the KV cache: one new token (decode), and many (prefill, causal), fused.
#include "common.h"
#include "ops.h"

namespace granite {
namespace {

// p[0..n) = exp(p - m) in place, 8 at a time through exp8 (a scalar tail); returns their sum. The one
// softmax exponentiation that decode and prefill attention share, so both sum in the same order.
inline float exp_shifted_sum(float* p, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 tot = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv));
    _mm256_storeu_ps(p + j, e);
    tot = _mm256_add_ps(tot, e);
  }
  float sum = hsum(tot);
  for (; j < n; ++j) {
    p[j] = std::exp(p[j] - m);
    sum += p[j];
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Attention of one new token over the KV cache (decode), or of a few consecutive ones (a verify's rows:
// row t over the positions up to its own, causal). In torch ops this is two batched matmuls over a
// strided view of the cache plus a softmax, ~1 ms a layer at 1,400 keys on one thread, mostly
// overhead; here each KV head (with its group of query heads) is one task that reads its keys and
// values from memory once, for every row (a row's result does not depend on the others: it is the
// same alone or among several).

struct DecodeAttention {
  const float* q;                       // [T, ldq]: each row's query heads first, [nq, hd]
  const float* k;                       // [nkv, cap, hd]
  const float* v;                       // [nkv, cap, hd]
  float* out;                           // [T, nq, hd]
  float* scores;                        // [nkv, L + T - 1] scratch, one row per task
  int64_t nq, nkv, hd, cap, L, T, ldq;  // row t attends over L + t positions
  float scale;
};

// Query head h of row t: its scores over the row's L + t positions, their softmax, the weighted values.
inline void head_row(const DecodeAttention& a, const float* K, const float* V, float* p, int64_t t, int64_t h) {
  const int64_t hd = a.hd, L = a.L + t;
  const float* q = a.q + t * a.ldq + h * hd;
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
  const float sum = exp_shifted_sum(p, L, best);  // softmax
  const float inv = 1.0f / sum;
  float* o = a.out + (t * a.nq + h) * hd;
  for (int64_t d = 0; d < hd; ++d) o[d] = 0.0f;
  for (int64_t l = 0; l < L; ++l) {
    const float w = p[l] * inv;
    const float* vr = V + l * hd;
    const __m256 wv = _mm256_set1_ps(w);
    int64_t d = 0;
    for (; d + 8 <= hd; d += 8)
      _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(vr + d), _mm256_loadu_ps(o + d)));
    for (; d < hd; ++d) o[d] += w * vr[d];
  }
}

void attention_kv_head(const void* ctx, int64_t g) {
  const auto& a = *static_cast<const DecodeAttention*>(ctx);
  const int64_t per = a.nq / a.nkv, hd = a.hd;
  const float* K = a.k + g * a.cap * hd;
  const float* V = a.v + g * a.cap * hd;
  float* p = a.scores + g * (a.L + a.T - 1);
  for (int64_t t = 0; t < a.T; ++t)
    for (int64_t h = g * per; h < (g + 1) * per; ++h) head_row(a, K, V, p, t, h);
}

// ---------------------------------------------------------------------------------------------
// Causal attention of T new tokens (prefill) over the KV cache, whose first pos + T positions hold
// the earlier tokens' keys and values and the new ones' (written by the caller); query row i sits
// at position pos + i and sees keys 0 .. pos + i. Torch's SDPA took ~11 ms a layer for 512 tokens
// (one thread), with a thread-count switch around each call on the calling side. Here one task is
// a block of query rows of one KV head with its group of query heads (up to kMaxVectors query
// vectors), over blocks of kKeyBlock keys with a running max and sum (the "online" softmax): the
// scores of a block of keys come from register tiles against the block's keys transposed
// ([hd][keys], once per call), the values are read once per block and row for its query heads. Keys past a row's
// position never enter its sums (no masked products: a NaN in a key or value reaches only the
// rows at and after it).

constexpr int64_t kKeyBlock = 64;
constexpr int64_t kMaxVectors = 48;          // query vectors per task (rows x heads of a group)
constexpr int64_t kMaxPrefillHeadDim = 128;  // kernels.ATTENTION_MAX_HEAD_DIM
constexpr int64_t kMaxQueryRows = 16;

struct PrefillAttention {
  const float* qkv;  // [T, ldq], the query heads first: [nq * hd]
  const float* k;    // [nkv, cap, hd]
  const float* v;    // [nkv, cap, hd]
  float* kt;         // [nkv][key blocks][hd][kKeyBlock]: the keys transposed, zero past the last
  float* out;        // [T, nq * hd]
  int64_t ldq, T, nq, nkv, hd, cap, pos, rows, blocks, key_blocks;
  float scale;
};

// One block of one KV head's keys as [hd][kKeyBlock] (once per call: every query block reads it).
void transpose_key_block(const void* ctx, int64_t task) {
  const auto& a = *static_cast<const PrefillAttention*>(ctx);
  const int64_t g = task / a.key_blocks, k0 = (task % a.key_blocks) * kKeyBlock, hd = a.hd;
  const int64_t nk = std::min(kKeyBlock, a.pos + a.T - k0);
  const float* K = a.k + (g * a.cap + k0) * hd;
  float* dst = a.kt + task * hd * kKeyBlock;
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t d = 0; d < hd; ++d) dst[d * kKeyBlock + j] = K[j * hd + d];
  for (int64_t d = 0; d < hd; ++d) std::fill(dst + d * kKeyBlock + nk, dst + (d + 1) * kKeyBlock, 0.0f);
}

// s[r][0 .. 16) = scale * q_r . kt[.][j0 .. j0 + 16) for R query vectors (kt: [hd][kKeyBlock]).
template <int R>
inline void score_tile(const float* const* q, const float* kt, int64_t hd, int64_t j0, float scale, float* s) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; ++d) {
    const __m256 k0 = _mm256_loadu_ps(kt + d * kKeyBlock + j0), k1 = _mm256_loadu_ps(kt + d * kKeyBlock + j0 + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 qv = _mm256_broadcast_ss(q[r] + d);
      acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
    }
  }
  const __m256 sc = _mm256_set1_ps(scale);
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(s + r * kKeyBlock + j0, _mm256_mul_ps(acc[r][0], sc));
    _mm256_storeu_ps(s + r * kKeyBlock + j0 + 8, _mm256_mul_ps(acc[r][1], sc));
  }
}

// o[r][d0 .. d0 + 8 V) += sum_{j < n} p[r][j] v[j][d0 ..] for R vectors sharing n valid keys.
template <int R, int V>
inline void value_tile(const float* p, const float* v, int64_t hd, int64_t n, float* o, int64_t d0) {
  __m256 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < V; ++c) acc[r][c] = _mm256_loadu_ps(o + r * kMaxPrefillHeadDim + d0 + 8 * c);
  for (int64_t j = 0; j < n; ++j) {
    __m256 vv[V];
    for (int c = 0; c < V; ++c) vv[c] = _mm256_loadu_ps(v + j * hd + d0 + 8 * c);
    for (int r = 0; r < R; ++r) {
      const __m256 pv = _mm256_broadcast_ss(p + r * kKeyBlock + j);
      for (int c = 0; c < V; ++c) acc[r][c] = _mm256_fmadd_ps(pv, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < V; ++c) _mm256_storeu_ps(o + r * kMaxPrefillHeadDim + d0 + 8 * c, acc[r][c]);
}

void attention_prefill_task(const void* ctx, int64_t task) {
  const auto& a = *static_cast<const PrefillAttention*>(ctx);
  const int64_t g = task / a.blocks, i0 = (task % a.blocks) * a.rows, i1 = std::min(a.T, i0 + a.rows);
  const int64_t per = a.nq / a.nkv, hd = a.hd, nv = (i1 - i0) * per;
  const float* V = a.v + g * a.cap * hd;
  // vector r = (row i0 + r / per, query head g * per + r % per); a task allocates nothing (cannot throw)
  const float* q[kMaxVectors];
  for (int64_t r = 0; r < nv; ++r) q[r] = a.qkv + (i0 + r / per) * a.ldq + (g * per + r % per) * hd;
  alignas(32) float o[kMaxVectors * kMaxPrefillHeadDim], s[kMaxVectors * kKeyBlock];
  float best[kMaxVectors], sum[kMaxVectors];
  for (int64_t r = 0; r < nv; ++r) {
    best[r] = -INFINITY;
    sum[r] = 0.0f;
    std::fill(o + r * kMaxPrefillHeadDim, o + r * kMaxPrefillHeadDim + hd, 0.0f);
  }
  const int64_t keys = a.pos + i1;  // the last row sees keys 0 .. pos + i1 - 1
  for (int64_t k0 = 0; k0 < keys; k0 += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, keys - k0);
    const float* kt = a.kt + (g * a.key_blocks + k0 / kKeyBlock) * hd * kKeyBlock;
    int64_t r = 0;
    for (; r + 6 <= nv; r += 6)
      for (int64_t j0 = 0; j0 < nk; j0 += 16) score_tile<6>(q + r, kt, hd, j0, a.scale, s + r * kKeyBlock);
    for (; r < nv; ++r)
      for (int64_t j0 = 0; j0 < nk; j0 += 16) score_tile<1>(q + r, kt, hd, j0, a.scale, s + r * kKeyBlock);
    // per row: the keys it sees in this block, the running max and sum, its vectors' outputs rescaled
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = std::clamp<int64_t>(a.pos + i + 1 - k0, 0, nk);
      if (n == 0) continue;
      const int64_t r0 = (i - i0) * per;
      for (int64_t r = r0; r < r0 + per; ++r) {
        float* sr = s + r * kKeyBlock;
        float m = best[r];
        for (int64_t j = 0; j < n; ++j) m = std::max(m, sr[j]);  // a NaN score: the sums below carry it
        const float corr = std::exp(best[r] - m);                // 0 on the first block (best = -inf)
        best[r] = m;
        const float add = exp_shifted_sum(sr, n, m);
        sum[r] = sum[r] * corr + add;
        float* orow = o + r * kMaxPrefillHeadDim;
        if (corr != 1.0f)
          for (int64_t d = 0; d < hd; ++d) orow[d] *= corr;
      }
      // the row's vectors against the values of the keys it sees, up to 3 vectors per pass
      const float* Vb = V + k0 * hd;
      for (int64_t r = r0; r < r0 + per; r += 3) {
        const int R = int(std::min<int64_t>(3, r0 + per - r));
        const float* pr = s + r * kKeyBlock;
        float* orow = o + r * kMaxPrefillHeadDim;
        auto tile = [&](auto vecs, int64_t d0) {
          constexpr int W = decltype(vecs)::value;
          if (R == 3) value_tile<3, W>(pr, Vb, hd, n, orow, d0);
          else if (R == 2) value_tile<2, W>(pr, Vb, hd, n, orow, d0);
          else value_tile<1, W>(pr, Vb, hd, n, orow, d0);
        };
        int64_t d0 = 0;
        for (; d0 + 32 <= hd; d0 += 32) tile(std::integral_constant<int, 4>{}, d0);
        for (; d0 < hd; d0 += 8) tile(std::integral_constant<int, 1>{}, d0);
      }
    }
  }
  for (int64_t r = 0; r < nv; ++r) {
    const float inv = 1.0f / sum[r];
    const float* orow = o + r * kMaxPrefillHeadDim;
    float* dst = a.out + (i0 + r / per) * a.nq * hd + (g * per + r % per) * hd;
    for (int64_t d = 0; d < hd; ++d) dst[d] = orow[d] * inv;
  }
}

}  // namespace

// qkv [T, >= nq * hd] fp32 (the query heads first in each row); k, v [nkv, cap, hd] fp32 holding
// positions 0 .. pos + T - 1 -> [T, nq * hd]: query row i over keys 0 .. pos + i.
at::Tensor attention_prefill(const at::Tensor& qkv, const at::Tensor& k, const at::Tensor& v, int64_t pos,
                             int64_t n_heads, double scale, int64_t threads) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "k, v: [nkv, cap, hd]");
  for (const at::Tensor* t : {&qkv, &k, &v})
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "attention_prefill: fp32 contiguous");
  const int64_t nkv = k.size(0), cap = k.size(1), hd = k.size(2), nq = n_heads;
  TORCH_CHECK(hd > 0 && hd % 8 == 0 && hd <= kMaxPrefillHeadDim, "head dim: a multiple of 8 up to 128");
  TORCH_CHECK(nkv > 0 && nq > 0 && nq % nkv == 0 && nq / nkv <= kMaxVectors,
              "query heads: a positive multiple of KV heads (<= 48 per)");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) >= nq * hd, "qkv: [T, >= nq * hd]");
  const int64_t T = qkv.size(0);
  TORCH_CHECK(pos >= 0 && pos + T <= cap, "pos + T: within the capacity");
  at::Tensor out = at::empty({T, nq * hd}, qkv.options());
  if (T == 0) return out;
  const int64_t rows = std::clamp<int64_t>(kMaxVectors / (nq / nkv), 1, kMaxQueryRows);
  const int64_t blocks = (T + rows - 1) / rows, key_blocks = (pos + T + kKeyBlock - 1) / kKeyBlock;
  const auto kt = scratch(size_t(nkv * key_blocks * hd * kKeyBlock));
  PrefillAttention a{qkv.data_ptr<float>(),
                     k.data_ptr<float>(),
                     v.data_ptr<float>(),
                     kt.get(),
                     out.data_ptr<float>(),
                     qkv.size(1),
                     T,
                     nq,
                     nkv,
                     hd,
                     cap,
                     pos,
                     rows,
                     blocks,
                     key_blocks,
                     float(scale)};
  pool().run(&transpose_key_block, &a, nkv * key_blocks, thread_count(threads) - 1);
  // the longest rows (the last blocks) first: a task's cost grows with its position
  struct Order {
    const PrefillAttention* a;
  } ord{&a};
  auto body = [](const void* c, int64_t t) {
    const auto& x = *static_cast<const Order*>(c)->a;
    const int64_t n = x.nkv * x.blocks - 1 - t;  // reversed, KV heads innermost
    attention_prefill_task(&x, (n % x.nkv) * x.blocks + n / x.nkv);
  };
  pool().run(body, &ord, nkv * blocks, thread_count(threads) - 1);
  return out;
}

// qkv [T, >= nq * hd] fp32 (each row's query heads first); k, v [nkv, cap, hd] fp32, the first
// `length` + T - 1 positions valid; row t over `length` + t of them -> [T, nq * hd].
at::Tensor attention_decode_rows(const at::Tensor& qkv, const at::Tensor& k, const at::Tensor& v, int64_t length,
                                 int64_t n_heads, double scale, int64_t threads) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "k, v: [nkv, cap, hd]");
  for (const at::Tensor* t : {&qkv, &k, &v})
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "attention_decode: fp32 contiguous");
  const int64_t nkv = k.size(0), cap = k.size(1), hd = k.size(2), nq = n_heads;
  TORCH_CHECK(hd > 0 && qkv.dim() == 2 && qkv.size(0) >= 1 && qkv.size(1) >= nq * hd, "qkv: [T, >= nq * hd]");
  TORCH_CHECK(nkv > 0 && nq > 0 && nq % nkv == 0, "query heads must be a multiple of KV heads");
  const int64_t T = qkv.size(0);
  TORCH_CHECK(length >= 1 && length + T - 1 <= cap, "length: 1 .. capacity, for every row");
  at::Tensor out = at::empty({T, nq * hd}, qkv.options());
  const auto scores = scratch(size_t(nkv * (length + T - 1)));
  DecodeAttention a{qkv.data_ptr<float>(),
                    k.data_ptr<float>(),
                    v.data_ptr<float>(),
                    out.data_ptr<float>(),
                    scores.get(),
                    nq,
                    nkv,
                    hd,
                    cap,
                    length,
                    T,
                    qkv.size(1),
                    float(scale)};
  pool().run(&attention_kv_head, &a, nkv, thread_count(threads) - 1);
  return out;
}

// q [nq * hd] fp32; k, v [nkv, cap, hd] fp32, the first `length` positions valid -> [1, nq * hd].
at::Tensor attention_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t length, double scale,
                            int64_t threads) {
  TORCH_CHECK(k.dim() == 3 && k.size(2) > 0 && q.numel() % k.size(2) == 0, "q: [nq * hd]");
  return attention_decode_rows(q.view({1, q.numel()}), k, v, length, q.numel() / k.size(2), scale, threads);
}

}  // namespace granite
