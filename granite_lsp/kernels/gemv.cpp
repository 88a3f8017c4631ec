// y[T, N] = x[T, K] @ W[N, K]^T (* scale[N]) (+ bias[N]) with W in fp32, bf16, fp16 or int8, on AVX2.
//
// Built for decoding, where T is 1 and every weight is read once per token: the kernels are about
// streaming W from memory at full bandwidth. x (a few KB) stays in L1 and registers, each 8-wide
// slice of W is widened to fp32 in registers and multiplied against up to 8 rows of x, and the
// rows of W are shared between threads in chunks handed out on demand. Larger T (prefill) runs
// in groups of 8 rows of x over each chunk while it sits in L2.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// Weight formats: `load8` widens 8 consecutive weights to fp32 lanes, `one` a single weight.

struct F32 {
  using Elem = float;
  static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
  static float one(const float* p) { return *p; }
};

struct BF16 {  // bf16 is the top half of an fp32: widening is a zero-extend and a shift
  using Elem = uint16_t;
  static __m256 load8(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static float one(const uint16_t* p) {
    const uint32_t bits = uint32_t(*p) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
};

struct F16 {  // IEEE half: F16C widens 8 at a time
  using Elem = uint16_t;
  static __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static float one(const uint16_t* p) { return _cvtsh_ss(*p); }
};

struct I8 {  // symmetric per-row quantization: the row's scale is applied once, to the sum
  using Elem = int8_t;
  static __m256 load8(const int8_t* p) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  }
  static float one(const int8_t* p) { return float(*p); }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <class W>
struct Problem {
  const float* x;             // [T, K]
  const typename W::Elem* w;  // [N, K]
  const float* scale;         // [N] or null
  const float* bias;          // [N] or null
  float* y;                   // [T, N]
  int64_t T, K, N, chunk_rows;
};

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
  const int64_t begin = c * p.chunk_rows, end = std::min(p.N, begin + p.chunk_rows);
  for (int64_t t0 = 0; t0 < p.T; t0 += 8) row_range(p, t0, begin, end);
}

// ---------------------------------------------------------------------------------------------
// Thread pool. The caller always works through the chunks itself and helpers join in when they
// are awake, so a job never waits for a thread that the OS has not scheduled (on a busy 2-core
// machine an OpenMP barrier does exactly that, for a whole time slice, every matmul). The
// caller waits only for chunks that a helper has already started.

class Pool {
 public:
  using Body = void (*)(const void*, int64_t);

