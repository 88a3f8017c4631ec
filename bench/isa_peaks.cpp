// The machine's physical bounds for the kernels' figures: the peak rate of each multiply-add
// instruction the kernels use (fp32 FMA on 8 and 16 lanes, AVX512_BF16's vdpbf16ps, AVX512_VNNI's
// vpdpbusd, AMX's tdpbf16ps and tdpbssd) and the read bandwidth from memory, on 1 and on N threads. bench/isa_peaks.py
// builds and runs this and reports the figures; see its docstring.
//
// Each peak loop runs 24 independent accumulator chains (more than latency x throughput on any
// current core), with operands in registers, so it measures issue rate alone. Every function has
// its own target attribute: the binary runs on an AVX2-only machine and skips the loops it lacks.
//
// The AMX loops run four independent tile products (tmm0-3 += tmm4-5 x tmm6-7: all eight tiles, as
// linear_amx.cpp's block), operands loaded once and nonzero (bf16 1.0, the same bytes as int8 for the
// int8 loop: all-zero operands may draw less power and clock higher); the process asks Linux for the
// tile state first.
//
// Usage: isa_peaks <threads> <what> [bytes], what: fma256 fma512 bf16 vnni amx_bf16 amx_int8 amx_bf16_loads read.
// Prints one line: the rate in G ops/s (a multiply-add counts 2: flops, or int8 ops) or GB/s.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr long kIters = 20'000'000;

#define CHAINS(X) \
  X(0)            \
  X(1)            \
  X(2)            \
  X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15) X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23)

__attribute__((target("avx2,fma"))) float fma256(long iters) {
  __m256 a = _mm256_set1_ps(1.0001f), b = _mm256_set1_ps(0.9999f);
#define DECL(i) __m256 c##i = _mm256_set1_ps(float(i));
#define STEP(i) c##i = _mm256_fmadd_ps(a, c##i, b);
#define SUM(i) s = _mm256_add_ps(s, c##i);
  CHAINS(DECL)
  for (long n = 0; n < iters; ++n) {
    CHAINS(STEP)
    __asm__ volatile("" : "+x"(a));
  }
  __m256 s = _mm256_setzero_ps();
  CHAINS(SUM)
#undef DECL
#undef STEP
#undef SUM
  float out[8];
  _mm256_storeu_ps(out, s);
  return out[0];
}

__attribute__((target("avx512f"))) float fma512(long iters) {
  __m512 a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
#define DECL(i) __m512 c##i = _mm512_set1_ps(float(i));
#define STEP(i) c##i = _mm512_fmadd_ps(a, c##i, b);
#define SUM(i) s = _mm512_add_ps(s, c##i);
  CHAINS(DECL)
  for (long n = 0; n < iters; ++n) {
    CHAINS(STEP)
    __asm__ volatile("" : "+v"(a));
  }
  __m512 s = _mm512_setzero_ps();
  CHAINS(SUM)
#undef DECL
#undef STEP
#undef SUM
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx512f,avx512bf16"))) float bf16(long iters) {
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x3f7f3f7f);
#define DECL(i) __m512 c##i = _mm512_set1_ps(float(i));
#define STEP(i) c##i = _mm512_dpbf16_ps(c##i, a, b);
#define SUM(i) s = _mm512_add_ps(s, c##i);
  CHAINS(DECL)
  for (long n = 0; n < iters; ++n) {
    CHAINS(STEP)
    __asm__ volatile("" : "+v"(a));
  }
  __m512 s = _mm512_setzero_ps();
  CHAINS(SUM)
#undef DECL
#undef STEP
#undef SUM
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx512f,avx512vnni"))) float vnni(long iters) {
  __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
#define DECL(i) __m512i c##i = _mm512_set1_epi32(i);
#define STEP(i) c##i = _mm512_dpbusd_epi32(c##i, a, b);
#define SUM(i) s = _mm512_add_epi32(s, c##i);
  CHAINS(DECL)
  for (long n = 0; n < iters; ++n) {
    CHAINS(STEP)
    __asm__ volatile("" : "+v"(a));
  }
  __m512i s = _mm512_setzero_si512();
  CHAINS(SUM)
#undef DECL
#undef STEP
#undef SUM
  return float(_mm512_reduce_add_epi32(s));
}

// ldtilecfg's operand: palette 1, tiles 0-7 of 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  unsigned char palette = 1, start_row = 0, reserved[14] = {};
  unsigned short colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  unsigned char rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// AMX's tile data needs the OS's leave (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)).
