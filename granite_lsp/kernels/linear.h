// What the products' instruction-set variants share (linear.cpp, linear_avx512.cpp, linear_vnni.cpp,
// linear_amx.cpp, linear_amx_stream.cpp): the problem's description, the packing of W into panels, and
// the functions each variant's file defines for the others and for linear.cpp's dispatch.
#pragma once

#include "common.h"
#include "isa.h"  // GRANITE_HAVE_AMX

namespace granite {

// One product y = x @ W^T (* scale) (+ bias), for the streaming kernels and the GEMM alike.
template <class W>
struct Problem {
  const float* x;             // [T, K]
  const typename W::Elem* w;  // [N, K]
  const float* scale;         // [N] or null
  const float* bias;          // [N] or null
  float* y;                   // [T, N]
  int64_t T, K, N;
  int64_t block = 0;          // rows of W per task (streaming) or columns of y per task (GEMM)
  const float* xp = nullptr;  // GEMM: x packed in row tiles
};

// Rows of W per task of the streaming kernels: chunks of >= 32 KB of weights (the shared counter
// costs nothing at that size), at most 256 KB (they stay in L2 while the groups of x pass over
// them, and a chunk is what a preempted helper can hold up), and >= 4 per thread when W is small.
inline int64_t streaming_block(int64_t row_bytes, int64_t N, int threads) {
  const int64_t bytes = std::clamp<int64_t>(row_bytes * N / (4 * threads), 32 << 10, 256 << 10);
  return std::max<int64_t>(1, bytes / row_bytes);
}

// The GEMMs' blocks of columns of y (one pool task each): whole multiples of their register tile's
// width nr, at most max_cols, and at least ~4 per thread so that a preempted thread holds up little.
inline int64_t gemm_block_cols(int64_t N, int threads, int64_t nr, int64_t max_cols) {
  const int64_t want = (N + 4 * threads - 1) / (4 * threads);
  return std::clamp<int64_t>((want + nr - 1) / nr * nr, nr, max_cols);
}

// The depth slice, in 4-byte words (bf16 pairs, int8 quads), of the GEMMs that take x as such words
// (linear_avx512.cpp's bf16, linear_vnni.cpp's, linear_amx.cpp's) and of amx's streaming kernels: a
// slice's sums are added into y in fp32, so int8 at amx is bit-identical to vnni, and amx's bf16
// streaming rows to its GEMM's, because they all slice here.
constexpr int64_t kSliceWords = 256;

// bf16 pairs of a row of x rounded for vdpbf16ps / TDPBF16PS: K padded to whole 64-byte steps (round_pairs).
inline int64_t bf16_pairs(int64_t K) { return (K + 31) / 32 * 16; }

// The GEMM's depth slice: W is packed and y accumulated one slice of K at a time. Every
// fp32 variant uses the same slices, so each y element is summed in the same order on every level.
constexpr int kKC = 256;

// The order in which a column block's micro-tiles run (BLIS): bands of RowBand rows of x (a band's packed
// rows stay in L2), in each band every panel of NR columns (from column n0), in each panel the band's
// tiles of MR rows. f(j, n, ncols, t, rows): panel j at column n (ncols of its NR valid), rows t ..
// t + rows. Every GEMM variant sweeps its tiles this way (linear*.cpp).
template <int MR, int NR, int64_t RowBand, class F>
inline void for_each_tile(int64_t T, int64_t N, int64_t n0, int64_t panels, const F& f) {
  for (int64_t band = 0; band < T; band += RowBand) {
    const int64_t band_end = std::min(T, band + RowBand);
    for (int64_t j = 0; j < panels; ++j) {
      const int64_t n = n0 + j * NR;
      const int ncols = int(std::min<int64_t>(NR, N - n));
      for (int64_t t = band; t < band_end; t += MR) f(j, n, ncols, t, int(std::min<int64_t>(MR, T - t)));
    }
  }
}

inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Columns [n0, n0 + NR) of W^T, rows [k0, k0 + kc), as fp32 [kc][NR] (columns past N are zero),
// NR a multiple of 8.
template <class W, int NR>
void pack_panel(const Problem<W>& g, int64_t n0, int64_t k0, int64_t kc, float* dst) {
  const typename W::Elem* row[NR];
  float s[NR];
  const int64_t valid = std::min<int64_t>(NR, g.N - n0);
  for (int r = 0; r < NR; ++r) {
    row[r] = r < valid ? g.w + (n0 + r) * g.K + k0 : nullptr;
    s[r] = r < valid && g.scale ? g.scale[n0 + r] : 1.0f;
  }
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8) {
    for (int half = 0; half < NR / 8; ++half) {
      __m256 v[8];
      for (int r = 0; r < 8; ++r) {
        const int rr = half * 8 + r;
        if (!row[rr]) v[r] = _mm256_setzero_ps();
        else if (g.scale) v[r] = _mm256_mul_ps(W::load8(row[rr] + k), _mm256_set1_ps(s[rr]));
        else v[r] = W::load8(row[rr] + k);
      }
      transpose8(v);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (k + j) * NR + half * 8, v[j]);
    }
  }
  for (; k < kc; ++k)
    for (int r = 0; r < NR; ++r) dst[k * NR + r] = row[r] ? W::one(row[r] + k) * s[r] : 0.0f;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

