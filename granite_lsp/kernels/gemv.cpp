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

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias, int64_t threads) {
  TORCH_CHECK(x.is_cpu() && w.is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [T, K]");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "w: contiguous [N, K]");
  const int64_t T = x.size(0), N = w.size(0), K = w.size(1);
  for (const auto* v : {&scale, &bias})
    TORCH_CHECK(!v->has_value() || ((*v)->scalar_type() == at::kFloat && (*v)->is_contiguous() && (*v)->numel() == N),
                "scale/bias: contiguous fp32 [N]");
  at::Tensor y = at::empty({T, N}, x.options());
  if (N == 0 || T == 0) return y;
  const float* s = scale ? scale->data_ptr<float>() : nullptr;
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  const int n_threads = int(std::clamp<int64_t>(threads, 1, 64));
  switch (w.scalar_type()) {
    case at::kFloat:
      run(Problem<F32>{xp, w.data_ptr<float>(), s, b, y.data_ptr<float>(), T, K, N, 0}, n_threads);
      break;
    case at::kBFloat16: {
      const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
      run(Problem<BF16>{xp, wp, s, b, y.data_ptr<float>(), T, K, N, 0}, n_threads);
      break;
    }
    case at::kHalf: {
      const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
      run(Problem<F16>{xp, wp, s, b, y.data_ptr<float>(), T, K, N, 0}, n_threads);
      break;
    }
    case at::kChar:
      TORCH_CHECK(s, "int8 weights need a scale");
      run(Problem<I8>{xp, w.data_ptr<int8_t>(), s, b, y.data_ptr<float>(), T, K, N, 0}, n_threads);
      break;
    default:
      TORCH_CHECK(false, "w: float32, bfloat16, float16 or int8");
  }
  return y;
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
// One decode step of a Mamba2 mixer, between its two projections: the causal conv, the selective
// state update and the gated RMSNorm, in one pass over the state. The same step in torch ops
// (granite_lsp/runtime/layers.py) is ~30 small ops per layer that each cost more in dispatch than
// in arithmetic, and three passes over the [H, P, N] state (decay, rank-1 update, read-out).

struct MambaStep {
  float* ssm;             // [H, P, N]
  const float* xbc;       // conv output (after SiLU) [C]
  const float* dt;        // [H]
  const float* decay;     // [H]
  float* y;               // [H * P]
  int64_t H, P, N, G, E;
};

void mamba_heads(const void* ctx, int64_t c) {
  const auto& m = *static_cast<const MambaStep*>(ctx);
  const int64_t heads_per_chunk = 4, hg = m.H / m.G;
  const int64_t h0 = c * heads_per_chunk, h1 = std::min(m.H, h0 + heads_per_chunk);
  for (int64_t h = h0; h < h1; ++h) {
    const int64_t g = h / hg;
    const float* B = m.xbc + m.E + g * m.N;
    const float* C = m.xbc + m.E + m.G * m.N + g * m.N;
    const __m256 d = _mm256_set1_ps(m.decay[h]);
    for (int64_t p = 0; p < m.P; ++p) {
      const float xdt = m.xbc[h * m.P + p] * m.dt[h];
      const __m256 xv = _mm256_set1_ps(xdt);
      float* s = m.ssm + (h * m.P + p) * m.N;
      __m256 acc = _mm256_setzero_ps();
      int64_t n = 0;
      for (; n + 8 <= m.N; n += 8) {
        const __m256 sv = _mm256_fmadd_ps(xv, _mm256_loadu_ps(B + n), _mm256_mul_ps(_mm256_loadu_ps(s + n), d));
        _mm256_storeu_ps(s + n, sv);
        acc = _mm256_fmadd_ps(sv, _mm256_loadu_ps(C + n), acc);
      }
      float out = hsum(acc);
      for (; n < m.N; ++n) {
        s[n] = s[n] * m.decay[h] + xdt * B[n];
        out += s[n] * C[n];
      }
      m.y[h * m.P + p] = out;
    }
  }
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// zxbcdt [1, E + C + H] fp32 (in_proj output); conv_state [K-1, C] fp32 (updated); conv_w [K, C];
// ssm_state [H, P, N] fp32 (updated). Returns the gated, normalised y [1, E] that out_proj takes.
at::Tensor mamba_decode_step(const at::Tensor& zxbcdt, const at::Tensor& conv_state, const at::Tensor& conv_w,
                             const std::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const at::Tensor& A,
                             const at::Tensor& D, const at::Tensor& ssm_state, const at::Tensor& norm_w,
                             int64_t n_groups, double eps, double dt_min, double dt_max, int64_t threads) {
  const int64_t H = ssm_state.size(0), P = ssm_state.size(1), N = ssm_state.size(2);
  const int64_t E = H * P, G = n_groups, C = E + 2 * G * N, K = conv_w.size(0);
  TORCH_CHECK(zxbcdt.is_cpu() && zxbcdt.scalar_type() == at::kFloat && zxbcdt.is_contiguous() &&
                  zxbcdt.numel() == E + C + H,
              "zxbcdt: contiguous fp32 [1, E + C + H]");
  for (const at::Tensor* t : {&conv_state, &conv_w, &dt_bias, &A, &D, &ssm_state, &norm_w})
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(), "mamba_decode_step: fp32 contiguous");
  TORCH_CHECK(K >= 2 && conv_state.size(0) == K - 1 && conv_state.size(1) == C && conv_w.size(1) == C, "conv shapes");
  TORCH_CHECK(dt_bias.numel() == H, "dt_bias: [H]");
  TORCH_CHECK(!conv_b || (conv_b->is_cpu() && conv_b->scalar_type() == at::kFloat && conv_b->is_contiguous() &&
                          conv_b->numel() == C),
              "conv_b: contiguous fp32 [C]");
  TORCH_CHECK(H % G == 0 && E % G == 0 && norm_w.numel() == E && A.numel() == H && D.numel() == H, "head shapes");
  const float* in = zxbcdt.data_ptr<float>();
  const float *z = in, *raw = in + E, *dtr = in + E + C;
  float* cs = conv_state.data_ptr<float>();
  const float* cw = conv_w.data_ptr<float>();
  const float* cb = conv_b ? conv_b->data_ptr<float>() : nullptr;
  // causal depthwise conv over [state; new input], SiLU; the state keeps the last K-1 raw inputs
  std::vector<float> xbc(C);
  for (int64_t c = 0; c < C; ++c) {
    float acc = cs[c] * cw[c];
    if (cb) acc += cb[c];
    for (int64_t k = 1; k < K - 1; ++k) acc += cs[k * C + c] * cw[k * C + c];
    acc += raw[c] * cw[(K - 1) * C + c];
    xbc[c] = silu(acc);
  }
  if (K > 2) std::memmove(cs, cs + C, sizeof(float) * (K - 2) * C);
  std::memcpy(cs + (K - 2) * C, raw, sizeof(float) * C);
  // dt = clamp(softplus(raw + bias)), decay = exp(max(dt * A, -80)) as in runtime/ssm.py
  std::vector<float> dt(H), decay(H);
  const float* db = dt_bias.data_ptr<float>();
  const float* Ap = A.data_ptr<float>();
  for (int64_t h = 0; h < H; ++h) {
    const float v = dtr[h] + db[h];
    float sp = v > 20.0f ? v : std::log1p(std::exp(v));
    sp = std::min<float>(std::max<float>(sp, float(dt_min)), float(dt_max));
    dt[h] = sp;
    decay[h] = std::exp(std::max(sp * Ap[h], -80.0f));
  }
  at::Tensor out = at::empty({1, E}, zxbcdt.options());
  float* y = out.data_ptr<float>();
  MambaStep m{ssm_state.data_ptr<float>(), xbc.data(), dt.data(), decay.data(), y, H, P, N, G, E};
  const int64_t chunks = (H + 3) / 4;
  pool().run(&mamba_heads, &m, chunks, int(std::clamp<int64_t>(threads, 1, 64)) - 1);
  // D skip, gate with silu(z), RMS-normalise within each group, scale
  const float* Dp = D.data_ptr<float>();
  const float* nw = norm_w.data_ptr<float>();
  const int64_t per = E / G;
  for (int64_t i = 0; i < E; ++i) y[i] = (y[i] + xbc[i] * Dp[i / P]) * silu(z[i]);
  for (int64_t g = 0; g < G; ++g) {
    float* yg = y + g * per;
    double ss = 0;
    for (int64_t i = 0; i < per; ++i) ss += double(yg[i]) * yg[i];
    const float r = 1.0f / std::sqrt(float(ss / per) + float(eps));
    for (int64_t i = 0; i < per; ++i) yg[i] = yg[i] * r * nw[g * per + i];
  }
  return out;
}

// RMSNorm of each row of x [T, D] scaled by w [D], like torch's F.rms_norm in fp32 (whose
// composite implementation costs ~20-60 us per 768-wide row in dispatch; a decode step has 65).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1, "x: contiguous fp32");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x.size(-1), "w: fp32 [D]");
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  at::Tensor out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * D;
    float ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / float(D) + float(eps));
    for (int64_t i = 0; i < D; ++i) op[r * D + i] = xr[i] * inv * wp[i];
  }
  return out;
}