bool amx_permitted() { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

// RELOAD: four operand tiles loaded before each iteration's four products, walking a 256 KB buffer (in
// L2, past L1: a tile GEMM's x tiles and W panels come from there): what a 2 x 2 block of a tile GEMM
// does per 64-byte depth step (linear_amx.cpp), so the two loops together show what the loads cost
// beside the products.
#define AMX_LOOP(name, DP, RELOAD)                                               \
  __attribute__((target("amx-tile,amx-int8,amx-bf16"))) float name(long iters) { \
    static const TileConfig config;                                              \
    static thread_local unsigned short data[256][16 * 32]; /* bf16 1.0 */        \
    alignas(64) float out[16 * 16];                                              \
    for (auto& tile : data)                                                      \
      for (auto& v : tile) v = 0x3f80;                                           \
    _tile_loadconfig(&config);                                                   \
    _tile_loadd(4, data[0], 64);                                                 \
    _tile_loadd(5, data[1], 64);                                                 \
    _tile_loadd(6, data[2], 64);                                                 \
    _tile_loadd(7, data[3], 64);                                                 \
    _tile_zero(0);                                                               \
    _tile_zero(1);                                                               \
    _tile_zero(2);                                                               \
    _tile_zero(3);                                                               \
    for (long n = 0; n < iters; ++n) {                                           \
      if (RELOAD) {                                                              \
        const long at = (n * 4) % 256;                                           \
        _tile_loadd(4, data[at], 64);                                            \
        _tile_loadd(5, data[at + 1], 64);                                        \
        _tile_loadd(6, data[at + 2], 64);                                        \
        _tile_loadd(7, data[at + 3], 64);                                        \
      }                                                                          \
      DP(0, 4, 6);                                                               \
      DP(1, 4, 7);                                                               \
      DP(2, 5, 6);                                                               \
      DP(3, 5, 7);                                                               \
    }                                                                            \
    _tile_stored(0, out, 64);                                                    \
    _tile_release();                                                             \
    return out[0];                                                               \
  }
AMX_LOOP(amx_bf16, _tile_dpbf16ps, false)
AMX_LOOP(amx_int8, _tile_dpbssd, false)
AMX_LOOP(amx_bf16_loads, _tile_dpbf16ps, true)
#undef AMX_LOOP

// Three ways to read `bytes` from p, summing (the read bandwidth is the best of them: a probe that reads
// slower than the kernels' own decode steps would make a bandwidth "bound" they beat):
//   runs:    8 side-by-side sequential runs over the whole buffer (8 streams, each bytes / 8 long);
//   chunks:  256 KB chunks one after another, each as 8 side-by-side runs of 32 KB (what one pool task
//            of the streaming kernels reads: linear.h's streaming_block, linear.cpp's read_probe);
//   stream:  one sequential stream, 64-byte AVX-512 loads, software prefetch 2 KB ahead (where the
//            hardware prefetcher alone keeps too few lines in flight).
// On the 2-vCPU Intel Xeon of 2026-12-06 the runs pattern alone gave 12-13 GB/s at 2 threads while
// the bf16 decode step streamed its 650 MB of weights at ~24 GB/s.
__attribute__((target("avx2"))) float read_runs(const float* p, long bytes) {
  const long run = bytes / 4 / 8;
  __m256 acc[8];
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (long j = 0; j < run; j += 8)
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_add_ps(acc[r], _mm256_loadu_ps(p + r * run + j));
  for (int r = 1; r < 8; ++r) acc[0] = _mm256_add_ps(acc[0], acc[r]);
  float out[8];
  _mm256_storeu_ps(out, acc[0]);
  return out[0];
}

__attribute__((target("avx2"))) float read_chunks(const float* p, long bytes) {
  constexpr long kChunk = 256 << 10, kRun = kChunk / 4 / 8;  // bytes, floats
  float total = 0;
  for (long c = 0; c + kChunk <= bytes; c += kChunk) {
    const float* q = p + c / 4;
    __m256 acc[8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (long j = 0; j < kRun; j += 8)
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_add_ps(acc[r], _mm256_loadu_ps(q + r * kRun + j));
    for (int r = 1; r < 8; ++r) acc[0] = _mm256_add_ps(acc[0], acc[r]);
    float out[8];
    _mm256_storeu_ps(out, acc[0]);
    total += out[0];
  }
  return total;
}

__attribute__((target("avx512f"))) float read_stream(const float* p, long bytes) {
  const long n = bytes / 4;
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (long j = 0; j < n; j += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(p + j) + 2048, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + j) + 2048 + 64, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + j) + 2048 + 128, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + j) + 2048 + 192, _MM_HINT_T0);
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + j));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + j + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + j + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + j + 48));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Runs f(thread index) on `threads` threads started together; returns the wall time.
template <class F>
double timed(int threads, const F& f) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i)
    pool.emplace_back([&, i] {
      ready.fetch_add(1);
      while (!go.load()) std::this_thread::yield();
      f(i);
    });
  while (ready.load() < threads) std::this_thread::yield();
  const double t0 = now();
  go.store(true);
  for (auto& t : pool) t.join();
  return now() - t0;
}

