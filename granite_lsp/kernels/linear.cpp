// y[T, N] = x[T, K] @ W[N, K]^T (* scale[N]) (+ bias[N]) with W in fp32, bf16, fp16 or int8, on AVX2.
//
// Two kernels. For a few rows of x (decode, small edits), where every weight is read once per
// token, streaming kernels read W from memory at full bandwidth: x (a few KB) stays in L1 and
// registers, each 8-wide slice of W is widened to fp32 in registers and multiplied against up to
// 8 rows of x, and the rows of W are shared between threads in chunks handed out on demand. For
// many rows (prefill), where the product is compute-bound, the blocked GEMM further down.
#include "linear.h"

#include "isa.h"
#include "ops.h"

namespace granite {
namespace {

// y[t, n + r * stride] for T rows of x (t < T <= 8) and R rows of W (r < R). One accumulator per
// (t, r) pair: with T * R >= 4 independent FMA chains the loop waits on loads, never on FMA
// latency. Each y element is summed in the same order whatever T is, so a row of x gets the
// bit-identical result alone (decode) or batched (prefill).
template <class W, int T, int R>
inline void rows(const Problem<W>& p, const float* x, float* y, int64_t n, int64_t stride) {
  const int64_t K = p.K;
  const typename W::Elem* w[R];
  for (int r = 0; r < R; ++r) w[r] = p.w + (n + r * stride) * K;
  __m256 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + t * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = W::load8(w[r] + k);
      for (int t = 0; t < T; ++t) acc[t][r] = _mm256_fmadd_ps(xv[t], wv, acc[t][r]);
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[t][r]);
      for (int64_t j = k; j < K; ++j) s += x[t * K + j] * W::one(w[r] + j);  // K % 8 tail
      const int64_t row = n + r * stride;
      if (p.scale) s *= p.scale[row];
      if (p.bias) s += p.bias[row];
      y[t * p.N + row] = s;
    }
  }
}

// W rows [begin, end) against T rows of x. The rows are cut into R equal runs read side by side,
// each front to back: R long sequential streams keep more memory requests in flight than one
// (single-threaded here: ~6.5 GB/s from one stream, ~11 from eight), and long streams let the
// hardware prefetcher lock on, which R adjacent rows (R streams one row long, 768 bytes for an
// int8 row) do not.
template <class W, int T, int R>
void row_range(const Problem<W>& p, const float* x, float* y, int64_t begin, int64_t end) {
  const int64_t run = (end - begin) / R;
  for (int64_t i = 0; i < run; ++i) rows<W, T, R>(p, x, y, begin + i, run);
  for (int64_t n = begin + R * run; n < end; ++n) rows<W, T, 1>(p, x, y, n, 0);
}

// Rows of W per block, by rows of x: enough accumulators to hide FMA latency and enough streams
// to keep memory busy, few enough to leave registers for x and W next to the T * R accumulators.
template <class W>
void row_range(const Problem<W>& p, int64_t t0, int64_t begin, int64_t end) {
  const float* x = p.x + t0 * p.K;
  float* y = p.y + t0 * p.N;
  switch (std::min<int64_t>(p.T - t0, 8)) {
    case 1: return row_range<W, 1, 8>(p, x, y, begin, end);
    case 2: return row_range<W, 2, 6>(p, x, y, begin, end);
    case 3: return row_range<W, 3, 4>(p, x, y, begin, end);
    case 4: return row_range<W, 4, 3>(p, x, y, begin, end);
    case 5: return row_range<W, 5, 2>(p, x, y, begin, end);
    case 6: return row_range<W, 6, 2>(p, x, y, begin, end);
    case 7: return row_range<W, 7, 1>(p, x, y, begin, end);
    default: return row_range<W, 8, 1>(p, x, y, begin, end);
  }
}

