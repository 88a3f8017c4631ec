// The prefill GEMM (more rows of x than the streaming kernels take) for int8 and bf16 weights on AMX's
// tile matmuls, for CPUs at level amx (isa.h), compiled for these functions only (`#pragma GCC target`).
//
// A tile register holds up to 16 rows of 64 bytes; one TDPBSSD (int8) or TDPBF16PS (bf16) multiplies
// a 16 x 64-byte tile of x by a 16 x 64-byte tile of W's (k-quads or k-pairs) x 16 columns and adds
// the 16 x 16 products into an int32 / fp32 tile: 16 * 16 * 64 int8 products per instruction (the
// vpdpbusd: 64), 16 * 16 * 32 for bf16 (vdpbf16ps: 32). Per 64 bytes of depth a 32 x 32 block of y
// takes two tiles of x (rows t..t+15, t+16..t+31), two of W (columns n..n+15, n+16..n+31) and four
// products into four accumulator tiles: all eight tile registers.
//
// The operands, built per call (W too: nothing is cached between calls):
//   - x: int8 from linear_vnni.cpp's quantization ([T][Kp] s8, the same q and per-row scale), bf16
//     from linear_avx512.cpp's round_pairs ([T][Q] bf16 pairs, the same bits); the rows padded with
//     zeros to a multiple of 32 (products never stored) and rearranged into tiles (to_tiles:
//     [rows / 32][step][32][16 words], each step's two x tiles 2 KB in a row). Loading the tiles
//     straight from x's rows (a 768-1536-byte stride) was slower: in one process, alternating, 10
//     rounds, 512 rows, CPU time of one thread, the medians were int8 3376x768 1.86 ms tiled vs 2.35
//     rows, 4096x768 2.25 vs 3.32, bf16 3376x768 3.08 vs 4.13 (768x2048: 1.18 vs 1.17, 2.26 vs 2.47).
//   - W: a W tile's rows are k-quads (k-pairs), each 16 columns of 4 bytes: a 16-column half of a
//     panel [q][32] (128 bytes a row), loaded with that stride. bf16 takes linear_avx512.cpp's
//     pack_pairs_panel; int8 its own pack_quads (vnni's quads without the column sums, through
//     transpose16: vnni's scalar pack_panel_i8 was 18% of this GEMM's time), zero-padded to whole steps.
//   - int8 takes TDPBSSD (s8 x s8) on q itself rather than vpdpbusd's u8 = q + 128 and the subtracted
//     128 * sum(w): both give the exact sum of q * w in int32, so the offset's work is not needed.
//
// Depth slices as the avx512 GEMMs': 256 words (quads: K 1024; pairs: K 512) a slice, the first
// slice's sums finished with the bias, later ones added onto y in fp32 in order, so each element's
// result is the same whatever the threads and the blocks.
//   - int8: the same int32 sums, the same epilogue (fma(float(sum) * sx, sw, bias or y)): every
//     result is bit-identical to gemm_i8_vnni's (test_amx_int8_gemm_is_bit_identical_to_vnni).
//   - bf16: the same products of bf16-rounded x, summed in fp32 by the tile unit in its own order
//     and internal precision: not gemm_bf16_avx512's bits (max |diff| ~1e-5 on 512 x 3376 x 768),
//     and closer to the exact product of the rounded x than it (max error 2.5e-6..3.9e-6 against
//     6.5e-6..9.6e-6 on the shapes tried); within the avx512_bf16 level's tolerances
//     (test_amx_bf16_gemm_sums_the_same_rounded_products, test_bf16_products_round_activations_only).
//
// Tile state is per thread: each pool task loads the configuration (ldtilecfg) before its first
// tile instruction and releases the tiles (tilerelease) when done, so nothing is left configured on
// the caller's thread or a helper for whatever code runs there next.
//
// What bounds it. The tile loads do not come free: bench/isa_peaks.py's amx_bf16_loads (the 2 x 2
// block's four operand tiles loaded from L2 before each four products) ran at ~62% of its products-only
// loop amx_bf16 (2000 against 3120-3250 G ops/s, 1 thread, one run at load ~3). With the per-call
// rounding / quantization of x and packing of W's panels, and the epilogue, the GEMM runs at ~15-27% of
// the tile peak (int8 ~1.0-1.3 T ops/s of 6.5, bf16 ~0.55-0.9 T flop/s of 3.4). Splitting each slice
// into parts that fit L1 (partial sums through memory) and loading x with the streaming hint
// (tileloaddt1) gained nothing measurable. W's panels are packed again on every call (caching them
// would keep a second copy of the weights).
//
// Measured on an Intel Xeon (Granite Rapids class, KVM, 2 cores shared with other users, load ~2-4),
// process CPU time of one thread, levels alternating in one process (rounds of the same level
// differed by up to ~15% at these loads):
//   - bench/prefill_levels.py --reps 3 --ops (512 tokens, real shape, random weights, denormals
//     flushed), the `linear` line (every product of the prefill), median (range): int8 avx512_vnni
//     860 ms (854-867), amx 258 ms (251-272): 3.3x; bf16 avx512_bf16 2566 ms (2540-2637), amx
//     442 ms (399-465): 5.8x. Whole prefill: int8 1172 -> 556 ms (2.1x), bf16 2898 -> 741 ms (3.9x).
//   - the GEMM alone, 512 rows, medians of 7: int8 3376x768 7.96 -> 2.68 ms, 768x2048 4.75 -> 1.29,
//     4096x768 9.05 -> 2.53, 768x1536 3.60 -> 1.05 (3.0-3.7x); bf16 27.1 -> 4.60, 15.7 -> 2.56,
//     32.6 -> 6.04, 11.8 -> 2.06 (5.4-6.1x).
#include <cstring>
#include <type_traits>