// x += alpha * h (in place, the residual stream), then RMSNorm(x) * w: the two ops that sit
// between every pair of sub-blocks, fused.
at::Tensor add_rms_norm(const at::Tensor& x, const at::Tensor& h, double alpha, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32");
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.numel() == x.numel(), "h: like x");
  float* xp = x.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const float a = float(alpha);
  for (int64_t i = 0, n = x.numel(); i < n; ++i) xp[i] += a * hp[i];
  return rms_norm(x, w, eps);
}

// silu(gate) * up for gu = [gate | up] rows [T, 2I] -> [T, I] (the SwiGLU between the MLP's matmuls).
at::Tensor swiglu(const at::Tensor& gu) {
  TORCH_CHECK(gu.is_cpu() && gu.scalar_type() == at::kFloat && gu.is_contiguous() && gu.dim() == 2 &&
                  gu.size(1) % 2 == 0,
              "gu: contiguous fp32 [T, 2I]");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  at::Tensor out = at::empty({T, I}, gu.options());
  const float* g = gu.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i) o[t * I + i] = silu(g[t * 2 * I + i]) * g[t * 2 * I + I + i];
  return out;
}

}  // namespace

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {  // torch.ops.<name given to cpp_extension.load>
  m.def("linear(Tensor x, Tensor w, Tensor? scale, Tensor? bias, int threads) -> Tensor", &linear);
  m.def("read_probe(Tensor buf, int threads) -> float", &read_probe);
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor(a!) x, Tensor h, float alpha, Tensor w, float eps) -> Tensor", &add_rms_norm);
  m.def("swiglu(Tensor gu) -> Tensor", &swiglu);
  m.def(
      "mamba_decode_step(Tensor zxbcdt, Tensor(a!) conv_state, Tensor conv_w, Tensor? conv_b, Tensor dt_bias, "
      "Tensor A, Tensor D, Tensor(b!) ssm_state, Tensor norm_w, int n_groups, float eps, float dt_min, float dt_max, int threads) "
      "-> Tensor",
      &mamba_decode_step);
}
