// The streaming products (1 <= T <= kMaxStreamRows rows of x: a decode step, a verify) for int8 and bf16
// weights on AMX's tile matmuls, for CPUs at level amx (isa.h), compiled for these functions only
// (`#pragma GCC target`). Computed as y^T = W x^T:
//   - A tile: 16 rows of W as W stores them (64 bytes of depth per row, the row stride whatever the
//     rows' distance is): W is not packed, it is read from memory once per call, as by the vector
//     streaming kernels;
//   - B tile: x's T rows as columns, 16 words of depth (bf16 pairs / s8 quads) x T, from x laid out
//     [words][T] once per call (a few KB: L1);
//   - C tile: 16 rows of W x T rows of x, fp32 (bf16) or int32 (int8).
// One TDPBF16PS / TDPBSSD per 64 bytes of 16 rows of W, whatever T is: the extra rows of a verify cost
// the tile unit nothing it does not spend on one row, where vdpbf16ps / vpdpbusd take one instruction
// per row of x.
//
// The same arithmetic for every T (each C element's sum depends only on its row of W and column of x),
// so a row's result is bit-identical alone or batched, and:
//   - int8: TDPBSSD on the q of linear_vnni.cpp's quantize (s8 x s8), the exact int32 sum of q * w over
//     all of K like vpdpbusd's, and the same epilogue fma(float(sum) * sx, sw, bias): bit-identical to
//     avx512_vnni's streaming kernels, and to the GEMMs (vnni's and amx's) where K fits one depth slice
//     (K <= 1024; past it those add the slices in fp32).
//   - bf16: x rounded by round_pairs (the same bits as every bf16 product), the products summed by the
//     tile unit per depth slice of 256 pairs (K 512) from zero, zero-padded to whole 64-byte steps, each
//     slice's sum added into y in fp32 in order, the first one with the bias: the same operations per
//     element as linear_amx.cpp's prefill GEMM (TDPBF16PS with the operands' roles swapped: per element
//     the same products, bf16 x bf16 exact in fp32, in the same k order), so a row gets the same bits
//     from the streaming kernel and the GEMM (tests/test_kernels.py checks both). Against avx512_bf16
//     (vdpbf16ps, 16 lanes) only the summation order differs.
//
// W's rows of a pool task (a chunk as streaming_block sizes it, rounded down to a multiple of 16) are
// read as 16 runs side by side: tile row i is row begin + i * run + j for j = 0, 1, ..., so each tile
// row walks its own run front to back, a long sequential stream (16 adjacent rows would be 16 streams
// one row long), as linear.cpp's row_range does, each prefetched kAhead bytes ahead. N's last < 16 rows
// go under a second tile configuration (fewer rows); K's last partial 64 bytes through a zero-padded
// copy of the rows' tails (x is zero there too: the same zero-padded steps as the GEMM's).
//
// Tile state is per thread: each pool task loads its configuration (ldtilecfg) before its first tile
// instruction and releases the tiles (tilerelease) when done, as linear_amx.cpp does.
//
// Measured on an Intel Xeon (Granite Rapids class, KVM, 2 vCPUs of one core, shared: load ~2-4), against
// avx512_bf16's vector streaming kernels (vdpbf16ps / vpdpbusd), alternating rounds in one process:
//   - one product, 2 threads, wall time, medians of 5, new / old, the five real shapes (768x3376,
//     1536x768, 768x4096, 2048x768, lm_head 768x100352): bf16 T = 1 0.88-0.94x, T = 2 0.85-0.92x, T = 5
//     0.66-0.81x, T = 9 0.49-0.54x, T = 16 0.36-0.44x; int8 T = 1 0.94-1.04x, T = 2 0.86-0.97x, T = 5
//     0.73-0.92x, T = 9 0.66-0.79x, T = 16 0.59-0.72x. The tile unit's work does not grow with T, but the
//     rate W is read at falls by ~20-35% from T = 1 to 16 (not the y stores: staged into whole lines, no
//     change; nor the C tile's dependency chain: int8 on two alternating C tiles, no change).
//   - bench/decode_profile.py (a decode step, T = 1), 4 runs each, fraction of the read bandwidth, median:
//     bf16 at parity (in_proj 86% / 87% before, out_proj 82 / 79, mlp_in 89 / 89, mlp_out 83 / 81, lm_head
//     96 / 96); int8 within the runs' spread (82 / 85, 76 / 80, 87 / 81, 77 / 81, 95 / 92).
//   - bench/verify_cost.py: a rejected draft's cost per draft, bf16 k = 4 / 8 / 15: 4.9 / 4.5 / 4.6% of a
//     step (before 10.7 / 15.6 / 15.5%); int8 7.3 / 7.2 / 7.0% (11.5 / 11.7 / 11.9%).
#include <cstring>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "linear.h"

