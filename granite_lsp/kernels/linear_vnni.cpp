// int8 weights' products (linear.cpp's I8) on AVX512_VNNI's `vpdpbusd`, for CPUs at level
// avx512_vnni or above (isa.h), compiled for these functions only (`#pragma GCC target` regions).
//
// vpdpbusd multiplies four u8 by four s8 and adds the four products to an int32 lane: 64 products
// per instruction, four times the 16-lane FMA's work. So the activations are quantized to int8 too:
// each row of x gets its own scale (dynamic, per call), sx = max|x_row| / 127, and
// q = round_to_nearest_even(x * (127 / max|x_row|)) in [-127, 127] (the fp32 products as written, so
// tests can repeat them bit for bit: `tests/test_kernels.py`'s `int8_activations`). The sum over k of
// q * w is then exact in int32, and y = fma(float(sum) * sx, sw[n], bias[n]) on every path.
//
// vpdpbusd wants one operand unsigned: an s8 operand offset by 128 is its u8, and the offset's
// contribution, 128 * (sum of the other operand), is subtracted from the exact int32 sum:
//   - streaming kernels (a few rows of x: decode): W's bytes ^ 0x80 as the u8 operand (one xor per
//     64 weights, whatever the row count), x's s8 as the other; minus 128 * sum(q) per row of x;
//   - GEMM (prefill): x's bytes + 128 as the u8 operand, broadcast, W's s8 panels as the other;
//     minus 128 * (the panel column's sum of w), computed as the panel is packed.
// Both give the same int32 sums, so a row of x gets the bit-identical y alone, batched (streaming)
// or in the GEMM (as long as K fits one depth slice, kQuadsKC * 4 = 1024: later slices are added
// in fp32, like the other GEMMs' slices).
//
// The tolerance this costs: the activations' rounding (at most half a step, max|x_row| / 254, per
// activation), documented and tested in tests/test_kernels.py (each product against the float64 one) and
// tests/test_precisions.py (greedy tokens of every fixture equal fp32's; logits against the int8
// product with fp32 activations).
#include <cstring>

#include "isa.h"
#include "linear.h"

namespace granite {
namespace {

constexpr int kMR = 12, kNR = 32;
constexpr int64_t kRowBand = 96;            // rows of packed x swept per panel (8 tiles)
constexpr int64_t kMaxBlockCols = 4 * kNR;  // columns of y per task
constexpr int64_t kQuadsKC = kSliceWords;   // k quads per depth slice: a panel [256][32] x 4 B = 32 KB (L1)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

// Row t of x into q[t] (quantized as the file's header says), its scale and offset. A row with a
// NaN or an infinity gets a NaN scale: its y is NaN, as the fp32 product's would be NaN or infinite.
void quantize_row(const float* x, int64_t K, int8_t* q, int64_t Kp, float* scale, int32_t* offset) {
  __m512 amax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + k);
    bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) |
           _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(INFINITY), _CMP_EQ_OQ);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
  }
  const float a = _mm512_reduce_max_ps(amax);
  const float inv = a > 0 ? 127.0f / a : 0.0f;
  *scale = bad ? NAN : a / 127.0f;
  const __m512 iv = _mm512_set1_ps(bad ? 0.0f : inv);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t k = 0; k < Kp; k += 16) {
    const int64_t left = std::max<int64_t>(0, K - k);
    const __mmask16 m = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    // x * inv in fp32, rounded to nearest even (the MXCSR default), clamped to [-127, 127]
    __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), iv));
    i = _mm512_min_epi32(_mm512_max_epi32(i, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
    sum = _mm512_add_epi32(sum, i);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(i));
  }
  *offset = 128 * _mm512_reduce_add_epi32(sum);
}

struct QuantTask {
  const float* x;
  QuantX* out;
  int64_t K;
};

void quantize_rows(const void* ctx, int64_t t) {
  const auto& c = *static_cast<const QuantTask*>(ctx);
  auto& o = *c.out;
  quantize_row(c.x + t * c.K, c.K, o.q.get() + t * o.Kp, o.Kp, o.scale.get() + t, o.offset.get() + t);
}

