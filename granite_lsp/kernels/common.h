// What the kernels share: weight formats, vector helpers (horizontal sum, exp, SiLU), scratch
// memory and the thread pool. Everything lives in namespace granite (not an anonymous one): the
// pool must be one per process whichever source file uses it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace granite {

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
  static __m256 load8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
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

// The thread count an op was given, as the pool takes it (1..64).
inline int thread_count(int64_t threads) { return int(std::clamp<int64_t>(threads, 1, 64)); }

// out = RMSNorm(x) * w over one row of D floats (out may be x).
inline void rms_norm_row(const float* x, const float* w, float* out, int64_t D, float eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum(acc);
  for (; i < D; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / float(D) + eps);
  const __m256 iv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= D; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv), _mm256_loadu_ps(w + i)));
  for (; i < D; ++i) out[i] = x[i] * inv * w[i];
}

// ---------------------------------------------------------------------------------------------
// Denormal floats (magnitude below 2^-126 ~ 1.2e-38) flushed to zero where an operation produces one
// (MXCSR's FTZ) and read as zero where one comes in (DAZ), for as long as a kernel runs: ops.cpp puts
// every op's body under a `DenormalsFlushed`, and the pool's helper threads set both bits for good
// (they run nothing else). On Intel cores every operation that meets a denormal takes a microcode
// assist of ~100+ cycles, and the Mamba scan makes them all the time: a state row times a strong
// decay (exp(dt A) down to e^-80) lands below 2^-126 long before it stops mattering to anyone. On this
// project's Intel Xeon (2 cores, 1 thread, CPU time, random real-shape weights) one 512-token mixer
// took 148-150 ms with denormals against 7.6-8.0 ms flushed, a decode token's mixer 88 us against 31,
// a 2-row verify's 203-220 us against 40: a whole 512-token bf16 prefill spent 38% of its time in
// them. AMD's Zen cores take denormals at nearly full speed, so there this changes nothing but the
// values: what it changes is only results below 2^-126, which are zero for every purpose here (the
// activations and states that matter are ~1e-3 .. 1e3), and every path (decode, verify, prefill, the
// journal's replay) computes under the same mode, so the bit-for-bit equalities between them hold.
// (One exception, harmless: the layer-by-layer path adds the last layer's residual with torch, under
// the caller's mode, where the one-call step adds it flushed: the two agree except on a denormal sum.)
// `vdpbf16ps` flushes denormals whatever MXCSR says; the int8 paths' sums are integers.
class DenormalsFlushed {
 public:
  static constexpr unsigned kFlushBits = 0x8040;  // MXCSR bit 15 (FTZ) and bit 6 (DAZ)
  DenormalsFlushed() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushBits); }
  ~DenormalsFlushed() { _mm_setcsr(saved_); }
  DenormalsFlushed(const DenormalsFlushed&) = delete;
  DenormalsFlushed& operator=(const DenormalsFlushed&) = delete;

 private:
  unsigned saved_;
};

// Scratch floats, uninitialised (a std::vector would zero megabytes that are overwritten anyway).
inline std::unique_ptr<float[]> scratch(size_t n) { return std::unique_ptr<float[]>(new float[n]); }

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
    if (helpers == 0 || !lock.owns_lock()) {                     // caller has it, work alone
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
    _mm_setcsr(_mm_getcsr() | DenormalsFlushed::kFlushBits);  // for good: a helper runs only kernels
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

inline Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: helper threads may still be sleeping at exit
  return *p;
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

}  // namespace granite