  // Runs body(ctx, c) for c in [0, n) on the calling thread and up to `helpers` pool threads.
  void run(Body body, const void* ctx, int64_t n, int helpers) {
    helpers = int(std::clamp<int64_t>(std::min<int64_t>(helpers, n - 1), 0, kMaxThreads));
    std::unique_lock<std::mutex> lock(busy_, std::try_to_lock);  // one job at a time: if another
    if (helpers == 0 || !lock.owns_lock()) {                        // caller has it, work alone
      for (int64_t c = 0; c < n; ++c) body(ctx, c);
      return;
    }
    for (; started_ < helpers; ++started_) std::thread([this, i = started_] { serve(i); }).detach();
    body_ = body;
    ctx_ = ctx;
    helpers_.store(helpers, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    ticket_.store(uint64_t(n) << 32, std::memory_order_release);  // publishes body_ and ctx_
    epoch_.fetch_add(1, std::memory_order_release);
    epoch_.notify_all();
    int64_t mine = work();
    // A helper is still on its last chunk. If it was preempted, spinning here could keep it off
    // this very core, so after a short spin give the core away.
    for (int spins = 0; done_.load(std::memory_order_acquire) + mine < n; ++spins) {
      if (spins < 200) _mm_pause();
      else std::this_thread::yield();
    }
  }

 private:
  static constexpr int kMaxThreads = 63;
  static constexpr auto kSpin = std::chrono::microseconds(500);

  // Takes chunks until none are left; returns how many this thread ran. A ticket is
  // (n << 32 | next chunk): a chunk index below n belongs to the current job, whose body and
  // context stay valid until that chunk is done, so a late helper can never run a stale job.
  int64_t work() {
    int64_t ran = 0;
    for (;;) {
      const uint64_t t = ticket_.fetch_add(1, std::memory_order_acquire);
      const int64_t c = int64_t(t & 0xffffffff), n = int64_t(t >> 32);
      if (c >= n) return ran;
      body_(ctx_, c);
      ++ran;
    }
  }

  // Between jobs a helper polls for kSpin (decode issues a matmul every few tens of microseconds),
  // yielding the core to anything else that wants it, then sleeps until notified.
  void serve(int index) {
    uint32_t seen = epoch_.load(std::memory_order_acquire);
    for (;;) {
      const auto sleep_at = std::chrono::steady_clock::now() + kSpin;
      while (epoch_.load(std::memory_order_acquire) == seen) {
        if (std::chrono::steady_clock::now() < sleep_at) std::this_thread::yield();
        else epoch_.wait(seen, std::memory_order_acquire);
      }
      seen = epoch_.load(std::memory_order_acquire);
      if (index < helpers_.load(std::memory_order_relaxed)) {
        if (int64_t ran = work()) done_.fetch_add(ran, std::memory_order_release);
      }
    }
  }

  std::mutex busy_;
  int started_ = 0;  // helper threads, which live as long as the process
  std::atomic<uint32_t> epoch_{0};
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> helpers_{0};
  Body body_ = nullptr;
  const void* ctx_ = nullptr;
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: helper threads may still be sleeping at exit
  return *p;
}

// ---------------------------------------------------------------------------------------------

// Chunks of >= 32 KB of weights (the shared counter costs nothing at that size), at most 256 KB
// (they stay in L2 while the groups of x pass over them, and a chunk is what a preempted helper
// can hold up), and >= 4 per thread when W is small.
template <class W>
void run(Problem<W> p, int threads) {
  const int64_t row_bytes = p.K * int64_t(sizeof(typename W::Elem));
  const int64_t bytes = std::clamp<int64_t>(row_bytes * p.N / (4 * threads), 32 << 10, 256 << 10);
  p.chunk_rows = std::max<int64_t>(1, bytes / row_bytes);
  const int64_t n_chunks = (p.N + p.chunk_rows - 1) / p.chunk_rows;
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

// Scratch floats, uninitialised (a std::vector would zero megabytes that are overwritten anyway).
inline std::unique_ptr<float[]> scratch(size_t n) { return std::unique_ptr<float[]>(new float[n]); }

constexpr int kMR = 6, kNR = 16, kKC = 256;

template <class W>
struct Gemm {
  const float* x;             // [T, K]
  const typename W::Elem* w;  // [N, K]
  const float* scale;         // [N] or null
  const float* bias;          // [N] or null
  float* y;                   // [T, N]
  int64_t T, K, N, block_cols;
  const float* xp = nullptr;  // x packed in row tiles (run_gemm)
};

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

// Columns [n0, n0 + 16) of W^T, rows [k0, k0 + kc), as fp32 [kc][16] (columns past N are zero).
template <class W>
void pack_panel(const Gemm<W>& g, int64_t n0, int64_t k0, int64_t kc, float* dst) {
  const typename W::Elem* row[kNR];
  float s[kNR];
  const int64_t valid = std::min<int64_t>(kNR, g.N - n0);
  for (int r = 0; r < kNR; ++r) {
    row[r] = r < valid ? g.w + (n0 + r) * g.K + k0 : nullptr;
    s[r] = r < valid && g.scale ? g.scale[n0 + r] : 1.0f;
  }
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8) {
    for (int half = 0; half < 2; ++half) {
      __m256 v[8];
      for (int r = 0; r < 8; ++r) {
        const int rr = half * 8 + r;
        if (!row[rr]) v[r] = _mm256_setzero_ps();
        else if (g.scale) v[r] = _mm256_mul_ps(W::load8(row[rr] + k), _mm256_set1_ps(s[rr]));
        else v[r] = W::load8(row[rr] + k);
      }
      transpose8(v);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (k + j) * kNR + half * 8, v[j]);
    }
  }
  for (; k < kc; ++k)
    for (int r = 0; r < kNR; ++r) dst[k * kNR + r] = row[r] ? W::one(row[r] + k) * s[r] : 0.0f;
}

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
#define GRANITE_ROW_FMA(i)                      \
  av = _mm256_broadcast_ss(a + i);              \
  c##i##0 = _mm256_fmadd_ps(av, b0, c##i##0); \
  c##i##1 = _mm256_fmadd_ps(av, b1, c##i##1);
    GRANITE_ROW_FMA(0) GRANITE_ROW_FMA(1) GRANITE_ROW_FMA(2) GRANITE_ROW_FMA(3) GRANITE_ROW_FMA(4) GRANITE_ROW_FMA(5)
#undef GRANITE_ROW_FMA
  }
  alignas(32) float tile[kMR][kNR];
