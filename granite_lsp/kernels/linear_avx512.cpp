// The products of linear.cpp for AVX-512 CPUs (the prefill GEMM; for fp16 and bf16 weights the
// decode's streaming kernels too), compiled for these functions only (`#pragma GCC target` regions
// below) and called only where isa.h's level allows.
//
// AVX-512F: the avx2 GEMM's algorithm on 16-lane registers and twice the registers: a 12 x 32
// tile of y (24 accumulators) per micro-kernel call, one broadcast of x per row and two FMAs per
// k. W is widened into the same fp32 panels (32 columns wide) and summed over the same depth
// slices in the same order, so every y element is bit-identical to the avx2 GEMM's.
//
// AVX512_BF16 (bf16 weights): `vdpbf16ps` multiplies pairs of bf16 and adds both products to an
// fp32 lane, twice the FMA's work per instruction. W needs no widening: its panels hold each
// column's consecutive (k, k + 1) pairs, which is a plain 32-bit copy out of a bf16 row, and x is
// rounded to bf16 (to nearest even) as it is packed. The streaming kernels (a few rows of x, where
// the weights' bytes set the speed) read 32 bf16 weights per load and instruction, against x's pairs
// rounded the same way, in the same order for every row count. The product is then that of bf16-rounded
// activations, summed in fp32: about 3 significant digits of each activation where the other
// paths keep 7 (the tolerance tests/test_kernels.py checks against the exact product of the
// rounded x, and the greedy tokens tests/test_precisions.py compares with fp32's).
#include <cstring>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "linear.h"

namespace granite {
namespace {

constexpr int kMR = 12, kNR = 32;
constexpr int64_t kRowBand = 96;            // rows of packed x swept per panel (8 tiles, ~96-192 KB: L2)
constexpr int64_t kMaxBlockCols = 4 * kNR;  // columns of y per task
constexpr int64_t kPairsKC = kSliceWords;   // bf16: k pairs per depth slice (panel [256][32] x 4 B)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

// The micro-kernels' epilogue: the finished 12 x 32 tile (accumulators c<i>0, c<i>1) into y straight
// from the registers, rows x cols of it, added to y (later depth slices) or with the bias (the
// first): per element the same IEEE addition as the avx2 GEMM's. (Through a tile on the stack and
// scalar adds, it was ~10% of the bf16 GEMM.)
#define GRANITE_EPILOGUE_MASKS                                                                   \
  const __mmask16 m0 = __mmask16(cols >= 16 ? 0xffff : (1u << cols) - 1);                        \
  const __mmask16 m1 = __mmask16(cols >= 32 ? 0xffff : cols > 16 ? (1u << (cols - 16)) - 1 : 0); \
  const __m512 z0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();                \
  const __m512 z1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
#define GRANITE_STORE(i)                                          \
  if (i < rows) {                                                 \
    float* yr = y + i * ldy;                                      \
    __m512 v0 = c##i##0, v1 = c##i##1;                            \
    if (accumulate) {                                             \
      v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, yr), v0);      \
      v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, yr + 16), v1); \
    } else if (bias) {                                            \
      v0 = _mm512_add_ps(v0, z0);                                 \
      v1 = _mm512_add_ps(v1, z1);                                 \
    }                                                             \
    _mm512_mask_storeu_ps(yr, m0, v0);                            \
    _mm512_mask_storeu_ps(yr + 16, m1, v1);                       \
  }

// ---------------------------------------------------------------------------------------------
// AVX-512F, fp32 panels.

// x [T, K] as row tiles [ceil(T / 12)][K][12] (a short last tile repeats its last row).
struct PackX {
  const float* x;
  float* packed;
  int64_t T, K;
};

void pack_x_tile(const void* ctx, int64_t tile) {
  const auto& p = *static_cast<const PackX*>(ctx);
  const float* rows[kMR];
  for (int i = 0; i < kMR; ++i) rows[i] = p.x + std::min<int64_t>(tile * kMR + i, p.T - 1) * p.K;
  float* dst = p.packed + tile * p.K * kMR;
  for (int64_t k = 0; k < p.K; ++k)
    for (int i = 0; i < kMR; ++i) dst[k * kMR + i] = rows[i][k];
}

#define GRANITE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