// The finished y element from its exact int32 sum: float(sum) * sx, then times sw with the bias
// added in one fused multiply-add (explicit, so that no compiler contraction makes paths differ;
// the GEMM's epilogue does the same on vectors).
inline float finish(int32_t sum, float sx, float sw, const float* bias, int64_t n) {
  const float s = float(sum) * sx;
  return bias ? std::fma(s, sw, bias[n]) : s * sw;
}

// ---------------------------------------------------------------------------------------------
// Streaming kernels: y[t, n] for T <= 8 rows of x and R rows of W, 64 weights (one load, one xor)
// per vpdpbusd per row of x.

struct StreamProblem {
  const Problem<I8>* p;
  const QuantX* qx;
};

// How far ahead (in weights) a pass over R rows of W prefetches each of them, or 0 (as
// linear_avx512.cpp's kStreamAhead for bf16): with 5 or more rows of x a pass holds 1 or 2 rows of W,
// too few memory streams. Process CPU time, 1 thread, new / old, alternating rounds, medians of 10, load
// ~10-11 on 2 cores (noisy): 5 rows of x 0.95x (lm_head 100352x768) and 0.97x (768x3376); with 3 rows
// (4 streams) it lost (1.05x, 1.08x) and is not taken. Loads only: the same bits.
template <int T, int R>
constexpr int64_t kStreamAhead = T >= 5 ? 1024 : 0;