#include "isa.h"
#include "linear.h"

#if GRANITE_HAVE_AMX  // (isa.h: older compilers build the other levels; this file is then empty)
namespace granite {
namespace {

constexpr int kTileRows = 16;               // rows of x (and of y) per tile
constexpr int kMR = 2 * kTileRows;          // rows of y per block: two x tiles
constexpr int kNR = 32;                     // columns of y per block: two W tiles; the panels' width
constexpr int64_t kStep = 16;               // words (4 bytes: a quad or a pair) of depth per tile
constexpr int64_t kRowBand = 128;           // rows of x swept per panel (4 blocks; a slice of them: L2)
constexpr int64_t kMaxBlockCols = 4 * kNR;  // columns of y per task

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The tile configuration of a block: tiles 0-7 all 16 rows of 64 bytes.
TileConfig block_tiles() {
  TileConfig config;
  for (int i = 0; i < 8; ++i) config.tile(i, kTileRows, 64);
  return config;
}

// What both formats' tasks read: the problem (y, bias, N, T), x in tiles (to_tiles: 32 rows of xw
// 4-byte words each, [rows / 32][xw / 16][32][16]), the depth in words (kw) and, for int8, the
// quantized x's scales.
template <class W>
struct AmxProblem {
  const Problem<W>* g;
  const uint32_t* x;
  int64_t xw, kw;
  const float* sx = nullptr;  // int8: each row's scale
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-int8,amx-bf16")

// The 32 x 32 block's sums (buf [32][32], int32 or fp32) into y: rows x cols of it, as the avx512
// GEMMs' epilogues do it per element.
inline void finish_i8(const int32_t* buf, const float* sx, const float* sw, const float* bias, float* y, int64_t ldy,
                      int rows, int cols, bool accumulate) {
  for (int h = 0; h < kNR; h += 16) {
    const int left = cols - h;
    if (left <= 0) break;
    const __mmask16 m = __mmask16(left >= 16 ? 0xffff : (1u << left) - 1);
    const __m512 w = _mm512_maskz_loadu_ps(m, sw + h);
    const __m512 z = bias ? _mm512_maskz_loadu_ps(m, bias + h) : _mm512_setzero_ps();
    for (int i = 0; i < rows; ++i) {
      float* yr = y + i * ldy + h;
      // linear_vnni.cpp's micro_i8: fma(float(sum) * sx, sw, y (later slices) or bias), or the product
      const __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(buf + i * kNR + h)), _mm512_set1_ps(sx[i]));
      __m512 v;
      if (accumulate) v = _mm512_fmadd_ps(s, w, _mm512_maskz_loadu_ps(m, yr));
      else if (bias) v = _mm512_fmadd_ps(s, w, z);
      else v = _mm512_mul_ps(s, w);
      _mm512_mask_storeu_ps(yr, m, v);
    }
  }
}

inline void finish_bf16(const float* buf, const float* bias, float* y, int64_t ldy, int rows, int cols,
                        bool accumulate) {
  for (int h = 0; h < kNR; h += 16) {
    const int left = cols - h;
    if (left <= 0) break;
    const __mmask16 m = __mmask16(left >= 16 ? 0xffff : (1u << left) - 1);
    const __m512 z = bias ? _mm512_maskz_loadu_ps(m, bias + h) : _mm512_setzero_ps();
    for (int i = 0; i < rows; ++i) {
      float* yr = y + i * ldy + h;
      // linear_avx512.cpp's GRANITE_STORE: y + sum (later slices), sum + bias, or the sum
      __m512 v = _mm512_loadu_ps(buf + i * kNR + h);
      if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, yr), v);
      else if (bias) v = _mm512_add_ps(v, z);
      _mm512_mask_storeu_ps(yr, m, v);
    }
  }
}