#define GRANITE_ROW_OUT(i)                 \
  _mm256_store_ps(tile[i], c##i##0); \
  _mm256_store_ps(tile[i] + 8, c##i##1);
  GRANITE_ROW_OUT(0) GRANITE_ROW_OUT(1) GRANITE_ROW_OUT(2) GRANITE_ROW_OUT(3) GRANITE_ROW_OUT(4) GRANITE_ROW_OUT(5)
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

// One block of block_cols columns of y, all rows. For each KC slice of K: pack the block's panels
// of W (fp32, ~128 KB: L2), then for each panel (16 KB: it stays in L1) sweep a band of row tiles
// (kRowBand rows of packed x, ~96 KB: L2), BLIS's loop order.
constexpr int64_t kRowBand = 96;
constexpr int64_t kMaxBlockCols = 8 * kNR;

template <class W>
void gemm_block(const void* problem, int64_t c) {
  const auto& g = *static_cast<const Gemm<W>*>(problem);
  const int64_t n0 = c * g.block_cols, cols = std::min(g.block_cols, g.N - n0);
  const int64_t panels = (cols + kNR - 1) / kNR;
  // On the stack (128 KB; nothing to allocate, so nothing can throw inside a pool task), 64-byte
  // aligned: a panel row is one cache line, and a 32-byte load across two costs double.
  alignas(64) float packed[kMaxBlockCols * kKC];
  for (int64_t k0 = 0; k0 < g.K; k0 += kKC) {
    const int64_t kc = std::min<int64_t>(kKC, g.K - k0);
    for (int64_t j = 0; j < panels; ++j) pack_panel(g, n0 + j * kNR, k0, kc, packed + j * kNR * kc);
    for (int64_t band = 0; band < g.T; band += kRowBand) {
      const int64_t band_end = std::min(g.T, band + kRowBand);
      for (int64_t j = 0; j < panels; ++j) {
        const int64_t n = n0 + j * kNR;
        const int ncols = int(std::min<int64_t>(kNR, g.N - n));
        const float* b = packed + j * kNR * kc;
        for (int64_t t = band; t < band_end; t += kMR) {
          const float* a = g.xp + (t / kMR) * g.K * kMR + k0 * kMR;
          micro_tile(a, b, kc, g.y + t * g.N + n, g.N, int(std::min<int64_t>(kMR, g.T - t)), ncols, k0 > 0,
                     g.bias ? g.bias + n : nullptr);
        }
      }
    }
  }
}

// Blocks of 16-128 columns, at least ~4 per thread so that a preempted thread holds up little.
template <class W>
void run_gemm(Gemm<W> g, int threads) {
  const int64_t tiles = (g.T + kMR - 1) / kMR;
  const auto xp = scratch(size_t(tiles * g.K * kMR));
  PackX px{g.x, xp.get(), g.T, g.K};
  pool().run(&pack_x_tile, &px, tiles, threads - 1);
  g.xp = xp.get();
  const int64_t want = (g.N + 4 * threads - 1) / (4 * threads);
  g.block_cols = std::clamp<int64_t>((want + kNR - 1) / kNR * kNR, kNR, kMaxBlockCols);
  const int64_t blocks = (g.N + g.block_cols - 1) / g.block_cols;
  pool().run(&gemm_block<W>, &g, blocks, threads - 1);
}

template <class W>
void product(bool blocked, const float* x, const typename W::Elem* w, const float* s, const float* b, float* y,
             int64_t T, int64_t K, int64_t N, int threads) {
  if (blocked) run_gemm(Gemm<W>{x, w, s, b, y, T, K, N, 0}, threads);
  else run(Problem<W>{x, w, s, b, y, T, K, N, 0}, threads);
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
  const int n = int(std::clamp<int64_t>(threads, 1, 64));
  const auto* w16 = reinterpret_cast<const uint16_t*>(w.data_ptr());
  switch (w.scalar_type()) {
    case at::kFloat: product<F32>(blocked, xp, w.data_ptr<float>(), s, b, yp, T, K, N, n); break;
    case at::kBFloat16: product<BF16>(blocked, xp, w16, s, b, yp, T, K, N, n); break;
    case at::kHalf: product<F16>(blocked, xp, w16, s, b, yp, T, K, N, n); break;
    case at::kChar:
      TORCH_CHECK(s, "int8 weights need a scale");
      product<I8>(blocked, xp, w.data_ptr<int8_t>(), s, b, yp, T, K, N, n);
      break;
    default:
      TORCH_CHECK(false, "w: float32, bfloat16, float16 or int8");
  }
  return y;
}

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
  pool().run(body, &ctx, int64_t(sums.size()), int(std::clamp<int64_t>(threads, 1, 64)) - 1);
  double total = 0;
  for (float v : sums) total += v;
  return total;
}

// ---------------------------------------------------------------------------------------------
// Vectorized exp and SiLU: std::exp is ~15 ns a call, and a 512-token prefill needs ~50 M of
// them (SiLU of the conv output, the gate, SwiGLU). Cody-Waite range reduction and a degree-6
// polynomial (the Cephes expf coefficients): ~1-2 ulp, like the vectorized exp torch uses.

inline __m256 exp8(__m256 x) {
  // past the float range: +inf above, 0 below (which is what SiLU's and softmax's limits need);
  // NaN stays NaN (min/max return their second operand when either is NaN)
  const __m256 hi = _mm256_set1_ps(88.72283905206835f), lo = _mm256_set1_ps(-87.33654475055310f);
  const __m256 overflow = _mm256_cmp_ps(x, hi, _CMP_GT_OQ), underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
  // 2^n as two factors: n reaches 128 at the top of the range, past the largest exponent
  const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 e2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  const __m256 r = _mm256_mul_ps(_mm256_mul_ps(p, e1), e2);
  return _mm256_andnot_ps(underflow, _mm256_blendv_ps(r, _mm256_set1_ps(INFINITY), overflow));
}

inline __m256 silu8(__m256 v) {
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
  return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// out[i] = silu(in[i]) (* mul[i] when given), n floats.
inline void silu_row(const float* in, const float* mul, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = silu8(_mm256_loadu_ps(in + i));
    if (mul) v = _mm256_mul_ps(v, _mm256_loadu_ps(mul + i));
    _mm256_storeu_ps(out + i, v);
  }
  for (; i < n; ++i) out[i] = silu(in[i]) * (mul ? mul[i] : 1.0f);
}

// Rows [0, rows) cut into chunks of `per` rows for the pool: body(ctx, first, last).
template <class F>
void parallel_rows(int64_t rows, int64_t per, int threads, const F& f) {
  struct Ctx {
    const F* f;
    int64_t rows, per;
  } ctx{&f, rows, per};
  auto body = [](const void* c, int64_t i) {
    const auto& x = *static_cast<const Ctx*>(c);
    (*x.f)(i * x.per, std::min(x.rows, (i + 1) * x.per));
  };
  pool().run(body, &ctx, (rows + per - 1) / per, threads - 1);
}

// ---------------------------------------------------------------------------------------------
// A Mamba2 mixer between its two projections, for T >= 1 tokens: the causal conv, the selective
// scan and the gated RMSNorm, continuing from (and updating) the conv and SSM states.
//
// The scan is the plain recurrence S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t,
// one head per task: a head's state (P x N fp32, 16 KB) stays in L1 for all T tokens, so the
// cost is ~2.5 FMAs per state element per token and nothing else. The chunked matmul ("SSD")
// form that GPUs want does more arithmetic than that here (~10 K against ~8 K multiply-adds per
// token and head for the real shape) plus [L, L] decay blocks, and in torch ops it spent more
// time in small-op overhead than in math. Decode is the same code with T = 1.

constexpr int64_t kMaxConvWidth = 16;

struct MambaScan {
  float* ssm;           // [H, P, N]
  const float* xbc;     // conv output (after SiLU) [T, C]
  const float* dt;      // [T, H]
  const float* decay;   // [T, H]
  float* y;             // [T, E]
  int64_t T, H, P, N, G, E, C;
};

// One state row (N values) for one token: decay, add xdt * B, read out through C.
inline float state_row(float* s, int64_t N, const float* B, const float* Cv, float xdt, float decay) {
  const __m256 xv = _mm256_set1_ps(xdt), d = _mm256_set1_ps(decay);
  __m256 acc = _mm256_setzero_ps();
  int64_t n = 0;
  for (; n + 8 <= N; n += 8) {
    const __m256 sv = _mm256_fmadd_ps(xv, _mm256_loadu_ps(B + n), _mm256_mul_ps(_mm256_loadu_ps(s + n), d));
    _mm256_storeu_ps(s + n, sv);
    acc = _mm256_fmadd_ps(sv, _mm256_loadu_ps(Cv + n), acc);
  }
  float out = hsum(acc);
  for (; n < N; ++n) {
    s[n] = s[n] * decay + xdt * B[n];
    out += s[n] * Cv[n];
  }
  return out;
}

// Four state rows at once (N % 8 == 0): four independent FMA chains for the read-out (one chain
// waits on FMA latency) sharing the B and C loads. Named variables: as arrays GCC keeps them in
// memory.
inline void state_rows4(float* s, int64_t N, const float* B, const float* Cv, const float* xdt, float decay, float* y) {
  const __m256 d = _mm256_set1_ps(decay);
  const __m256 x0 = _mm256_set1_ps(xdt[0]), x1 = _mm256_set1_ps(xdt[1]), x2 = _mm256_set1_ps(xdt[2]),
               x3 = _mm256_set1_ps(xdt[3]);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  float *s0 = s, *s1 = s + N, *s2 = s + 2 * N, *s3 = s + 3 * N;
  for (int64_t n = 0; n < N; n += 8) {
    const __m256 b = _mm256_loadu_ps(B + n), c = _mm256_loadu_ps(Cv + n);
#define GRANITE_STATE_ROW(i)                                                                   \
  {                                                                                            \
    const __m256 v = _mm256_fmadd_ps(x##i, b, _mm256_mul_ps(_mm256_loadu_ps(s##i + n), d)); \
    _mm256_storeu_ps(s##i + n, v);                                                             \
    a##i = _mm256_fmadd_ps(v, c, a##i);                                                        \
  }
    GRANITE_STATE_ROW(0) GRANITE_STATE_ROW(1) GRANITE_STATE_ROW(2) GRANITE_STATE_ROW(3)
#undef GRANITE_STATE_ROW
  }
  y[0] = hsum(a0);
  y[1] = hsum(a1);
  y[2] = hsum(a2);
  y[3] = hsum(a3);
}

void mamba_head(const void* ctx, int64_t h) {
  const auto& m = *static_cast<const MambaScan*>(ctx);
  const int64_t g = h / (m.H / m.G), P = m.P, N = m.N;
  const int64_t P4 = N % 8 == 0 ? P / 4 * 4 : 0;
  float* state = m.ssm + h * P * N;
  float xdt[4];
  for (int64_t t = 0; t < m.T; ++t) {
    const float* row = m.xbc + t * m.C;
    const float* B = row + m.E + g * N;
    const float* Cv = row + m.E + m.G * N + g * N;
    const float* x = row + h * P;
    const float dt = m.dt[t * m.H + h], decay = m.decay[t * m.H + h];
    float* y = m.y + t * m.E + h * P;
    for (int64_t p = 0; p < P4; p += 4) {
      for (int r = 0; r < 4; ++r) xdt[r] = x[p + r] * dt;
      state_rows4(state + p * N, N, B, Cv, xdt, decay, y + p);
    }
    for (int64_t p = P4; p < P; ++p) y[p] = state_row(state + p * N, N, B, Cv, x[p] * dt, decay);
  }
}

// zxbcdt [T, E + C + H] fp32 (in_proj output); conv_state [K-1, C] fp32 (updated); conv_w [K, C];
// ssm_state [H, P, N] fp32 (updated). Returns the gated, normalised y [T, E] that out_proj takes.
at::Tensor mamba_mixer(const at::Tensor& zxbcdt, const at::Tensor& conv_state, const at::Tensor& conv_w,
                       const std::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const at::Tensor& A,
                       const at::Tensor& D, const at::Tensor& ssm_state, const at::Tensor& norm_w, int64_t n_groups,
                       double eps, double dt_min, double dt_max, int64_t threads) {
  const int64_t H = ssm_state.size(0), P = ssm_state.size(1), N = ssm_state.size(2);
  const int64_t E = H * P, G = n_groups, C = E + 2 * G * N, K = conv_w.size(0), W = E + C + H;
  TORCH_CHECK(zxbcdt.is_cpu() && zxbcdt.scalar_type() == at::kFloat && zxbcdt.is_contiguous() && zxbcdt.dim() == 2 &&
                  zxbcdt.size(1) == W,
              "zxbcdt: contiguous fp32 [T, E + C + H]");
  for (const at::Tensor* t : {&conv_state, &conv_w, &dt_bias, &A, &D, &ssm_state, &norm_w})
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(), "mamba_mixer: fp32 contiguous");
  TORCH_CHECK(K >= 2 && K <= kMaxConvWidth && conv_state.size(0) == K - 1 && conv_state.size(1) == C &&
                  conv_w.size(1) == C,
              "conv shapes (width 2..16)");
  TORCH_CHECK(dt_bias.numel() == H, "dt_bias: [H]");
  TORCH_CHECK(!conv_b || (conv_b->is_cpu() && conv_b->scalar_type() == at::kFloat && conv_b->is_contiguous() &&
                          conv_b->numel() == C),
              "conv_b: contiguous fp32 [C]");
  TORCH_CHECK(G >= 1 && H % G == 0 && E % G == 0 && norm_w.numel() == E && A.numel() == H && D.numel() == H,
              "head shapes");
  const int64_t T = zxbcdt.size(0);
  const int n_threads = int(std::clamp<int64_t>(threads, 1, 64));
  at::Tensor out = at::empty({T, E}, zxbcdt.options());
  if (T == 0) return out;
  const float* in = zxbcdt.data_ptr<float>();
  float* cs = conv_state.data_ptr<float>();
  const float* cw = conv_w.data_ptr<float>();
  const float* cb = conv_b ? conv_b->data_ptr<float>() : nullptr;
  // (1) causal depthwise conv over [state; inputs] and SiLU, rows in parallel. Input row j of the
  // window of token t is state row t + j while t + j < K - 1, else raw input t + j - (K - 1).
  const auto xbc_buf = scratch(size_t(T * C));
  float* const xbc = xbc_buf.get();
  auto conv_rows = [&](int64_t t0, int64_t t1) {
    const float* src[kMaxConvWidth];
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t j = 0; j < K; ++j)
        src[j] = t + j < K - 1 ? cs + (t + j) * C : in + (t + j - (K - 1)) * W + E;
      float* o = xbc + t * C;
      int64_t c = 0;
      for (; c + 8 <= C; c += 8) {
        __m256 acc = cb ? _mm256_loadu_ps(cb + c) : _mm256_setzero_ps();
        for (int64_t j = 0; j < K; ++j)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(src[j] + c), _mm256_loadu_ps(cw + j * C + c), acc);
        _mm256_storeu_ps(o + c, silu8(acc));
      }
      for (; c < C; ++c) {
        float acc = cb ? cb[c] : 0.0f;
        for (int64_t j = 0; j < K; ++j) acc += src[j][c] * cw[j * C + c];
        o[c] = silu(acc);
      }
    }
  };
  parallel_rows(T, 16, n_threads, conv_rows);
  // the conv state keeps the last K-1 raw inputs (partly old state when T < K - 1)
  std::vector<float> keep(size_t((K - 1) * C));
  for (int64_t r = 0; r < K - 1; ++r) {
    const int64_t j = T + r;  // row of [state; inputs]
    std::memcpy(keep.data() + r * C, j < K - 1 ? cs + j * C : in + (j - (K - 1)) * W + E, sizeof(float) * C);
  }
  std::memcpy(cs, keep.data(), sizeof(float) * keep.size());
  // (2) dt = clamp(softplus(raw + bias)), decay = exp(max(dt * A, -80)) as in runtime/ssm.py
  const auto dt_buf = scratch(size_t(2 * T * H));
  float *const dt = dt_buf.get(), *const decay = dt + T * H;
  const float* db = dt_bias.data_ptr<float>();
  const float* Ap = A.data_ptr<float>();
  parallel_rows(T, 64, n_threads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        const float v = in[t * W + E + C + h] + db[h];
        float sp = v > 20.0f ? v : std::log1p(std::exp(v));
        sp = std::min<float>(std::max<float>(sp, float(dt_min)), float(dt_max));
        dt[t * H + h] = sp;
        decay[t * H + h] = std::exp(std::max(sp * Ap[h], -80.0f));
      }
    }
  });
  // (3) the scan, one head per task
  float* y = out.data_ptr<float>();
  MambaScan m{ssm_state.data_ptr<float>(), xbc, dt, decay, y, T, H, P, N, G, E, C};
  pool().run(&mamba_head, &m, H, n_threads - 1);
  // (4) D skip, gate with silu(z), RMS-normalise within each group, scale
  const float* Dp = D.data_ptr<float>();
  const float* nw = norm_w.data_ptr<float>();
  const int64_t per = E / G;
  auto gate_rows = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* yt = y + t * E;
      const float* xt = xbc + t * C;
      const float* zt = in + t * W;
      for (int64_t h = 0; h < H; ++h) {
        const __m256 d = _mm256_set1_ps(Dp[h]);
        int64_t i = h * P;
        for (; i + 8 <= (h + 1) * P; i += 8) {
          const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(xt + i), d, _mm256_loadu_ps(yt + i));
          _mm256_storeu_ps(yt + i, _mm256_mul_ps(v, silu8(_mm256_loadu_ps(zt + i))));
        }
        for (; i < (h + 1) * P; ++i) yt[i] = (yt[i] + xt[i] * Dp[h]) * silu(zt[i]);
      }
      for (int64_t g = 0; g < G; ++g) {
        float* yg = yt + g * per;
        double ss = 0;
        for (int64_t i = 0; i < per; ++i) ss += double(yg[i]) * yg[i];
        const float r = 1.0f / std::sqrt(float(ss / per) + float(eps));
        for (int64_t i = 0; i < per; ++i) yg[i] = yg[i] * r * nw[g * per + i];
      }
    }
  };
  parallel_rows(T, 16, n_threads, gate_rows);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Attention of one new token over the KV cache (decode). In torch ops this is two batched