template <int T, int R>
inline void stream_rows(const StreamProblem& sp, int64_t t0, int64_t n, int64_t stride) {
  const auto& p = *sp.p;
  const auto& qx = *sp.qx;
  const int8_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = p.w + (n + r * stride) * p.K;
  __m512i acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_si512();
  const int8_t* x = qx.q.get() + t0 * qx.Kp;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (int64_t k = 0; k < p.K; k += 64) {
    const int64_t left = p.K - k;
    const __mmask64 m = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;  // the tail meets x's zeros
    __m512i xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_si512(x + t * qx.Kp + k);
    constexpr int64_t ahead = kStreamAhead<T, R>;
    if constexpr (ahead > 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r] + k + ahead), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w[r] + k), flip);  // w + 128, as u8
      for (int t = 0; t < T; ++t) acc[t][r] = _mm512_dpbusd_epi32(acc[t][r], wv, xv[t]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) {
      const int64_t row = n + r * stride;
      const int32_t sum = _mm512_reduce_add_epi32(acc[t][r]) - qx.offset[t0 + t];
      p.y[(t0 + t) * p.N + row] = finish(sum, qx.scale[t0 + t], p.scale[row], p.bias, row);
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
      // two rows of W per pass (16 accumulators), one x load feeding two vpdpbusd; each y element is
      // summed as before. With the prefetch above, 9 rows (8 + 1) took 0.78x (lm_head) and 0.83x
      // (768x3376) of the one-row-of-W pass without it (two rows of W alone 0.88x / 0.92x, the
      // prefetch alone 0.91x / 0.91x; same runs as above).
      default: stream_range<8, 2>(sp, t0, begin, end); break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// GEMM (prefill): BLIS's loop order as in linear_avx512.cpp, on int32 "quads" (4 consecutive k).
// x: row tiles [ceil(T / 12)][K4][12] of quads of u8 (q + 128; a short last tile repeats its last
// row); W: panels [qc][32] of quads of s8, a plain 32-bit copy out of each row. A 12 x 32 tile of y
// takes 24 int32 accumulators, one broadcast quad per row and two vpdpbusd per quad.

struct PackTiles {
  const QuantX* qx;
  uint32_t* packed;
  int64_t T, K4;
};

void pack_x_tile(const void* ctx, int64_t tile) {
  const auto& p = *static_cast<const PackTiles*>(ctx);
  const uint32_t* rows[kMR];
  for (int i = 0; i < kMR; ++i)
    rows[i] = reinterpret_cast<const uint32_t*>(p.qx->q.get() + std::min<int64_t>(tile * kMR + i, p.T - 1) * p.qx->Kp);
  uint32_t* dst = p.packed + tile * p.K4 * kMR;
  for (int64_t q = 0; q < p.K4; ++q)
    for (int i = 0; i < kMR; ++i) dst[q * kMR + i] = rows[i][q] ^ 0x80808080u;  // s8 + 128 = u8
}

// Columns [n0, n0 + 32) of W^T, quads [q0, q0 + qc), as [qc][32] (zero past N and K), and each
// column's sum of its weights over the slice, times 128 (what the x offset adds).
void pack_panel_i8(const Problem<I8>& g, int64_t n0, int64_t q0, int64_t qc, uint32_t* dst, int32_t* offset) {
  const int64_t valid = std::min<int64_t>(kNR, g.N - n0);
  const int64_t k0 = 4 * q0, kend = std::min<int64_t>(g.K, 4 * (q0 + qc));
  for (int r = 0; r < kNR; ++r) {
    if (r >= valid) {
      for (int64_t q = 0; q < qc; ++q) dst[q * kNR + r] = 0;
      offset[r] = 0;
      continue;
    }
    const int8_t* row = g.w + (n0 + r) * g.K;
    const int64_t whole = (kend - k0) / 4;
    int32_t sum = 0;
    for (int64_t q = 0; q < whole; ++q) {
      uint32_t quad;
      std::memcpy(&quad, row + k0 + 4 * q, sizeof quad);
      dst[q * kNR + r] = quad;
    }
    for (int64_t q = whole; q < qc; ++q) {  // the K % 4 tail, zero-padded
      int8_t b[4] = {0, 0, 0, 0};
      for (int j = 0; j < 4 && k0 + 4 * q + j < kend; ++j) b[j] = row[k0 + 4 * q + j];
      std::memcpy(&dst[q * kNR + r], b, sizeof b);
    }
    for (int64_t k = k0; k < kend; ++k) sum += row[k];
    offset[r] = 128 * sum;
  }
}

#define GRANITE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

// y tile (+)= the slice's products: a the tile's packed x quads ([qc][12]), b a panel ([qc][32]),
// offset the panel's 128 * column sums; sx the tile rows' scales, sw and bias the columns'.
void micro_i8(const uint32_t* a, const uint32_t* b, const int32_t* offset, int64_t qc, float* y, int64_t ldy, int rows,
              int cols, bool accumulate, const float* sx, const float* sw, const float* bias) {
#define GRANITE_DECL(i) __m512i c##i##0 = _mm512_setzero_si512(), c##i##1 = _mm512_setzero_si512();
  GRANITE_ROWS(GRANITE_DECL)
#undef GRANITE_DECL
  for (int64_t q = 0; q < qc; ++q, a += kMR, b += kNR) {
    const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 16);
#define GRANITE_DOT(i)                               \
  {                                                  \
    const __m512i av = _mm512_set1_epi32(int(a[i])); \
    c##i##0 = _mm512_dpbusd_epi32(c##i##0, av, b0);  \
    c##i##1 = _mm512_dpbusd_epi32(c##i##1, av, b1);  \
  }
    GRANITE_ROWS(GRANITE_DOT)
#undef GRANITE_DOT
  }
  // the epilogue from the registers: fma(float(sum - offset) * sx, sw, bias or y (later slices))
  const __mmask16 m0 = __mmask16(cols >= 16 ? 0xffff : (1u << cols) - 1);
  const __mmask16 m1 = __mmask16(cols >= 32 ? 0xffff : cols > 16 ? (1u << (cols - 16)) - 1 : 0);
  const __m512i o0 = _mm512_loadu_si512(offset), o1 = _mm512_loadu_si512(offset + 16);
  const __m512 w0 = _mm512_maskz_loadu_ps(m0, sw), w1 = _mm512_maskz_loadu_ps(m1, sw + 16);
  const __m512 z0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 z1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
#define GRANITE_OUT(i)                                                                     \
  if (i < rows) {                                                                          \
    float* yr = y + i * ldy;                                                               \
    const __m512 s = _mm512_set1_ps(sx[i]);                                                \
    const __m512 s0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c##i##0, o0)), s); \
    const __m512 s1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c##i##1, o1)), s); \
    __m512 v0, v1;                                                                         \
    if (accumulate) {                                                                      \
      v0 = _mm512_fmadd_ps(s0, w0, _mm512_maskz_loadu_ps(m0, yr));                         \
      v1 = _mm512_fmadd_ps(s1, w1, _mm512_maskz_loadu_ps(m1, yr + 16));                    \
    } else if (bias) {                                                                     \
      v0 = _mm512_fmadd_ps(s0, w0, z0);                                                    \
      v1 = _mm512_fmadd_ps(s1, w1, z1);                                                    \
    } else {                                                                               \
      v0 = _mm512_mul_ps(s0, w0);                                                          \
      v1 = _mm512_mul_ps(s1, w1);                                                          \
    }                                                                                      \
    _mm512_mask_storeu_ps(yr, m0, v0);                                                     \
    _mm512_mask_storeu_ps(yr + 16, m1, v1);                                                \
  }
  GRANITE_ROWS(GRANITE_OUT)
#undef GRANITE_OUT
}