// One chunk of W rows against all of x, 8 rows of x at a time: the chunk is read from memory
// once and from cache for the other groups of 8.
template <class W>
void chunk(const void* problem, int64_t c) {
  const auto& p = *static_cast<const Problem<W>*>(problem);
  const int64_t begin = c * p.block, end = std::min(p.N, begin + p.block);
  for (int64_t t0 = 0; t0 < p.T; t0 += 8) row_range(p, t0, begin, end);
}

// ---------------------------------------------------------------------------------------------

// Chunks of W rows as streaming_block (linear.h) sizes them.
template <class W>
void run(Problem<W> p, int threads) {
  p.block = streaming_block(p.K * int64_t(sizeof(typename W::Elem)), p.N, threads);
  const int64_t n_chunks = (p.N + p.block - 1) / p.block;
  pool().run(&chunk<W>, &p, n_chunks, threads - 1);
}

// ---------------------------------------------------------------------------------------------
// Prefill: a blocked GEMM for many rows of x, where the product is compute-bound. With no
// native bf16/fp16/int8 arithmetic in AVX2, MKL needed fp32 copies of those weights first, made
// a block at a time (the copies cost as much as the product for 512 rows). Here W, in whatever
// format it is stored, is widened (and for int8 scaled) while it is packed into 16-column panels
// [k][16] of fp32, a KC x NB block at a time that stays in L2; x is packed in 6-row tiles; a
// 6 x 16 register tile of y (12 accumulators) then takes one broadcast of x per row and two FMAs
// per k, BLIS's loop order. On the Zen 3 this was tuned on, the micro-kernel runs at ~98% of the
// FMA peak from L1 and the whole GEMM at ~70-85% of it on one core (MKL's sgemm: 55-85%).

constexpr int kMR = 6, kNR = 16;

// y[t0 .. t0 + rows, n0 .. n0 + cols) (rows <= 6, cols <= 16) = or += a @ b, with a the tile's
// packed rows of x ([kc][6]) and b a packed panel of W^T ([kc][16]). The twelve accumulators are
// named variables: as an array, GCC keeps them in memory.
inline void micro_tile(const float* a, const float* b, int64_t kc, float* y, int64_t ldy, int rows, int cols,
                       bool accumulate, const float* bias) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k, a += kMR, b += kNR) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 av;
#define GRANITE_ROW_FMA(i)                    \
  av = _mm256_broadcast_ss(a + i);            \
  c##i##0 = _mm256_fmadd_ps(av, b0, c##i##0); \
  c##i##1 = _mm256_fmadd_ps(av, b1, c##i##1);
    GRANITE_ROW_FMA(0)
    GRANITE_ROW_FMA(1)
    GRANITE_ROW_FMA(2)
    GRANITE_ROW_FMA(3)
    GRANITE_ROW_FMA(4)
    GRANITE_ROW_FMA(5)
#undef GRANITE_ROW_FMA
  }
  alignas(32) float tile[kMR][kNR];
#define GRANITE_ROW_OUT(i)           \
  _mm256_store_ps(tile[i], c##i##0); \
  _mm256_store_ps(tile[i] + 8, c##i##1);
  GRANITE_ROW_OUT(0)
  GRANITE_ROW_OUT(1)
  GRANITE_ROW_OUT(2)
  GRANITE_ROW_OUT(3)
  GRANITE_ROW_OUT(4)
  GRANITE_ROW_OUT(5)
#undef GRANITE_ROW_OUT
  for (int i = 0; i < rows; ++i) {
    float* yr = y + i * ldy;
    if (cols == kNR) {
      __m256 lo = _mm256_load_ps(tile[i]), hi = _mm256_load_ps(tile[i] + 8);
      if (accumulate) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(yr));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(yr + 8));
      } else if (bias) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + 8));
      }
      _mm256_storeu_ps(yr, lo);
      _mm256_storeu_ps(yr + 8, hi);
    } else {
      for (int j = 0; j < cols; ++j) yr[j] = accumulate ? yr[j] + tile[i][j] : tile[i][j] + (bias ? bias[j] : 0.0f);
    }
  }
}