// The 32 x 32 block of sums over `steps` tile steps: a = the block's x tiles at the slice's first
// step ([steps][32][16] words: the step's two x tiles, 1 KB each, one after the other), b = the
// panel ([steps * 16][32] words), into buf [32][32].
template <bool kInt8>
inline void block_sums(const uint32_t* a, const uint32_t* b, int64_t steps, void* buf) {
  constexpr int64_t sa = kStep * 4, sb = kNR * 4;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s, a += kMR * kStep, b += kStep * kNR) {
    _tile_loadd(4, a, sa);
    _tile_loadd(5, a + kTileRows * kStep, sa);
    _tile_loadd(6, b, sb);
    _tile_loadd(7, b + 16, sb);
    if constexpr (kInt8) {
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    } else {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  auto* c = static_cast<char*>(buf);
  _tile_stored(0, c, kNR * 4);
  _tile_stored(1, c + 64, kNR * 4);
  _tile_stored(2, c + kTileRows * kNR * 4, kNR * 4);
  _tile_stored(3, c + kTileRows * kNR * 4 + 64, kNR * 4);
}

// W's columns [n0, n0 + 32), quads [q0, q0 + qp), as a panel [qp][32] of s8 quads (zero past N and
// K): linear_vnni.cpp's panel without its column sums (TDPBSSD needs no offset), 16 rows x 16 quads
// at a time through transpose16 where the rows are whole (pack_pairs_panel's way), the rest quad by quad.
void pack_quads(const Problem<I8>& g, int64_t n0, int64_t q0, int64_t qp, uint32_t* dst) {
  const int64_t valid = std::min<int64_t>(kNR, g.N - n0), k0 = 4 * q0;
  const int64_t whole = std::clamp<int64_t>((g.K - k0) / 4, 0, qp);  // quads wholly inside K
  int64_t done = 0;
  if (valid == kNR) {
    for (; done + 16 <= whole; done += 16)
      for (int r0 = 0; r0 < kNR; r0 += 16) {
        __m512 v[16];
        for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_ps(g.w + (n0 + r0 + i) * g.K + k0 + 4 * done);
        transpose16(v);
        for (int j = 0; j < 16; ++j) _mm512_storeu_ps(reinterpret_cast<float*>(dst + (done + j) * kNR + r0), v[j]);
      }
  }
  for (int r = 0; r < kNR; ++r) {
    const int8_t* row = r < valid ? g.w + (n0 + r) * g.K : nullptr;
    for (int64_t q = done; q < qp; ++q) {
      int8_t b[4] = {0, 0, 0, 0};
      for (int i = 0; i < 4 && row && k0 + 4 * q + i < g.K; ++i) b[i] = row[k0 + 4 * q + i];
      std::memcpy(&dst[q * kNR + r], b, sizeof b);
    }
  }
}

// One block of columns of y, all rows (one pool task): for each depth slice, W's panels packed
// (~128 KB: L2), then per band of rows each panel (<= 32 KB: L1) against the band's 32-row blocks.
template <class W>
void block(const void* problem, int64_t c) {
  constexpr bool kInt8 = std::is_same_v<W, I8>;
  const auto& pp = *static_cast<const AmxProblem<W>*>(problem);
  const auto& g = *pp.g;
  const int64_t n0 = c * g.block, cols = std::min(g.block, g.N - n0);
  const int64_t panels = (cols + kNR - 1) / kNR;
  alignas(64) uint32_t packed[kMaxBlockCols * kSliceWords];  // 128 KB on the stack: nothing to allocate
  alignas(64) uint32_t sums[kMR * kNR];                      // a block's int32 or fp32 sums
  const TileConfig config = block_tiles();
  config.load();
  for (int64_t q0 = 0; q0 < pp.kw; q0 += kSliceWords) {
    const int64_t qc = std::min<int64_t>(kSliceWords, pp.kw - q0), steps = (qc + kStep - 1) / kStep;
    const int64_t qp = steps * kStep;  // words per panel row block, zero-padded
    for (int64_t j = 0; j < panels; ++j) {
      uint32_t* dst = packed + j * kNR * qp;
      if constexpr (kInt8) {
        pack_quads(g, n0 + j * kNR, q0, qp, dst);
      } else {
        pack_pairs_panel(g, n0 + j * kNR, q0, qc, dst);
        std::memset(dst + qc * kNR, 0, size_t((qp - qc) * kNR) * sizeof(uint32_t));
      }
    }
    tile_operands_written();
    for_each_tile<kMR, kNR, kRowBand>(g.T, g.N, n0, panels, [&](int64_t j, int64_t n, int ncols, int64_t t, int rows) {
      block_sums<kInt8>(pp.x + t * pp.xw + q0 * kMR, packed + j * kNR * qp, steps, sums);
      float* y = g.y + t * g.N + n;
      const float* bias = g.bias ? g.bias + n : nullptr;
      if constexpr (kInt8)
        finish_i8(reinterpret_cast<const int32_t*>(sums), pp.sx + t, g.scale + n, bias, y, g.N, rows, ncols, q0 > 0);
      else finish_bf16(reinterpret_cast<const float*>(sums), bias, y, g.N, rows, ncols, q0 > 0);
    });
  }
  _tile_release();
}

// x's rows ([rows][xw] words, rows a multiple of 32, xw of 16) into tiles [rows / 32][xw / 16][32][16]:
// each tile step's two x tiles are 2 KB in a row, which the next step follows (the hardware
// prefetchers keep up; strided rows straight from x's rows left the tile unit waiting on L2).
struct ToTiles {
  const uint32_t* x;
  uint32_t* tiles;
  int64_t xw;
};

void to_tiles(const void* ctx, int64_t p) {
  const auto& c = *static_cast<const ToTiles*>(ctx);
  const uint32_t* src = c.x + p * kMR * c.xw;
  uint32_t* dst = c.tiles + p * kMR * c.xw;
  for (int64_t s = 0; s < c.xw; s += kStep)
    for (int r = 0; r < kMR; ++r, dst += kStep) _mm512_storeu_si512(dst, _mm512_loadu_si512(src + r * c.xw + s));
}

#pragma GCC pop_options

// x's rows as tiles (on the pool: ~0.4-0.8 MB for a prefill's 512 rows).
std::unique_ptr<uint32_t[]> tiles_of(const uint32_t* x, int64_t rows, int64_t xw, int threads) {
  std::unique_ptr<uint32_t[]> tiles(new uint32_t[size_t(rows * xw)]);
  const ToTiles task{x, tiles.get(), xw};
  pool().run(&to_tiles, &task, rows / kMR, rows >= 64 ? threads - 1 : 0);
  return tiles;
}

template <class W>
void run_blocks(Problem<W> g, AmxProblem<W> pp, int threads) {
  g.block = gemm_block_cols(g.N, threads, kNR, kMaxBlockCols);
  pp.g = &g;
  pool().run(&block<W>, &pp, (g.N + g.block - 1) / g.block, threads - 1);
}

}  // namespace