#if GRANITE_HAVE_AMX  // (isa.h: older compilers build the other levels; this file is then empty)
namespace granite {
namespace {

constexpr int kTileRows = 16;  // rows of W per A tile (and per C tile)
constexpr int64_t kStep = 16;  // 4-byte words of depth per tile step (64 bytes)

// Tiles: C 0 (w_rows x T words), A 2 (w_rows x 64 bytes), B 4 (16 words of depth x T words).
TileConfig group_tiles(int w_rows, int64_t T) {
  TileConfig config;
  return config.tile(0, w_rows, 4 * T).tile(2, w_rows, 64).tile(4, kTileRows, 4 * T);
}

// What a task reads: the problem, x's rows as columns ([kw][T] words, kw a multiple of 16, zero past
// K) and, for int8, the rows' quantization scales.
template <class W>
struct Stream {
  const Problem<W>* p;
  const uint32_t* xb;
  int64_t kw;
  const float* sx = nullptr;
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-int8,amx-bf16")

// How far ahead (bytes) each tile row's stream is prefetched: process CPU time, 1 thread, alternating
// rounds (load ~3-4 on the 2 cores), T = 1, medians of 7, against the same kernel without it: 0.92-0.95x
// (bf16, the five real shapes) and 0.88-1.02x (int8); 128, 384, 512 or 768 bytes ahead (L1), or 512-2048
// into L2, did no better, and two groups of 16 rows per step (32 streams: 1.02-1.13x) or 16 adjacent
// rows (with the next 16 prefetched: 1.2-1.3x) were slower.
constexpr int64_t kAhead = 256;

// `rows` (<= 16) rows of W against the T rows of x, one A tile: tile row i is W row n + i * stride.
// Their sums into C tile 0, per depth slice (bf16) or over all of K (int8), then into y.
template <class W>
struct Group {
  static constexpr bool kInt8 = std::is_same_v<W, I8>;

  const Stream<W>& s;
  int64_t n, stride;
  int rows;

  int64_t row(int i) const { return n + i * stride; }

  // Steps [s0, s1) of the depth (64 bytes of each row of W a step) added into C tile 0.
  void steps(int64_t s0, int64_t s1) const {
    const auto& p = *s.p;
    const int64_t T = p.T, row_bytes = p.K * int64_t(sizeof(typename W::Elem)), a_stride = stride * row_bytes;
    const auto* a = reinterpret_cast<const uint8_t*>(p.w + n * p.K);
    alignas(64) uint8_t tail[kTileRows][64];
    for (int64_t st = s0; st < s1; ++st) {
      const int64_t off = st * 64;
      for (int i = 0; i < rows; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(a + i * a_stride + off + kAhead), _MM_HINT_T0);
      _tile_loadd(4, s.xb + st * kStep * T, 4 * T);
      if (off + 64 <= row_bytes) {
        _tile_loadd(2, a + off, a_stride);
      } else {  // K's last partial 64 bytes, zero-padded like x
        const int64_t left = row_bytes - off;
        for (int i = 0; i < rows; ++i) {
          std::memcpy(tail[i], a + i * a_stride + off, size_t(left));
          std::memset(tail[i] + left, 0, size_t(64 - left));
        }
        tile_operands_written();
        _tile_loadd(2, tail, 64);
      }
      if constexpr (kInt8) _tile_dpbssd(0, 2, 4);
      else _tile_dpbf16ps(0, 2, 4);
    }
  }