// r[i] = row i of a 16 x 16 block of 32-bit values -> r[j] = column j (unpack, shuffle, two lane
// shuffles: 64 register moves for 256 values, which the scalar copy took one load and store each).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

#pragma GCC pop_options

// linear_avx512.cpp, called only where isa() allows: the GEMM on AVX-512F (every weight format,
// bit-identical to the avx2 GEMM) and on AVX512_BF16 (bf16 weights; activations rounded to bf16).
template <class W>
void gemm_avx512(const Problem<W>& g, int threads);
void gemm_bf16_avx512(const Problem<BF16>& g, int threads);
// The streaming kernels (a few rows of x) for fp16 or bf16 weights widened to fp32 on 16 lanes (any
// avx512 level; bf16 weights take it below avx512_bf16, or with a scale).
template <class W>
void stream_avx512(const Problem<W>& p, int threads);
// The streaming kernels (a few rows of x) for bf16 weights on vdpbf16ps, x rounded to bf16 like the
// GEMM's: each row's result is the same alone or batched.
void stream_bf16_avx512(const Problem<BF16>& p, int threads);
// What the AMX GEMM (linear_amx.cpp) takes from the bf16 GEMM: one row of x [K] as Q bf16 pairs (Q a
// multiple of 16, zero past K), rounded as every bf16 product rounds x; and W's columns
// [n0, n0 + 32), pairs [q0, q0 + qc), as a panel [qc][32] of (k, k + 1) pairs (zero past N and K).
void round_pairs(const float* x, int64_t K, int64_t Q, uint32_t* out);
void pack_pairs_panel(const Problem<BF16>& g, int64_t n0, int64_t q0, int64_t qc, uint32_t* dst);

// linear_vnni.cpp, called only at avx512_vnni and above: int8 weights (with their per-row scale)
// against x quantized to int8 per row, on vpdpbusd; the streaming kernels (a few rows) and the GEMM.
void stream_i8_vnni(const Problem<I8>& p, int threads);
void gemm_i8_vnni(const Problem<I8>& p, int threads);

// x quantized (linear_vnni.cpp's header says how): [rows][Kp] s8 (Kp = K rounded up to 64, zero past K
// and in the rows past T), each of the T rows' scale and 128 * its sum.
struct QuantX {
  std::unique_ptr<int8_t[]> q;
  std::unique_ptr<float[]> scale;
  std::unique_ptr<int32_t[]> offset;  // 128 * sum(q[t])
  int64_t Kp = 0;
};
// What the AMX GEMM takes from the vnni one: x quantized (rows >= T rows allocated, the extra ones zero).
QuantX quantize(const Problem<I8>& p, int threads, int64_t rows);

#if GRANITE_HAVE_AMX  // (isa.h: the compiler knows AMX)
// linear_amx.cpp, called only at amx: the prefill GEMM for int8 weights (bit-identical to
// gemm_i8_vnni) and for bf16 weights without a scale (x rounded as gemm_bf16_avx512 rounds it).
void gemm_i8_amx(const Problem<I8>& p, int threads);
void gemm_bf16_amx(const Problem<BF16>& p, int threads);
// linear_amx_stream.cpp, called only at amx: the streaming kernels (a few rows of x) on tile matmuls,
// y^T = W x^T: int8 bit-identical to stream_i8_vnni; bf16 (no scale) to gemm_bf16_amx, row by row.
void stream_i8_amx(const Problem<I8>& p, int threads);
void stream_bf16_amx(const Problem<BF16>& p, int threads);

// ldtilecfg's 64-byte operand (palette 1): each tile's rows and bytes per row (tiles not set: unused).
// load() is ldtilecfg with the whole configuration as its operand: GCC's _tile_loadconfig names only
// its first 8 bytes to the compiler, which may then leave the rest of a configuration built just before
// it unwritten (the crash upstream llama.cpp's PR #26954 traces to a tile configuration on the stack).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig& tile(int i, int n_rows, int64_t row_bytes) {
    rows[i] = uint8_t(n_rows);
    colsb[i] = uint16_t(row_bytes);
    return *this;
  }
  void load() const { __asm__ volatile("ldtilecfg %0" : : "m"(*this)); }
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// GCC's _tile_loadd gives its asm the address alone (no memory operand, no clobber): the stores that
// fill a buffer just before (a packed panel, a zero-padded tail) could legally sink past the tile load
// that reads it. This compiler barrier (no instruction) keeps them before it.
inline void tile_operands_written() { __asm__ volatile("" : : : "memory"); }
#endif

}  // namespace granite