void gemm_i8_amx(const Problem<I8>& g, int threads) {
  const int64_t rows = round_up(g.T, kMR);
  const QuantX qx = quantize(g, threads, rows);
  const auto tiles = tiles_of(reinterpret_cast<const uint32_t*>(qx.q.get()), rows, qx.Kp / 4, threads);
  const AmxProblem<I8> pp{&g, tiles.get(), qx.Kp / 4, (g.K + 3) / 4, qx.scale.get()};
  run_blocks(g, pp, threads);
}

void gemm_bf16_amx(const Problem<BF16>& g, int threads) {
  const int64_t Q = bf16_pairs(g.K), rows = round_up(g.T, kMR);  // rows padded to whole tile rows
  std::unique_ptr<uint32_t[]> xq(new uint32_t[size_t(rows * Q)]);
  parallel_rows(g.T, 16, g.T >= 32 ? threads : 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) round_pairs(g.x + t * g.K, g.K, Q, xq.get() + t * Q);
  });
  std::memset(xq.get() + g.T * Q, 0, size_t((rows - g.T) * Q) * sizeof(uint32_t));
  const auto tiles = tiles_of(xq.get(), rows, Q, threads);
  const AmxProblem<BF16> pp{&g, tiles.get(), Q, (g.K + 1) / 2};
  run_blocks(g, pp, threads);
}

}  // namespace granite
#endif  // GRANITE_HAVE_AMX