volatile float sink;

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && !(argc == 4 && std::strcmp(argv[2], "read") == 0)) {
    std::fprintf(stderr, "usage: %s <threads> fma256|fma512|bf16|vnni|amx_bf16|amx_int8|amx_bf16_loads|read\n",
                 argv[0]);
    return 2;
  }
  const int threads = std::max(1, std::atoi(argv[1]));
  const char* what = argv[2];
  __builtin_cpu_init();
  const bool amx = __builtin_cpu_supports("amx-tile") && amx_permitted();
  // ops per loop iteration and thread: 24 chains x lanes x (2 for a multiply-add) x pairs per lane
  struct Loop {
    const char* name;
    bool supported;
    float (*fn)(long);
    double ops;
  } loops[] = {
      {"fma256", __builtin_cpu_supports("fma") != 0, fma256, 24 * 8 * 2},
      {"fma512", __builtin_cpu_supports("avx512f") != 0, fma512, 24 * 16 * 2},
      {"bf16", __builtin_cpu_supports("avx512bf16") != 0, bf16, 24 * 16 * 2 * 2},
      {"vnni", __builtin_cpu_supports("avx512vnni") != 0, vnni, 24 * 16 * 2 * 4},
      // per iteration 4 tile products of 16 x 16 lanes x 16 pairs (bf16) or 16 quads (int8)
      {"amx_bf16", amx && __builtin_cpu_supports("amx-bf16") != 0, amx_bf16, 4 * 16 * 16 * 16 * 2 * 2},
      {"amx_int8", amx && __builtin_cpu_supports("amx-int8") != 0, amx_int8, 4 * 16 * 16 * 16 * 2 * 4},
      {"amx_bf16_loads", amx && __builtin_cpu_supports("amx-bf16") != 0, amx_bf16_loads, 4 * 16 * 16 * 16 * 2 * 2},
  };
  for (const auto& l : loops) {
    if (std::strcmp(what, l.name) != 0) continue;
    if (!l.supported) {
      std::printf("unsupported\n");
      return 0;
    }
    const long iters = std::strncmp(l.name, "amx", 3) == 0 ? kIters / 16 : kIters;  // ~16 cycles a tile product
    const double s = timed(threads, [&](int) { sink = l.fn(iters); });
    std::printf("%.2f\n", l.ops * double(iters) * threads / s / 1e9);
    return 0;
  }
  if (std::strcmp(what, "read") == 0) {
    // 512 MiB per thread by default, well past the L3 of most machines: memory's bandwidth. With a
    // size (bytes, all threads together: a decode step's), the bandwidth of re-reading that working set,
    // which a large L3 partly holds from one pass to the next as it holds the weights from one decode step
    // to the next (the Xeon of 2026-12-06 reports 480 MB of L3). The memset faults the pages in and is
    // the first pass; then the best of 3 rounds.
    constexpr long kUnit = 256 << 10;  // the chunks pattern's chunk
    const long per = argc == 4 ? std::max(kUnit, std::atol(argv[3]) / threads / kUnit * kUnit) : 512L << 20;
    std::vector<float*> bufs(threads);
    for (int i = 0; i < threads; ++i) {
      bufs[i] = static_cast<float*>(std::aligned_alloc(64, per));
      std::memset(bufs[i], 1, per);
    }
    struct Pattern {
      const char* name;
      bool supported;
      float (*fn)(const float*, long);
    } patterns[] = {{"runs", true, read_runs},
                    {"chunks", true, read_chunks},
                    {"stream", __builtin_cpu_supports("avx512f") != 0, read_stream}};
    double best = 0;
    for (int rep = 0; rep < 3; ++rep)  // the patterns take turns: each sees the same machine
      for (const auto& pat : patterns) {
        if (!pat.supported) continue;
        const double s = timed(threads, [&](int i) { sink = pat.fn(bufs[i], per); });
        const double gb_s = double(per) * threads / s / 1e9;
        std::fprintf(stderr, "read %s %.2f GB/s\n", pat.name, gb_s);
        best = std::max(best, gb_s);
      }
    for (auto* b : bufs) std::free(b);
    std::printf("%.2f\n", best);
    return 0;
  }
  std::fprintf(stderr, "unknown: %s\n", what);
  return 2;
}