// matmuls over a strided view of the cache plus a softmax, ~1 ms a layer at 1,400 keys on one
// thread, mostly overhead; here each KV head (with its group of query heads) is one task that
// reads its keys and values once.

struct DecodeAttention {
  const float* q;    // [nq, hd]
  const float* k;    // [nkv, cap, hd]
  const float* v;    // [nkv, cap, hd]
  float* out;        // [nq, hd]
  float* scores;     // [nkv, L] scratch, one row per task
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

// q [nq * hd] fp32; k, v [nkv, cap, hd] fp32, the first `length` positions valid -> [1, nq * hd].
at::Tensor attention_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t length,
                            double scale, int64_t threads) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "k, v: [nkv, cap, hd]");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(), "attention_decode: fp32 contiguous");
  const int64_t nkv = k.size(0), cap = k.size(1), hd = k.size(2);
  TORCH_CHECK(hd > 0 && q.numel() % hd == 0, "q: [nq * hd]");
  const int64_t nq = q.numel() / hd;
  TORCH_CHECK(nkv > 0 && nq % nkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(length >= 1 && length <= cap, "length: 1 .. capacity");
  at::Tensor out = at::empty({1, nq * hd}, q.options());
  const auto scores = scratch(size_t(nkv * length));
  DecodeAttention a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
                    scores.get(), nq, nkv, hd, cap, length, float(scale)};
  pool().run(&attention_kv_head, &a, nkv, int(std::clamp<int64_t>(threads, 1, 64)) - 1);
  return out;
}