  void run() const {
    const auto& p = *s.p;
    const int64_t T = p.T, total = s.kw / kStep;
    alignas(64) float acc[kTileRows][16];  // [row of W][row of x]
    alignas(64) uint32_t buf[kTileRows][16];
    if constexpr (kInt8) {
      _tile_zero(0);
      steps(0, total);
      _tile_stored(0, buf, 64);
      // linear_vnni.cpp's finish per element: fma(float(sum) * sx, sw, bias), or float(sum) * sx * sw
      const __m512 sx = _mm512_maskz_loadu_ps(__mmask16((1u << T) - 1), s.sx);
      for (int i = 0; i < rows; ++i) {
        const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(buf[i])), sx);
        const __m512 sw = _mm512_set1_ps(p.scale[row(i)]);
        _mm512_store_ps(acc[i], p.bias ? _mm512_fmadd_ps(v, sw, _mm512_set1_ps(p.bias[row(i)])) : _mm512_mul_ps(v, sw));
      }
    } else {
      constexpr int64_t slice_steps = kSliceWords / kStep;
      for (int64_t s0 = 0; s0 < total; s0 += slice_steps) {
        _tile_zero(0);
        steps(s0, std::min(total, s0 + slice_steps));
        _tile_stored(0, buf, 64);
        // linear_amx.cpp's finish_bf16 per element: the first slice's sum + bias (or the sum), then y + sum
        for (int i = 0; i < rows; ++i) {
          const __m512 v = _mm512_castsi512_ps(_mm512_load_si512(buf[i]));
          __m512 out;
          if (s0 > 0) out = _mm512_add_ps(_mm512_load_ps(acc[i]), v);
          else if (p.bias) out = _mm512_add_ps(v, _mm512_set1_ps(p.bias[row(i)]));
          else out = v;
          _mm512_store_ps(acc[i], out);
        }
      }
    }
    for (int i = 0; i < rows; ++i)
      for (int64_t t = 0; t < T; ++t) p.y[t * p.N + row(i)] = acc[i][t];
  }
};

// One chunk of W's rows (one pool task; a multiple of 16 rows but for the last): 16 runs side by side,
// then the last chunk's last < 16 rows under a second configuration.
template <class W>
void chunk(const void* ctx, int64_t c) {
  const auto& s = *static_cast<const Stream<W>*>(ctx);
  const auto& p = *s.p;
  const int64_t begin = c * p.block, end = std::min(p.N, begin + p.block);
  group_tiles(kTileRows, p.T).load();
  const int64_t run = (end - begin) / kTileRows;
  for (int64_t j = 0; j < run; ++j) Group<W>{s, begin + j, run, kTileRows}.run();
  int64_t n = begin + kTileRows * run;
  if (n < end) {
    group_tiles(int(end - n), p.T).load();
    Group<W>{s, n, 1, int(end - n)}.run();
  }
  _tile_release();
}

// x's T rows of `kw` words each ([T][kw]) as columns: [kw][T].
void columns(const uint32_t* rows, int64_t T, int64_t kw, uint32_t* out) {
  for (int64_t q = 0; q < kw; ++q)
    for (int64_t t = 0; t < T; ++t) out[q * T + t] = rows[t * kw + q];
}

#pragma GCC pop_options

template <class W>
void run_chunks(Problem<W> p, Stream<W> s, int threads) {
  const int64_t rows = streaming_block(p.K * int64_t(sizeof(typename W::Elem)), p.N, threads);
  p.block = std::max<int64_t>(kTileRows, rows / kTileRows * kTileRows);  // whole runs of 16
  s.p = &p;
  pool().run(&chunk<W>, &s, (p.N + p.block - 1) / p.block, threads - 1);
}

// More rows of x than a tile's 16 columns (linear() allows any count; the model's steps stay within
// kMaxStreamRows = 16): 16 at a time, each row's result the same as in any other call.
template <class W, class F>
void by_16_rows(const Problem<W>& p, const F& f) {
  for (int64_t t0 = 0; t0 < p.T; t0 += kTileRows) {
    Problem<W> part = p;
    part.x = p.x + t0 * p.K;
    part.y = p.y + t0 * p.N;
    part.T = std::min<int64_t>(kTileRows, p.T - t0);
    f(part);
  }
}

void stream_bf16(const Problem<BF16>& p, int threads) {
  const int64_t Q = bf16_pairs(p.K);
  // The caller's buffers, kept between calls (a decode step makes ~130 of these products); the pool's
  // tasks only read them while this call waits for them.
  thread_local std::vector<uint32_t> rows, xb;
  if (rows.size() < size_t(p.T * Q)) {
    rows.resize(size_t(p.T * Q));
    xb.resize(size_t(p.T * Q));
  }
  for (int64_t t = 0; t < p.T; ++t) round_pairs(p.x + t * p.K, p.K, Q, rows.data() + t * Q);
  columns(rows.data(), p.T, Q, xb.data());
  run_chunks(p, Stream<BF16>{&p, xb.data(), Q}, threads);
}

void stream_i8(const Problem<I8>& p, int threads) {
  const QuantX qx = quantize(p, threads, p.T);
  const int64_t kw = qx.Kp / 4;
  thread_local std::vector<uint32_t> xb;
  if (xb.size() < size_t(p.T * kw)) xb.resize(size_t(p.T * kw));
  columns(reinterpret_cast<const uint32_t*>(qx.q.get()), p.T, kw, xb.data());
  run_chunks(p, Stream<I8>{&p, xb.data(), kw, qx.scale.get()}, threads);
}

}  // namespace

void stream_bf16_amx(const Problem<BF16>& p, int threads) {
  by_16_rows(p, [&](const Problem<BF16>& part) { stream_bf16(part, threads); });
}

void stream_i8_amx(const Problem<I8>& p, int threads) {
  by_16_rows(p, [&](const Problem<I8>& part) { stream_i8(part, threads); });
}

}  // namespace granite
#endif  // GRANITE_HAVE_AMX