// y tile (+)= a @ b: a the tile's packed x ([kc][12]), b a panel of W^T ([kc][32]). Each lane's
// sum runs over k in order from zero, as in the avx2 micro-kernel. Named accumulators: as an
// array GCC keeps them in memory.
void micro_f32(const float* a, const float* b, int64_t kc, float* y, int64_t ldy, int rows, int cols, bool accumulate,
               const float* bias) {
#define GRANITE_DECL(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = _mm512_setzero_ps();
  GRANITE_ROWS(GRANITE_DECL)
#undef GRANITE_DECL
  for (int64_t k = 0; k < kc; ++k, a += kMR, b += kNR) {
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
#define GRANITE_FMA(i)                          \
  {                                             \
    const __m512 av = _mm512_set1_ps(a[i]);     \
    c##i##0 = _mm512_fmadd_ps(av, b0, c##i##0); \
    c##i##1 = _mm512_fmadd_ps(av, b1, c##i##1); \
  }
    GRANITE_ROWS(GRANITE_FMA)
#undef GRANITE_FMA
  }
  GRANITE_EPILOGUE_MASKS
  GRANITE_ROWS(GRANITE_STORE)
}

template <class W>
void block_f32(const void* problem, int64_t c) {
  const auto& g = *static_cast<const Problem<W>*>(problem);
  const int64_t n0 = c * g.block, cols = std::min(g.block, g.N - n0);
  const int64_t panels = (cols + kNR - 1) / kNR;
  alignas(64) float packed[kMaxBlockCols * kKC];  // 128 KB on the stack: nothing to allocate in a task
  for (int64_t k0 = 0; k0 < g.K; k0 += kKC) {
    const int64_t kc = std::min<int64_t>(kKC, g.K - k0);
    for (int64_t j = 0; j < panels; ++j) pack_panel<W, kNR>(g, n0 + j * kNR, k0, kc, packed + j * kNR * kc);
    for_each_tile<kMR, kNR, kRowBand>(g.T, g.N, n0, panels, [&](int64_t j, int64_t n, int ncols, int64_t t, int rows) {
      const float* a = g.xp + (t / kMR) * g.K * kMR + k0 * kMR;
      micro_f32(a, packed + j * kNR * kc, kc, g.y + t * g.N + n, g.N, rows, ncols, k0 > 0,
                g.bias ? g.bias + n : nullptr);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Streaming kernels (decode) for 16-bit weights widened to fp32 on 16 lanes: fp16 (vcvtph2ps zmm)
// at avx512 and above, bf16 (a zero-extend and a shift) at avx512 and avx512_vnni. Per 16 weights
// one load, one widening, one FMA: half the instructions of the avx2 kernels' 8-lane loop, which
// for 2-byte weights spent as many instructions per byte as the memory allowed. Each y element is
// an fp32 sum over 16 lanes (the avx2 kernels': 8), in the same order whatever T is, so a row's
// result is the same alone or batched; against the avx2 kernels only the summation order differs.

struct Wide16F16 {
  static __m512 load(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __m512 load(const uint16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
};

struct Wide16BF16 {
  static __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static __m512 load(const uint16_t* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m512 load(const uint16_t* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
};

// y[t, n + r * stride] for T rows of x and R rows of W, as linear.cpp's rows().
template <class Wide, class W, int T, int R>
inline void wide_rows(const Problem<W>& p, const float* x, float* y, int64_t n, int64_t stride) {
  const int64_t K = p.K;
  const uint16_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = p.w + (n + r * stride) * K;
  __m512 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_ps(x + t * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = Wide::load(w[r] + k);
      for (int t = 0; t < T; ++t) acc[t][r] = _mm512_fmadd_ps(xv[t], wv, acc[t][r]);
    }
  }
  if (k < K) {  // the K % 16 tail: zeros in both operands past K
    const __mmask16 m = __mmask16((1u << (K - k)) - 1);
    __m512 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_ps(m, x + t * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = Wide::load(w[r] + k, m);
      for (int t = 0; t < T; ++t) acc[t][r] = _mm512_fmadd_ps(xv[t], wv, acc[t][r]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) {
      const int64_t row = n + r * stride;
      float s = _mm512_reduce_add_ps(acc[t][r]);
      if (p.scale) s *= p.scale[row];
      if (p.bias) s += p.bias[row];
      y[t * p.N + row] = s;
    }
}

// W rows [begin, end) in R side-by-side runs (linear.cpp's row_range).
template <class Wide, class W, int T, int R>
void wide_range(const Problem<W>& p, int64_t t0, int64_t begin, int64_t end) {
  const float* x = p.x + t0 * p.K;
  float* y = p.y + t0 * p.N;
  const int64_t run = (end - begin) / R;
  for (int64_t i = 0; i < run; ++i) wide_rows<Wide, W, T, R>(p, x, y, begin + i, run);
  for (int64_t n = begin + R * run; n < end; ++n) wide_rows<Wide, W, T, 1>(p, x, y, n, 0);
}

template <class Wide, class W>
void wide_chunk(const void* problem, int64_t c) {
  const auto& p = *static_cast<const Problem<W>*>(problem);
  const int64_t begin = c * p.block, end = std::min(p.N, begin + p.block);
  for (int64_t t0 = 0; t0 < p.T; t0 += 8) {
    switch (std::min<int64_t>(p.T - t0, 8)) {
      case 1: wide_range<Wide, W, 1, 8>(p, t0, begin, end); break;
      case 2: wide_range<Wide, W, 2, 6>(p, t0, begin, end); break;
      case 3: wide_range<Wide, W, 3, 4>(p, t0, begin, end); break;
      case 4: wide_range<Wide, W, 4, 3>(p, t0, begin, end); break;
      case 5: wide_range<Wide, W, 5, 2>(p, t0, begin, end); break;
      case 6: wide_range<Wide, W, 6, 2>(p, t0, begin, end); break;
      case 7: wide_range<Wide, W, 7, 1>(p, t0, begin, end); break;
      default: wide_range<Wide, W, 8, 1>(p, t0, begin, end); break;
    }
  }
}

#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// AVX512_BF16: bf16 pairs.

// The bf16 nearest to f (ties to even), as torch rounds; NaN stays a (quiet) NaN.
inline uint32_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// x [T, K] as row tiles [ceil(T / 12)][ceil(K / 2)][12] of bf16 pairs (x[k] low, x[k + 1] high; an
// odd K's last pair padded with zero).
struct PackPairs {
  const float* x;
  uint32_t* packed;
  int64_t T, K, K2;
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

// bf16_bits on 16 lanes: the same bits (integer ops, no MXCSR), 16 bf16 out.
inline __m256i bf16_bits16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f), hi = _mm512_srli_epi32(u, 16);
  const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40))));
}

// 16 pairs (32 values of x) at a time per row: rounded on vectors, then spread into the tile's
// [q][12] layout (per element the same bits as bf16_bits; the scalar version was ~3% of the GEMM).
void pack_pairs_tile(const void* ctx, int64_t tile) {
  const auto& p = *static_cast<const PackPairs*>(ctx);
  const float* rows[kMR];
  for (int i = 0; i < kMR; ++i) rows[i] = p.x + std::min<int64_t>(tile * kMR + i, p.T - 1) * p.K;
  uint32_t* dst = p.packed + tile * p.K2 * kMR;
  alignas(64) uint32_t words[kMR][16];
  for (int64_t q0 = 0; q0 < p.K2; q0 += 16) {
    const int64_t k = 2 * q0, left = p.K - k;
    const __mmask16 ma = __mmask16(left >= 16 ? 0xffff : (1u << left) - 1);
    const __mmask16 mb = __mmask16(left >= 32 ? 0xffff : left > 16 ? (1u << (left - 16)) - 1 : 0);
    for (int i = 0; i < kMR; ++i) {
      const __m256i a = bf16_bits16(_mm512_maskz_loadu_ps(ma, rows[i] + k));
      const __m256i b = bf16_bits16(_mm512_maskz_loadu_ps(mb, rows[i] + k + 16));
      _mm512_store_si512(reinterpret_cast<__m512i*>(words[i]), _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
    }
    const int64_t qn = std::min<int64_t>(16, p.K2 - q0);
    for (int64_t q = 0; q < qn; ++q)
      for (int i = 0; i < kMR; ++i) dst[(q0 + q) * kMR + i] = words[i][q];
  }
}

}  // namespace

// One row of x [K] as Q bf16 pairs (Q a multiple of 16, zero past K): bf16_bits16's bits, the
// scalar bf16_bits' (a decode step rounds ~155 K activations: scalar, that was ~0.5 ms a step).
void round_pairs(const float* x, int64_t K, int64_t Q, uint32_t* out) {
  for (int64_t q0 = 0; q0 < Q; q0 += 16) {
    const int64_t k = 2 * q0, left = K - k;
    const __mmask16 ma = __mmask16(left >= 16 ? 0xffff : left > 0 ? (1u << left) - 1 : 0);
    const __mmask16 mb = __mmask16(left >= 32 ? 0xffff : left > 16 ? (1u << (left - 16)) - 1 : 0);
    const __m256i a = bf16_bits16(_mm512_maskz_loadu_ps(ma, x + k));
    const __m256i b = bf16_bits16(_mm512_maskz_loadu_ps(mb, x + k + 16));
    _mm512_storeu_si512(out + q0, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
  }
}

// Columns [n0, n0 + 32) of W^T, pairs [q0, q0 + qc), as [qc][32] bf16 pairs (zero past N and K).
// Full panels go 16 rows x 16 pairs at a time through transpose16 (the scalar copy was ~10% of the
// bf16 GEMM); the rest, pair by pair.
void pack_pairs_panel(const Problem<BF16>& g, int64_t n0, int64_t q0, int64_t qc, uint32_t* dst) {
  const int64_t valid = std::min<int64_t>(kNR, g.N - n0);
  const bool odd_tail = (g.K & 1) && q0 + qc == (g.K + 1) / 2;  // the last pair has one weight
  const int64_t whole = odd_tail ? qc - 1 : qc;
  int64_t done = 0;  // pairs packed on vectors (all rows)
  if (valid == kNR) {
    for (; done + 16 <= whole; done += 16)
      for (int r0 = 0; r0 < kNR; r0 += 16) {
        __m512 v[16];
        for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_ps(g.w + (n0 + r0 + i) * g.K + 2 * (q0 + done));
        transpose16(v);
        for (int j = 0; j < 16; ++j) _mm512_storeu_ps(reinterpret_cast<float*>(dst + (done + j) * kNR + r0), v[j]);
      }
  }
  for (int r = 0; r < kNR; ++r) {
    if (r >= valid) {
      for (int64_t q = 0; q < qc; ++q) dst[q * kNR + r] = 0;
      continue;
    }
    const uint16_t* row = g.w + (n0 + r) * g.K + 2 * q0;
    for (int64_t q = done; q < whole; ++q) {
      uint32_t pair;
      std::memcpy(&pair, row + 2 * q, sizeof pair);
      dst[q * kNR + r] = pair;
    }
    if (odd_tail) dst[whole * kNR + r] = row[2 * whole];
  }
}

namespace {

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

// ---------------------------------------------------------------------------------------------
// Streaming kernels (decode): y[t, n] for T <= 8 rows of x and R rows of W, 32 weights (64 bytes,
// one load) per vdpbf16ps, against x's pairs (rounded once per call, zero-padded to a multiple of
// 16 pairs). Each y element is summed in the same order whatever T is.

struct StreamProblem {
  const Problem<BF16>* p;
  const uint32_t* xq;  // [T][Q] bf16 pairs, Q a multiple of 16
  int64_t Q;
};

// How far ahead (in weights) a pass over R rows of W prefetches each of them, or 0. Three or more rows
// of x leave room for only 1-4 rows of W per pass, and so as few long streams: too few requests in
// flight to keep memory busy (the comment on linear.cpp's row_range). A prefetch 1 KB ahead on each
// (the next row's start once the row ends: a run's rows are consecutive) made those passes cheaper:
// process CPU time, 1 thread, new / old, alternating rounds at load ~12 on 2 cores (noisy): 3 rows of x
// 0.86x (768x3376) and 0.97x (lm_head 100352x768), 5 rows 0.97x and 0.97x, 9 rows (8 + 1) 0.75x and
// 0.88x. With 1 or 2 rows of x (8 or 6 streams) it only added work (2 rows: 1.01x, 1.06x; 2 KB ahead
// 1.18x), and 2 KB ahead did no better for the others. Loads only: the same bits.
template <int T, int R>
constexpr int64_t kStreamAhead = T >= 3 ? 512 : 0;

template <int T, int R>
inline void stream_rows(const StreamProblem& sp, int64_t t0, int64_t n, int64_t stride) {
  const auto& p = *sp.p;
  const uint16_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = p.w + (n + r * stride) * p.K;
  __m512 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  const uint32_t* x = sp.xq + t0 * sp.Q;
  for (int64_t k = 0; k < p.K; k += 32) {
    const int64_t left = p.K - k;
    const __mmask32 m = left >= 32 ? ~__mmask32(0) : __mmask32((1u << left) - 1);  // the K % 32 tail: zeros
    __m512bh xv[T];
    for (int t = 0; t < T; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(x + t * sp.Q + k / 2);
    constexpr int64_t ahead = kStreamAhead<T, R>;
    if constexpr (ahead > 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r] + k + ahead), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w[r] + k);
      for (int t = 0; t < T; ++t) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv[t], wv);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) {
      const int64_t row = n + r * stride;
      float s = _mm512_reduce_add_ps(acc[t][r]);
      if (p.bias) s += p.bias[row];
      p.y[(t0 + t) * p.N + row] = s;
    }
}

// W rows [begin, end) in R side-by-side runs (R long sequential streams, as linear.cpp's row_range).
template <int T, int R>
void stream_range(const StreamProblem& sp, int64_t t0, int64_t begin, int64_t end) {
  const int64_t run = (end - begin) / R;
  for (int64_t i = 0; i < run; ++i) stream_rows<T, R>(sp, t0, begin + i, run);
  for (int64_t n = begin + R * run; n < end; ++n) stream_rows<T, 1>(sp, t0, n, 0);
}

void stream_chunk(const void* problem, int64_t c) {
  const auto& sp = *static_cast<const StreamProblem*>(problem);
  const auto& p = *sp.p;
  const int64_t begin = c * p.block, end = std::min(p.N, begin + p.block);
  for (int64_t t0 = 0; t0 < p.T; t0 += 8) {
    switch (std::min<int64_t>(p.T - t0, 8)) {
      case 1: stream_range<1, 8>(sp, t0, begin, end); break;
      case 2: stream_range<2, 6>(sp, t0, begin, end); break;
      case 3: stream_range<3, 4>(sp, t0, begin, end); break;
      case 4: stream_range<4, 3>(sp, t0, begin, end); break;
      case 5: stream_range<5, 2>(sp, t0, begin, end); break;
      case 6: stream_range<6, 2>(sp, t0, begin, end); break;
      case 7: stream_range<7, 1>(sp, t0, begin, end); break;
      // two rows of W per pass (16 accumulators): one x load now feeds two vdpbf16ps. In process CPU
      // time, 1 thread, alternating rounds (load ~10 on 2 cores, noisy): 8 rows of x 0.89-0.96x and 9
      // rows 0.89-0.92x the one-row-of-W pass; more rows of W for 2, 3 or 5 rows of x did not pay
      // (1.00-1.10x). Each y element is summed as before: the same bits.
      default: stream_range<8, 2>(sp, t0, begin, end); break;
    }
  }
}

// y tile (+)= a @ b over qc pairs: a the tile's packed x pairs ([qc][12]), b a panel ([qc][32]).
void micro_bf16(const uint32_t* a, const uint32_t* b, int64_t qc, float* y, int64_t ldy, int rows, int cols,
                bool accumulate, const float* bias) {
#define GRANITE_DECL(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = _mm512_setzero_ps();
  GRANITE_ROWS(GRANITE_DECL)
#undef GRANITE_DECL
  for (int64_t q = 0; q < qc; ++q, a += kMR, b += kNR) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 16);
#define GRANITE_DOT(i)                                          \
  {                                                             \
    const __m512bh av = (__m512bh)_mm512_set1_epi32(int(a[i])); \
    c##i##0 = _mm512_dpbf16_ps(c##i##0, av, b0);                \
    c##i##1 = _mm512_dpbf16_ps(c##i##1, av, b1);                \
  }
    GRANITE_ROWS(GRANITE_DOT)
#undef GRANITE_DOT
  }
  GRANITE_EPILOGUE_MASKS
  GRANITE_ROWS(GRANITE_STORE)
}

#undef GRANITE_ROWS
#undef GRANITE_STORE
#undef GRANITE_EPILOGUE_MASKS

struct PairsProblem {
  const Problem<BF16>* g;
  const uint32_t* xp;  // packed x pairs
  int64_t K2;
};

void block_bf16(const void* problem, int64_t c) {
  const auto& pp = *static_cast<const PairsProblem*>(problem);
  const auto& g = *pp.g;
  const int64_t n0 = c * g.block, cols = std::min(g.block, g.N - n0);
  const int64_t panels = (cols + kNR - 1) / kNR;
  alignas(64) uint32_t packed[kMaxBlockCols * kPairsKC];  // 128 KB
  for (int64_t q0 = 0; q0 < pp.K2; q0 += kPairsKC) {
    const int64_t qc = std::min<int64_t>(kPairsKC, pp.K2 - q0);
    for (int64_t j = 0; j < panels; ++j) pack_pairs_panel(g, n0 + j * kNR, q0, qc, packed + j * kNR * qc);
    for_each_tile<kMR, kNR, kRowBand>(g.T, g.N, n0, panels, [&](int64_t j, int64_t n, int ncols, int64_t t, int rows) {
      const uint32_t* a = pp.xp + (t / kMR) * pp.K2 * kMR + q0 * kMR;
      micro_bf16(a, packed + j * kNR * qc, qc, g.y + t * g.N + n, g.N, rows, ncols, q0 > 0,
                 g.bias ? g.bias + n : nullptr);
    });
  }
}

#pragma GCC pop_options

}  // namespace

template <class W>
void gemm_avx512(const Problem<W>& problem, int threads) {
  Problem<W> g = problem;
  const int64_t tiles = (g.T + kMR - 1) / kMR;
  const auto xp = scratch(size_t(tiles * g.K * kMR));
  PackX px{g.x, xp.get(), g.T, g.K};
  pool().run(&pack_x_tile, &px, tiles, threads - 1);
  g.xp = xp.get();
  g.block = gemm_block_cols(g.N, threads, kNR, kMaxBlockCols);
  pool().run(&block_f32<W>, &g, (g.N + g.block - 1) / g.block, threads - 1);
}

template void gemm_avx512<F32>(const Problem<F32>&, int);
template void gemm_avx512<BF16>(const Problem<BF16>&, int);
template void gemm_avx512<F16>(const Problem<F16>&, int);
template void gemm_avx512<I8>(const Problem<I8>&, int);

void gemm_bf16_avx512(const Problem<BF16>& problem, int threads) {
  if (problem.scale) return gemm_avx512(problem, threads);  // a scale would have to round into the bf16 weights
  Problem<BF16> g = problem;
  const int64_t tiles = (g.T + kMR - 1) / kMR, K2 = (g.K + 1) / 2;
  std::unique_ptr<uint32_t[]> xp(new uint32_t[size_t(tiles * K2 * kMR)]);
  PackPairs px{g.x, xp.get(), g.T, g.K, K2};
  pool().run(&pack_pairs_tile, &px, tiles, threads - 1);
  g.block = gemm_block_cols(g.N, threads, kNR, kMaxBlockCols);
  const PairsProblem pp{&g, xp.get(), K2};
  pool().run(&block_bf16, &pp, (g.N + g.block - 1) / g.block, threads - 1);
}

template <class W>
void stream_avx512(const Problem<W>& problem, int threads) {
  static_assert(std::is_same_v<W, F16> || std::is_same_v<W, BF16>, "16-bit weights");
  using Wide = std::conditional_t<std::is_same_v<W, F16>, Wide16F16, Wide16BF16>;
  Problem<W> p = problem;
  p.block = streaming_block(p.K * 2, p.N, threads);
  pool().run(&wide_chunk<Wide, W>, &p, (p.N + p.block - 1) / p.block, threads - 1);
}

template void stream_avx512<F16>(const Problem<F16>&, int);
template void stream_avx512<BF16>(const Problem<BF16>&, int);

void stream_bf16_avx512(const Problem<BF16>& problem, int threads) {
  Problem<BF16> p = problem;
  const int64_t Q = bf16_pairs(p.K);
  // The caller's buffer, kept between calls: a decode step makes ~130 of these products, and the
  // pool's tasks only read it while this call waits for them.
  thread_local std::vector<uint32_t> xq;
  if (xq.size() < size_t(p.T * Q)) xq.resize(size_t(p.T * Q));
  for (int64_t t = 0; t < p.T; ++t) round_pairs(p.x + t * p.K, p.K, Q, xq.data() + t * Q);
  p.block = streaming_block(p.K * 2, p.N, threads);
  const StreamProblem sp{&p, xq.data(), Q};
  pool().run(&stream_chunk, &sp, (p.N + p.block - 1) / p.block, threads - 1);
}

}  // namespace granite