// RMSNorm of rows [r0, r1) of x [T, D] into out, scaled by w [D].
void rms_norm_rows(const float* xp, const float* wp, float* op, int64_t D, float eps, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = xp + r * D;
    float* orow = op + r * D;
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (; i < D; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / float(D) + eps);
    const __m256 iv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= D; i += 8)
      _mm256_storeu_ps(orow + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), iv), _mm256_loadu_ps(wp + i)));
    for (; i < D; ++i) orow[i] = xr[i] * inv * wp[i];
  }
}

// Elementwise ops over rows: a handful of rows (decode) on the calling thread, more on the pool.
constexpr int64_t kRowsPerTask = 32;

// RMSNorm of each row of x [T, D] scaled by w [D], like torch's F.rms_norm in fp32 (whose
// composite implementation costs ~20-60 us per 768-wide row in dispatch; a decode step has 65).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, int64_t threads) {
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1, "x: contiguous fp32");
  TORCH_CHECK(w.is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x.size(-1), "w: fp32 [D]");
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  at::Tensor out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_rows(rows, kRowsPerTask, int(std::clamp<int64_t>(threads, 1, 64)),
                [&](int64_t r0, int64_t r1) { rms_norm_rows(xp, wp, op, D, float(eps), r0, r1); });
  return out;
}