// x [T, K] as row tiles [ceil(T / 6)][K][6] (a short last tile repeats its last row), so that the
// micro-kernel reads its six rows from one contiguous stream.
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

// One block of `block` columns of y, all rows. For each KC slice of K: pack the block's panels
// of W (fp32, ~128 KB: L2), then for each panel (16 KB: it stays in L1) sweep a band of row tiles
// (kRowBand rows of packed x, ~96 KB: L2), BLIS's loop order.
constexpr int64_t kRowBand = 96;
constexpr int64_t kMaxBlockCols = 8 * kNR;

template <class W>
void gemm_block(const void* problem, int64_t c) {
  const auto& g = *static_cast<const Problem<W>*>(problem);
  const int64_t n0 = c * g.block, cols = std::min(g.block, g.N - n0);
  const int64_t panels = (cols + kNR - 1) / kNR;
  // On the stack (128 KB; nothing to allocate, so nothing can throw inside a pool task), 64-byte
  // aligned: a panel row is one cache line, and a 32-byte load across two costs double.
  alignas(64) float packed[kMaxBlockCols * kKC];
  for (int64_t k0 = 0; k0 < g.K; k0 += kKC) {
    const int64_t kc = std::min<int64_t>(kKC, g.K - k0);
    for (int64_t j = 0; j < panels; ++j) pack_panel<W, kNR>(g, n0 + j * kNR, k0, kc, packed + j * kNR * kc);
    for_each_tile<kMR, kNR, kRowBand>(g.T, g.N, n0, panels, [&](int64_t j, int64_t n, int ncols, int64_t t, int rows) {
      const float* a = g.xp + (t / kMR) * g.K * kMR + k0 * kMR;
      micro_tile(a, packed + j * kNR * kc, kc, g.y + t * g.N + n, g.N, rows, ncols, k0 > 0,
                 g.bias ? g.bias + n : nullptr);
    });
  }
}

// Blocks of 16-128 columns, at least ~4 per thread so that a preempted thread holds up little.
template <class W>
void run_gemm(Problem<W> g, int threads) {
  const int64_t tiles = (g.T + kMR - 1) / kMR;
  const auto xp = scratch(size_t(tiles * g.K * kMR));
  PackX px{g.x, xp.get(), g.T, g.K};
  pool().run(&pack_x_tile, &px, tiles, threads - 1);
  g.xp = xp.get();
  g.block = gemm_block_cols(g.N, threads, kNR, kMaxBlockCols);
  const int64_t blocks = (g.N + g.block - 1) / g.block;
  pool().run(&gemm_block<W>, &g, blocks, threads - 1);
}

template <class W>
void product(bool blocked, const float* x, const typename W::Elem* w, const float* s, const float* b, float* y,
             int64_t T, int64_t K, int64_t N, int threads) {
  const Problem<W> p{x, w, s, b, y, T, K, N};
  // the kernels of the level in use (isa.h); the avx2 ones here are the floor
  const Isa level = isa();
  if constexpr (std::is_same_v<W, BF16>) {
#if GRANITE_HAVE_AMX
    if (level >= Isa::kAmx && !s) return blocked ? gemm_bf16_amx(p, threads) : stream_bf16_amx(p, threads);
#endif
    if (level >= Isa::kAvx512Bf16 && !s) return blocked ? gemm_bf16_avx512(p, threads) : stream_bf16_avx512(p, threads);
  }
  if constexpr (std::is_same_v<W, BF16> || std::is_same_v<W, F16>) {
    if (level >= Isa::kAvx512 && !blocked) return stream_avx512(p, threads);
  }
  if constexpr (std::is_same_v<W, I8>) {
#if GRANITE_HAVE_AMX
    if (level >= Isa::kAmx) return blocked ? gemm_i8_amx(p, threads) : stream_i8_amx(p, threads);
#endif
    if (level >= Isa::kAvx512Vnni) return blocked ? gemm_i8_vnni(p, threads) : stream_i8_vnni(p, threads);
  }
  if (!blocked) return run(p, threads);
  if (level >= Isa::kAvx512) return gemm_avx512(p, threads);
  run_gemm(p, threads);
}