#undef GRANITE_ROWS

struct QuadsProblem {
  const Problem<I8>* g;
  const QuantX* qx;
  const uint32_t* xp;  // packed x quads
  int64_t K4;
};

void block_i8(const void* problem, int64_t c) {
  const auto& pp = *static_cast<const QuadsProblem*>(problem);
  const auto& g = *pp.g;
  const int64_t n0 = c * g.block, cols = std::min(g.block, g.N - n0);
  const int64_t panels = (cols + kNR - 1) / kNR;
  alignas(64) uint32_t packed[kMaxBlockCols * kQuadsKC];  // 128 KB on the stack: nothing to allocate in a task
  int32_t offsets[kMaxBlockCols];
  for (int64_t q0 = 0; q0 < pp.K4; q0 += kQuadsKC) {
    const int64_t qc = std::min<int64_t>(kQuadsKC, pp.K4 - q0);
    for (int64_t j = 0; j < panels; ++j)
      pack_panel_i8(g, n0 + j * kNR, q0, qc, packed + j * kNR * qc, offsets + j * kNR);
    for_each_tile<kMR, kNR, kRowBand>(g.T, g.N, n0, panels, [&](int64_t j, int64_t n, int ncols, int64_t t, int rows) {
      const uint32_t* a = pp.xp + (t / kMR) * pp.K4 * kMR + q0 * kMR;
      micro_i8(a, packed + j * kNR * qc, offsets + j * kNR, qc, g.y + t * g.N + n, g.N, rows, ncols, q0 > 0,
               pp.qx->scale.get() + t, g.scale + n, g.bias ? g.bias + n : nullptr);
    });
  }
}

#pragma GCC pop_options

}  // namespace

// x's rows quantized (on the pool: a prefill's 512 rows are worth sharing).
QuantX quantize(const Problem<I8>& p, int threads, int64_t rows) {
  QuantX qx;
  qx.Kp = (p.K + 63) / 64 * 64;
  qx.q.reset(new int8_t[size_t(rows * qx.Kp)]);
  qx.scale.reset(new float[size_t(p.T)]);
  qx.offset.reset(new int32_t[size_t(p.T)]);
  const QuantTask task{p.x, &qx, p.K};
  pool().run(&quantize_rows, &task, p.T, p.T >= 32 ? threads - 1 : 0);
  if (rows > p.T) std::memset(qx.q.get() + p.T * qx.Kp, 0, size_t((rows - p.T) * qx.Kp));
  return qx;
}

void stream_i8_vnni(const Problem<I8>& problem, int threads) {
  Problem<I8> p = problem;
  const QuantX qx = quantize(p, threads, p.T);
  p.block = streaming_block(p.K, p.N, threads);
  const StreamProblem sp{&p, &qx};
  pool().run(&stream_chunk, &sp, (p.N + p.block - 1) / p.block, threads - 1);
}

void gemm_i8_vnni(const Problem<I8>& problem, int threads) {
  Problem<I8> g = problem;
  const QuantX qx = quantize(g, threads, g.T);
  const int64_t tiles = (g.T + kMR - 1) / kMR, K4 = (g.K + 3) / 4;
  std::unique_ptr<uint32_t[]> xp(new uint32_t[size_t(tiles * K4 * kMR)]);
  PackTiles px{&qx, xp.get(), g.T, K4};
  pool().run(&pack_x_tile, &px, tiles, threads - 1);
  g.block = gemm_block_cols(g.N, threads, kNR, kMaxBlockCols);
  const QuadsProblem pp{&g, &qx, xp.get(), K4};
  pool().run(&block_i8, &pp, (g.N + g.block - 1) / g.block, threads - 1);
}

}  // namespace granite