// x += alpha * h (in place, the residual stream), then RMSNorm(x) * w: the two ops that sit
// between every pair of sub-blocks, fused.
at::Tensor add_rms_norm(const at::Tensor& x, const at::Tensor& h, double alpha, const at::Tensor& w, double eps,
                        int64_t threads) {
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1, "x: contiguous fp32");
  TORCH_CHECK(h.is_cpu() && h.scalar_type() == at::kFloat && h.is_contiguous() && h.numel() == x.numel(), "h: like x");
  TORCH_CHECK(w.is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x.size(-1), "w: fp32 [D]");
  float* xp = x.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const float a = float(alpha);
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  at::Tensor out = at::empty_like(x);
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_rows(rows, kRowsPerTask, int(std::clamp<int64_t>(threads, 1, 64)), [&](int64_t r0, int64_t r1) {
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
  TORCH_CHECK(gu.is_cpu() && gu.scalar_type() == at::kFloat && gu.is_contiguous() && gu.dim() == 2 &&
                  gu.size(1) % 2 == 0,
              "gu: contiguous fp32 [T, 2I]");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  at::Tensor out = at::empty({T, I}, gu.options());
  const float* g = gu.data_ptr<float>();
  float* o = out.data_ptr<float>();
  parallel_rows(T, kRowsPerTask / 4, int(std::clamp<int64_t>(threads, 1, 64)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) silu_row(g + t * 2 * I, g + t * 2 * I + I, o + t * I, I);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {  // torch.ops.<name given to cpp_extension.load>
  m.def("linear(Tensor x, Tensor w, Tensor? scale, Tensor? bias, int threads) -> Tensor", &linear);
  m.def("gemm(Tensor x, Tensor w, Tensor? scale, Tensor? bias, int threads) -> Tensor", &gemm);
  m.def("read_probe(Tensor buf, int threads) -> float", &read_probe);
  m.def("rms_norm(Tensor x, Tensor w, float eps, int threads) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor(a!) x, Tensor h, float alpha, Tensor w, float eps, int threads) -> Tensor", &add_rms_norm);
  m.def("swiglu(Tensor gu, int threads) -> Tensor", &swiglu);
  m.def("attention_decode(Tensor q, Tensor k, Tensor v, int length, float scale, int threads) -> Tensor",
        &attention_decode);
  m.def(
      "mamba_mixer(Tensor zxbcdt, Tensor(a!) conv_state, Tensor conv_w, Tensor? conv_b, Tensor dt_bias, "
      "Tensor A, Tensor D, Tensor(b!) ssm_state, Tensor norm_w, int n_groups, float eps, float dt_min, float dt_max, int threads) "
      "-> Tensor",
      &mamba_mixer);
}