// blocked: the GEMM above (many rows of x) rather than the streaming kernels (a few rows).
at::Tensor linear_impl(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& bias, int64_t threads, bool blocked) {
  TORCH_CHECK(x.is_cpu() && w.is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [T, K]");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "w: contiguous [N, K]");
  const int64_t T = x.size(0), N = w.size(0), K = w.size(1);
  for (const auto* v : {&scale, &bias})
    TORCH_CHECK(!v->has_value() || ((*v)->is_cpu() && (*v)->scalar_type() == at::kFloat && (*v)->is_contiguous() &&
                                    (*v)->numel() == N),
                "scale/bias: contiguous fp32 [N]");
  at::Tensor y = at::empty({T, N}, x.options());
  if (N == 0 || T == 0) return y;
  if (K == 0) return bias ? y.copy_(bias->unsqueeze(0).expand({T, N})) : y.zero_();  // an empty sum
  const float* s = scale ? scale->data_ptr<float>() : nullptr;
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int n = thread_count(threads);
  const auto* w16 = reinterpret_cast<const uint16_t*>(w.data_ptr());
  switch (w.scalar_type()) {
    case at::kFloat: product<F32>(blocked, xp, w.data_ptr<float>(), s, b, yp, T, K, N, n); break;
    case at::kBFloat16: product<BF16>(blocked, xp, w16, s, b, yp, T, K, N, n); break;
    case at::kHalf: product<F16>(blocked, xp, w16, s, b, yp, T, K, N, n); break;
    case at::kChar:
      TORCH_CHECK(s, "int8 weights need a scale");
      product<I8>(blocked, xp, w.data_ptr<int8_t>(), s, b, yp, T, K, N, n);
      break;
    default: TORCH_CHECK(false, "w: float32, bfloat16, float16 or int8");
  }
  return y;
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias, int64_t threads) {
  return linear_impl(x, w, scale, bias, threads, false);
}

at::Tensor gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& bias, int64_t threads) {
  return linear_impl(x, w, scale, bias, threads, true);
}

// A plain streaming read of `buf` on the same threads, in 256 KB chunks read as 8 side-by-side
// runs like the kernels: the ceiling that bench.py compares them with in the same process.
double read_probe(const at::Tensor& buf, int64_t threads) {
  constexpr int64_t kChunk = 1 << 16, kRun = kChunk / 8;  // floats
  TORCH_CHECK(buf.is_cpu() && buf.is_contiguous() && buf.nbytes() % (kChunk * 4) == 0,
              "buf: contiguous CPU tensor, a multiple of 256 KB");
  std::vector<float> sums(buf.nbytes() / (kChunk * 4));
  struct Ctx {
    const float* p;
    float* sums;
  } ctx{static_cast<const float*>(buf.data_ptr()), sums.data()};
  auto body = [](const void* c, int64_t i) {
    const auto& ctx = *static_cast<const Ctx*>(c);
    const float* p = ctx.p + i * kChunk;
    __m256 acc[8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t j = 0; j < kRun; j += 8)
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_add_ps(acc[r], _mm256_loadu_ps(p + r * kRun + j));
    for (int r = 1; r < 8; ++r) acc[0] = _mm256_add_ps(acc[0], acc[r]);
    ctx.sums[i] = hsum(acc[0]);
  };
  pool().run(body, &ctx, int64_t(sums.size()), thread_count(threads) - 1);
  double total = 0;
  for (float v : sums) total += v;
  return total;
}

}  // namespace granite
