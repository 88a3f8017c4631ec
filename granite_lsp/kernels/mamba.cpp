// A Mamba2 mixer between in_proj and out_proj (conv, selective scan, gated norm), fused, any T.
#include <type_traits>

#include "common.h"
#include "ops.h"

namespace granite {
namespace {

// ---------------------------------------------------------------------------------------------
// A Mamba2 mixer between its two projections, for T >= 1 tokens: the causal conv, the selective
// scan and the gated RMSNorm, continuing from (and updating) the conv and SSM states.
//
// Below kChunkedMinTokens tokens (decode, small edits, speculative decoding's verify rows) the scan
// is the plain recurrence S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t, one head per
// task: a head's state (P x N fp32, 16 KB) stays in L1 for all T tokens, a multiply and two FMAs
// per state element per token. Where the head dim is a multiple of 8 (every real shape) the conv, dt
// and gate of those tokens run in the same pass per head (rows_head below), with the same operations
// on every value. Longer inputs (prefill) take the chunked matmul form
// (mamba_head_chunked below): two FMAs per state element per token, in register tiles (in torch
// ops that form spent more time in small-op overhead than in math; here it has none). A 512-token
// mixer on the real shape (1 thread, CPU time, noisy shared machine, the two builds alternating):
// 11.6-13.7 ms with the recurrence, 10.1-10.9 chunked.
//
// Tokens go in pairs: one load and one store of the state per pair halves the state's memory
// traffic, which with the three FP operations per element bounds the loop. With each token's B
// and C in one contiguous row (not at a whole conv row's stride) a 512-token mixer on the real
// shape went from 23.5 to 15.8-20.7 ms (1 thread) and 13.0 to 9.5-10.3 ms (2 threads). (Results
// are those of one token at a time. The conv's scalar tail, std::exp against exp8's 1-2 ulp,
// takes the last E % 8 channels of x and the last (C - E) % 8 of B, C: none on Granite's shape.)

constexpr int64_t kMaxConvWidth = 16;
constexpr int64_t kMaxHeadDim = 256;  // kernels.MAMBA_MAX_HEAD_DIM
constexpr int64_t kPrefetchTokens = 8;

// A scan row's width in `Deferral`'s rows (x dt [E], B [G N], decay [H]), and where a head's parts are.
struct ScanRowLayout {
  int64_t E, GN, H;
  int64_t width() const { return E + GN + H; }
  int64_t B(int64_t g, int64_t N) const { return E + g * N; }
  int64_t decay(int64_t h) const { return E + GN + h; }
};

// Beside its rows, a call of a few rows (the recurrence: T <= kMaxStreamRows) can take care of what
// runtime/state.py's ModelState defers (why: state.py's Journal):
// - `deferred` [n_deferred, E + G N + H]: rows the state has not advanced over yet, applied in place
//   before the new ones (each row's x dt, B and decay, as `exported` leaves them);
// - `exported` [T - 1, E + G N + H], when not null (T >= 2): the first new row advances the state, the
//   others a copy of it, which is then dropped, and leave their x dt, B and decay there instead (a
//   journaled verify: the first row always stays, the others may not).
struct Deferral {
  const float* deferred = nullptr;
  int64_t n_deferred = 0;
  float* exported = nullptr;

  // Token t's part of head h (x dt of its P channels, its decay) in the exported rows (the first token is
  // not exported: it advances the state).
  void export_head(const ScanRowLayout& lay, int64_t t, int64_t h, const float* xdt, int64_t P, float decay) const {
    if (!exported || t == 0) return;
    float* row = exported + (t - 1) * lay.width();
    std::memcpy(row + h * P, xdt, sizeof(float) * size_t(P));
    row[lay.decay(h)] = decay;
  }
  // Every exported token's B (the first G N of its row of B and C after the conv, rows of bc_width).
  void export_B(const ScanRowLayout& lay, const float* bc, int64_t bc_width, int64_t T) const {
    if (!exported) return;
    for (int64_t t = 1; t < T; ++t)
      std::memcpy(exported + (t - 1) * lay.width() + lay.E, bc + t * bc_width, sizeof(float) * size_t(lay.GN));
  }
};

// Rows of [conv state; the rows' raw conv inputs], the causal conv's window: token t's is rows t ..
// t + K - 1, row j the state's while j < K - 1, else raw input j - (K - 1).
struct ConvWindow {
  float* cs;        // [K - 1, C]
  const float* in;  // zxbcdt [T, W], the conv inputs from column E
  int64_t C, K, W, E;
  const float* row(int64_t j) const { return j < K - 1 ? cs + j * C : in + (j - (K - 1)) * W + E; }
  void of_token(int64_t t, const float** src) const {
    for (int64_t j = 0; j < K; ++j) src[j] = row(t + j);
  }
  // Channels [c0, c1) of the conv state, which keeps the last K - 1 raw inputs, after T tokens (partly
  // old state when T < K - 1; in increasing order, each row read before it is overwritten), and of the
  // state after the first token into `saved` first (null: not wanted).
  void advance(int64_t T, int64_t c0, int64_t c1, float* saved) const {
    const size_t bytes = sizeof(float) * size_t(c1 - c0);
    if (saved)
      for (int64_t j = 0; j + 1 < K; ++j) std::memcpy(saved + j * C + c0, row(1 + j) + c0, bytes);
    for (int64_t j = 0; j + 1 < K; ++j) std::memcpy(cs + j * C + c0, row(T + j) + c0, bytes);
  }
};

struct MambaScan {
  float* ssm;          // [H, P, N]
  const float* x;      // conv output (after SiLU), the x part [T, E]
  const float* bc;     // ... and the B, C part [T, 2 G N]: each token's B and C contiguous
  const float* dt;     // [T, H]
  const float* decay;  // [T, H]
  float* y;            // [T, E]
  int64_t T, H, P, N, G, E;
  Deferral rows;
};

// One state value's update for one token: decay, then + x dt B, in one rounding (the vector loops'
// FMA). Every path that advances a state (state_row, state_rows4, advance_head) gives a value these
// operations, so applying a row later (a deferred one) changes no bit.
inline float scan_update(float s, float decay, float xdt, float b) { return std::fma(xdt, b, s * decay); }

// One state row (N values) for one token: decay, add xdt * B, read out through C. The row is read from
// `src` and written to `s` (the same row, or its copy's: a verify's rows after the first run on a copy
// of the head's state; null: nowhere, the last token of a copy that is dropped).
inline float state_row(const float* src, float* s, int64_t N, const float* B, const float* Cv, float xdt, float decay) {
  const __m256 xv = _mm256_set1_ps(xdt), d = _mm256_set1_ps(decay);
  __m256 acc = _mm256_setzero_ps();
  int64_t n = 0;
  for (; n + 8 <= N; n += 8) {
    const __m256 sv = _mm256_fmadd_ps(xv, _mm256_loadu_ps(B + n), _mm256_mul_ps(_mm256_loadu_ps(src + n), d));
    if (s) _mm256_storeu_ps(s + n, sv);
    acc = _mm256_fmadd_ps(sv, _mm256_loadu_ps(Cv + n), acc);
  }
  float out = hsum(acc);
  for (; n < N; ++n) {
    const float v = scan_update(src[n], decay, xdt, B[n]);
    if (s) s[n] = v;
    out += v * Cv[n];
  }
  return out;
}

// P rows of a head's state [P, N] advanced over one token with no read-out (a deferred row, whose
// output was read when it was first fed), as state_row advances each value.
inline void advance_head(float* s, int64_t P, int64_t N, const float* xdt, const float* B, float decay) {
  const __m256 d = _mm256_set1_ps(decay);
  for (int64_t p = 0; p < P; ++p, s += N) {
    const __m256 xv = _mm256_set1_ps(xdt[p]);
    int64_t n = 0;
    for (; n + 8 <= N; n += 8)
      _mm256_storeu_ps(s + n, _mm256_fmadd_ps(xv, _mm256_loadu_ps(B + n), _mm256_mul_ps(_mm256_loadu_ps(s + n), d)));
    for (; n < N; ++n) s[n] = scan_update(s[n], decay, xdt[p], B[n]);
  }
}

// Rows [p0, p1) of head h's state (`state` is the head's row 0; P rows in all) advanced over the
// deferred rows of `r` (none when there are none).
inline void apply_deferred(float* state, const Deferral& r, const ScanRowLayout& lay, int64_t h, int64_t g, int64_t P,
                           int64_t N, int64_t p0 = 0, int64_t p1 = -1) {
  if (p1 < 0) p1 = P;
  for (int64_t i = 0; i < r.n_deferred; ++i) {
    const float* row = r.deferred + i * lay.width();
    advance_head(state + p0 * N, p1 - p0, N, row + h * P + p0, row + lay.B(g, N), row[lay.decay(h)]);
  }
}

// One token as the scan sees it: its B and C, x * dt of the head's rows, its decay, where its y goes.
struct TokenRows {
  const float *B, *C, *xdt;
  float decay, *y;
  TokenRows from(int64_t p) const { return {B, C, xdt + p, decay, y + p}; }  // the rows from p on
};

// Four state rows at once (N % 8 == 0): four independent FMA chains for the read-out (one chain
// waits on FMA latency) sharing the B and C loads. Named variables: as arrays GCC keeps them in
// memory.
// Without Store the rows are read out and not written (the last token of a copy that is dropped: a verify's
// rows on a copy of the state, rows_head, whose lines would only push the state's out of L1).
template <bool Store = true>
inline void state_rows4(const float* src, float* s, int64_t N, const TokenRows& tr) {
  const float *B = tr.B, *Cv = tr.C, *xdt = tr.xdt;
  float* y = tr.y;
  const __m256 d = _mm256_set1_ps(tr.decay);
  const __m256 x0 = _mm256_set1_ps(xdt[0]), x1 = _mm256_set1_ps(xdt[1]), x2 = _mm256_set1_ps(xdt[2]),
               x3 = _mm256_set1_ps(xdt[3]);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  float *s0 = s, *s1 = s + N, *s2 = s + 2 * N, *s3 = s + 3 * N;
  const float *r0 = src, *r1 = src + N, *r2 = src + 2 * N, *r3 = src + 3 * N;
  for (int64_t n = 0; n < N; n += 8) {
    const __m256 b = _mm256_loadu_ps(B + n), c = _mm256_loadu_ps(Cv + n);
#define GRANITE_STATE_ROW(i)                                                                \
  {                                                                                         \
    const __m256 v = _mm256_fmadd_ps(x##i, b, _mm256_mul_ps(_mm256_loadu_ps(r##i + n), d)); \
    if constexpr (Store) _mm256_storeu_ps(s##i + n, v);                                     \
    a##i = _mm256_fmadd_ps(v, c, a##i);                                                     \
  }
    GRANITE_STATE_ROW(0) GRANITE_STATE_ROW(1) GRANITE_STATE_ROW(2) GRANITE_STATE_ROW(3)
#undef GRANITE_STATE_ROW
  }
  y[0] = hsum(a0);
  y[1] = hsum(a1);
  y[2] = hsum(a2);
  y[3] = hsum(a3);
}

// The same for two consecutive tokens a, b in one pass over the rows: the state is loaded and
// stored once per pair instead of once per token. Each value goes through the same operations in
// the same order as two calls of state_rows4, so the results are identical.
// With Mid, the rows after token a are also stored to `mid` (a verify's first row, which stays); Store as
// in state_rows4, for the rows after token b.
template <bool Mid = false, bool Store = true>
inline void state_rows4_pair(const float* src, float* s, int64_t N, const TokenRows& ta, const TokenRows& tb,
                             float* mid = nullptr) {
  const __m256 da = _mm256_set1_ps(ta.decay), db = _mm256_set1_ps(tb.decay);
  const __m256 x0 = _mm256_set1_ps(ta.xdt[0]), x1 = _mm256_set1_ps(ta.xdt[1]), x2 = _mm256_set1_ps(ta.xdt[2]),
               x3 = _mm256_set1_ps(ta.xdt[3]);
  const __m256 w0 = _mm256_set1_ps(tb.xdt[0]), w1 = _mm256_set1_ps(tb.xdt[1]), w2 = _mm256_set1_ps(tb.xdt[2]),
               w3 = _mm256_set1_ps(tb.xdt[3]);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, e0 = a0, e1 = a0, e2 = a0, e3 = a0;
  float *s0 = s, *s1 = s + N, *s2 = s + 2 * N, *s3 = s + 3 * N;
  const float *r0 = src, *r1 = src + N, *r2 = src + 2 * N, *r3 = src + 3 * N;
  float *m0 = mid, *m1 = m0, *m2 = m0, *m3 = m0;  // (no arithmetic on a null `mid`)
  if constexpr (Mid) m1 = mid + N, m2 = mid + 2 * N, m3 = mid + 3 * N;
  for (int64_t n = 0; n < N; n += 8) {
    const __m256 ba = _mm256_loadu_ps(ta.B + n), ca = _mm256_loadu_ps(ta.C + n);
    const __m256 bb = _mm256_loadu_ps(tb.B + n), cb = _mm256_loadu_ps(tb.C + n);
#define GRANITE_STATE_ROW_PAIR(i)                                                       \
  {                                                                                     \
    __m256 v = _mm256_fmadd_ps(x##i, ba, _mm256_mul_ps(_mm256_loadu_ps(r##i + n), da)); \
    if constexpr (Mid) _mm256_storeu_ps(m##i + n, v);                                   \
    a##i = _mm256_fmadd_ps(v, ca, a##i);                                                \
    v = _mm256_fmadd_ps(w##i, bb, _mm256_mul_ps(v, db));                                \
    if constexpr (Store) _mm256_storeu_ps(s##i + n, v);                                 \
    e##i = _mm256_fmadd_ps(v, cb, e##i);                                                \
  }
    GRANITE_STATE_ROW_PAIR(0) GRANITE_STATE_ROW_PAIR(1) GRANITE_STATE_ROW_PAIR(2) GRANITE_STATE_ROW_PAIR(3)
#undef GRANITE_STATE_ROW_PAIR
  }
  ta.y[0] = hsum(a0);
  ta.y[1] = hsum(a1);
  ta.y[2] = hsum(a2);
  ta.y[3] = hsum(a3);
  tb.y[0] = hsum(e0);
  tb.y[1] = hsum(e1);
  tb.y[2] = hsum(e2);
  tb.y[3] = hsum(e3);
}

// The most state floats a head may have where a call's rows advance a copy of it (Deferral::exported:
// the copy is a buffer on the task's stack, 128 KB; kernels.MAMBA_MAX_EXPORT_STATE, where a model whose
// heads are larger verifies layer by layer).
constexpr int64_t kLocalStateFloats = 32768;

void mamba_head(const void* ctx, int64_t h) {
  const auto& m = *static_cast<const MambaScan*>(ctx);
  const int64_t g = h / (m.H / m.G), P = m.P, N = m.N;
  const int64_t P4 = N % 8 == 0 ? P / 4 * 4 : 0;
  const ScanRowLayout lay{m.E, m.G * N, m.H};
  alignas(64) float local[kLocalStateFloats];
  float* const from = m.ssm + h * P * N;
  apply_deferred(from, m.rows, lay, h, g, P, N);  // in place
  float* state = from;                            // with exported rows: the first row in place, then `local` (below)
  auto token = [&](int64_t t, float* xdt) {
    const float* bc = m.bc + t * 2 * m.G * m.N;
    const float dt = m.dt[t * m.H + h];
    for (int64_t p = 0; p < P; ++p) xdt[p] = m.x[t * m.E + h * P + p] * dt;
    // This head's x a few tokens ahead: a token's P values sit a whole row (E floats, 6 KB) after
    // the last token's, too far apart for the hardware prefetcher, and waiting on them was ~20% of
    // the scan. Prefetched, a 512-token mixer on the real shape took 15-18 ms (1 thread) where it
    // took 17-23 (same results: only the loads' timing changes). Laid out head-major instead, the
    // conv's and the gate's accesses became the strided ones, and the mixer got slower.
    if (t + kPrefetchTokens < m.T) {
      const char* next = reinterpret_cast<const char*>(m.x + (t + kPrefetchTokens) * m.E + h * P);
      for (int64_t b = 0; b < P * int64_t(sizeof(float)); b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
    }
    const float decay = m.decay[t * m.H + h];
    m.rows.export_head(lay, t, h, xdt, P, decay);  // (the caller exports B)
    return TokenRows{bc + g * N, bc + m.G * N + g * N, xdt, decay, m.y + t * m.E + h * P};
  };
  // the rows that the four-row kernels do not take, one token at a time
  auto rest = [&](const TokenRows& tr) {
    for (int64_t p = P4; p < P; ++p)
      tr.y[p] = state_row(state + p * N, state + p * N, N, tr.B, tr.C, tr.xdt[p], tr.decay);
  };
  float xdt[2 * kMaxHeadDim];  // a pool task allocates nothing (so it cannot throw)
  int64_t t = 0;
  if (m.rows.exported) {  // the first row in place (it stays), the others on a copy
    const TokenRows a = token(0, xdt);
    for (int64_t p = 0; p < P4; p += 4) state_rows4(state + p * N, state + p * N, N, a.from(p));
    rest(a);
    std::memcpy(local, from, sizeof(float) * size_t(P * N));
    state = local;
    t = 1;
  }
  for (; t + 2 <= m.T; t += 2) {
    const TokenRows a = token(t, xdt), b = token(t + 1, xdt + P);
    for (int64_t p = 0; p < P4; p += 4) state_rows4_pair(state + p * N, state + p * N, N, a.from(p), b.from(p));
    rest(a);
    rest(b);
  }
  if (t < m.T) {
    const TokenRows a = token(t, xdt);
    for (int64_t p = 0; p < P4; p += 4) state_rows4(state + p * N, state + p * N, N, a.from(p));
    rest(a);
  }
}

// Causal depthwise conv + SiLU of channels [c0, c1) of one token, its window's K rows in src (the
// oldest first), into o: 8 channels at a time on vectors, the rest with std::exp's SiLU. Every path
// (any T, the decode token's heads) calls this one, so a channel's value never depends on the path.
void conv_span(const float* const* src, const float* cw, const float* cb, int64_t C, int64_t K, int64_t c0, int64_t c1,
               float* o) {
  int64_t c = c0;
  for (; c + 8 <= c1; c += 8, o += 8) {
    __m256 acc = cb ? _mm256_loadu_ps(cb + c) : _mm256_setzero_ps();
    for (int64_t j = 0; j < K; ++j)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(src[j] + c), _mm256_loadu_ps(cw + j * C + c), acc);
    _mm256_storeu_ps(o, silu8(acc));
  }
  for (; c < c1; ++c, ++o) {
    float acc = cb ? cb[c] : 0.0f;
    for (int64_t j = 0; j < K; ++j) acc += src[j][c] * cw[j * C + c];
    *o = silu(acc);
  }
}

// dt = clamp(softplus(raw + bias)), as in runtime/ssm.py.
inline float softplus_dt(float raw, float bias, float dt_min, float dt_max) {
  const float v = raw + bias;
  const float sp = v > 20.0f ? v : std::log1p(std::exp(v));
  return std::min<float>(std::max<float>(sp, dt_min), dt_max);
}

// log(w) for w in [1, 2] (Cephes logf: w = m 2^e with m in [sqrt(1/2), sqrt(2)), a degree-9 polynomial
// in m - 1; ~1 ulp).
inline __m256 log8_1_2(__m256 w) {
  const __m256 big = _mm256_cmp_ps(w, _mm256_set1_ps(1.41421356237f), _CMP_GE_OQ);
  const __m256 f =
      _mm256_sub_ps(_mm256_blendv_ps(w, _mm256_mul_ps(w, _mm256_set1_ps(0.5f)), big), _mm256_set1_ps(1.0f));
  const __m256 e = _mm256_and_ps(big, _mm256_set1_ps(1.0f));
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  for (const float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f,
                        2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f})
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}

// softplus_dt on 8 heads (a prefill's ~700 K scalar log1p(exp()) calls were ~1% of it): softplus(v) =
// max(v, 0) + log1p(exp(-|v|)), log1p(u) = log(1 + u) u / ((1 + u) - 1) (exact where 1 + u rounds to 1:
// u), and v itself above 20 as torch; the clamps keep a NaN (max and min return their second operand).
inline __m256 softplus_dt8(__m256 raw, __m256 bias, float dt_min, float dt_max) {
  const __m256 v = _mm256_add_ps(raw, bias), one = _mm256_set1_ps(1.0f);
  const __m256 u = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v)));
  const __m256 w = _mm256_add_ps(one, u), wm1 = _mm256_sub_ps(w, one);
  const __m256 l1p = _mm256_blendv_ps(_mm256_div_ps(_mm256_mul_ps(log8_1_2(w), u), wm1), u,
                                      _mm256_cmp_ps(wm1, _mm256_setzero_ps(), _CMP_EQ_OQ));
  __m256 sp = _mm256_add_ps(_mm256_max_ps(_mm256_setzero_ps(), v), l1p);
  sp = _mm256_blendv_ps(sp, v, _mm256_cmp_ps(v, _mm256_set1_ps(20.0f), _CMP_GT_OQ));
  return _mm256_min_ps(_mm256_set1_ps(dt_max), _mm256_max_ps(_mm256_set1_ps(dt_min), sp));
}

// dt as softplus_dt, and decay = exp(max(dt * A, -80)), as in runtime/ssm.py.
inline void dt_decay(float raw, float bias, float A, float dt_min, float dt_max, float* dt, float* decay) {
  const float sp = softplus_dt(raw, bias, dt_min, dt_max);
  *dt = sp;
  *decay = std::exp(std::max(sp * A, -80.0f));
}

// One head's y (its P channels, from the head's first one in y, x and z): the D skip, gated by silu(z).
inline void gate_head(float* y, const float* x, const float* z, float Dh, int64_t P) {
  const __m256 d = _mm256_set1_ps(Dh);
  int64_t i = 0;
  for (; i + 8 <= P; i += 8) {
    const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), d, _mm256_loadu_ps(y + i));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(v, silu8(_mm256_loadu_ps(z + i))));
  }
  for (; i < P; ++i) y[i] = (y[i] + x[i] * Dh) * silu(z[i]);
}

// ---------------------------------------------------------------------------------------------
// A few tokens (T <= kMaxStreamRows: a decode step, a verify's rows, a short edit) in one pass per
// head, the heads shared between the threads: the head's conv channels and SiLU for every row, its
// conv-state channels shifted, its dt and decay, its state rows, its gate. The general path ran the
// conv, dt and gate on one thread between three pool jobs, over scratch buffers and a copy of the
// whole conv state (a 2-row verify's mixers on the real shape: ~+0.65 ms over one row's, this ~+0.2);
// here only B and C's conv (shared by a group's heads) and the group norm stay on the calling thread.
// Each value goes through the same functions in the same order (conv_span over channels that start at
// a multiple of 8 with P % 8 == 0, dt_decay, state_rows4(_pair) / state_row, gate_head), so the
// results are the general path's bits: a token decoded alone equals the same token inside a batch
// (speculative decoding relies on it).

struct FewRows {
  float* ssm;       // [H, P, N]
  float* cs;        // conv state [K - 1, C]
  const float* in;  // the rows' zxbcdt [T, W]
  const float* cw;  // [K, C]
  const float* cb;  // [C] or null
  const float* bc;  // the rows' B and C after the conv [T, 2 G N]
  const float *db, *A, *D;
  float* y;           // [T, E]
  float* conv_saved;  // [K - 1, C] or null: the conv state after the first row
  int64_t T, H, P, N, G, E, C, K, W;
  float dt_min, dt_max;
  Deferral rows;
};

// Bytes of a head's state prefetched ahead of the rows being updated (rows_head).
constexpr int64_t kStatePrefetch = 8192;

void rows_head(const void* ctx, int64_t h) {
  const auto& d = *static_cast<const FewRows*>(ctx);
  const int64_t T = d.T, P = d.P, N = d.N, C = d.C, E = d.E, K = d.K, W = d.W, c0 = h * P;
  const int64_t g = h / (d.H / d.G);
  const ScanRowLayout lay{E, d.G * N, d.H};
  const ConvWindow window{d.cs, d.in, C, K, W, E};
  float x[kMaxStreamRows * kMaxHeadDim], xdt[2 * kMaxHeadDim];  // a pool task allocates nothing (cannot throw)
  float dt[kMaxStreamRows], decay[kMaxStreamRows];
  const float* src[kMaxConvWidth];
  for (int64_t t = 0; t < T; ++t) {
    window.of_token(t, src);
    conv_span(src, d.cw, d.cb, C, K, c0, c0 + P, x + t * P);
    dt_decay(d.in[t * W + E + C + h], d.db[h], d.A[h], d.dt_min, d.dt_max, dt + t, decay + t);
  }
  window.advance(T, c0, c0 + P, d.conv_saved);  // this head's channels of the conv state
  // The state is read from memory (the weights streamed since the last step have evicted it), and the
  // hardware prefetcher does not run far enough ahead on a head's 16 KB: prefetched kStatePrefetch bytes
  // ahead, 28 real-shape decode mixers took 0.67-0.84x the CPU time on one thread and 0.76-0.90x the
  // wall time on two (same process, alternating rounds; three runs on one thread, two on two, loaded
  // machine; bits unchanged). The first token (pair) passes over the state block by block as it comes
  // in: the deferred rows applied to each block in place just before, and with exported rows the state
  // after the first token written back in place and the state after the second to a copy on the stack
  // (which the later pairs update): the state is read and written once, as in a plain step. (A
  // separate pass for the deferred rows and a copy of the head before the scan cost ~0.5 ms of CPU per
  // int8 verify.)
  alignas(64) float local[kLocalStateFloats];
  float* const from = d.ssm + h * P * N;
  float* const state = d.rows.exported ? local : from;
  float* const mid = d.rows.exported ? from : nullptr;  // where the first token leaves the state
  const char* const base = reinterpret_cast<const char*>(from);
  const int64_t row_bytes = N * int64_t(sizeof(float)), bytes = P * row_bytes;
  auto prefetch = [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < std::min(b, bytes); i += 64) _mm_prefetch(base + i, _MM_HINT_T0);
  };
  prefetch(0, kStatePrefetch);
  auto token = [&](int64_t t, float* xt) {
    for (int64_t p = 0; p < P; ++p) xt[p] = x[t * P + p] * dt[t];
    d.rows.export_head(lay, t, h, xt, P, decay[t]);  // (the caller exports B)
    const float* bc = d.bc + t * 2 * d.G * N;
    return TokenRows{bc + g * N, bc + d.G * N + g * N, xt, decay[t], d.y + t * E + c0};
  };
  const int64_t P4 = N % 8 == 0 ? P / 4 * 4 : 0;
  // before the first pass reads rows [p0, p1): prefetch further ahead, apply the deferred rows
  auto arrive = [&](int64_t p0, int64_t p1) {
    prefetch(kStatePrefetch + p0 * row_bytes, kStatePrefetch + p1 * row_bytes);
    apply_deferred(from, d.rows, lay, h, g, P, N, p0, p1);
  };
  // the rows the four-row kernels do not take, one token; `to` null: not stored (see state_row)
  auto rest = [&](const float* src, float* to, const TokenRows& tr) {
    for (int64_t p = P4; p < P; ++p)
      tr.y[p] = state_row(src + p * N, to ? to + p * N : nullptr, N, tr.B, tr.C, tr.xdt[p], tr.decay);
  };
  int64_t t = 0;
  for (; t + 2 <= T; t += 2) {
    const TokenRows a = token(t, xdt), b = token(t + 1, xdt + P);
    const float* src = t == 0 ? from : state;
    const bool stay = mid && t == 0, drop = d.rows.exported && t + 2 == T;  // drop: the copy's last state
    for (int64_t p = 0; p < P4; p += 4) {
      if (t == 0) arrive(p, p + 4);
      const float* r = src + p * N;
      float* w = state + p * N;
      if (stay && drop) {
        state_rows4_pair<true, false>(r, w, N, a.from(p), b.from(p), mid + p * N);
      } else if (stay) {
        state_rows4_pair<true, true>(r, w, N, a.from(p), b.from(p), mid + p * N);
      } else if (drop) {
        state_rows4_pair<false, false>(r, w, N, a.from(p), b.from(p));
      } else {
        state_rows4_pair(r, w, N, a.from(p), b.from(p));
      }
    }
    if (t == 0) arrive(P4, P);
    rest(src, stay ? from : state, a);  // a verify's first token in place
    rest(stay ? from : state, drop ? nullptr : state, b);
  }
  if (t < T) {
    const TokenRows a = token(t, xdt);
    const float* src = t == 0 ? from : state;
    const bool drop = d.rows.exported != nullptr;  // a verify's last token (it has at least two)
    for (int64_t p = 0; p < P4; p += 4) {
      if (t == 0) arrive(p, p + 4);
      if (drop) {
        state_rows4<false>(src + p * N, state + p * N, N, a.from(p));
      } else {
        state_rows4(src + p * N, state + p * N, N, a.from(p));
      }
    }
    if (t == 0) arrive(P4, P);
    rest(src, drop ? nullptr : state, a);
  }
  for (int64_t r = 0; r < T; ++r) gate_head(d.y + r * E + c0, x + r * P, d.in + r * W + c0, d.D[h], P);
}

// ---------------------------------------------------------------------------------------------
// The scan for prefill (T >= kChunkedMinTokens): the same recurrence in chunks of kScanChunk tokens,
// in its matmul form ("SSD"), one head per task. With a[t] the log-decay summed from the chunk's
// start through token t, s0 the state entering the chunk and xdt_j = dt_j x_j:
//
//   (1) y_t = exp(a_t) C_t s0                          (the entering state, read out)
//   (2)     + sum_{j <= t} exp(a_t - a_j) (C_t . B_j) xdt_j   (the chunk's own tokens)
//   (3) s_L = exp(a_L) s0 + sum_j exp(a_L - a_j) xdt_j B_j^T  (the state leaving it)
//
// (1) and (3) are P * N multiply-adds per token each, (2) L * P: ~8.7 K FMAs per token and head on
// the real shape (P 32, N 128, L 16) where the recurrence issues ~12 K vector operations (a multiply
// and two FMAs per state element), and as register tiles (the state held transposed, [N][P], for the
// call: rows of P are what both products broadcast against) rather than a load and a store of the
// state per token pair and a horizontal sum per row and token. C_t . B_j is shared by the heads of a
// group (computed once per chunk, before the heads). Every decay factor is exp of a difference <= 0,
// clamped at -80 like the recurrence's (runtime/ssm.py's chunked scan does the same): nothing can
// overflow, and a token only ever reaches the rows at and after it (no masked products: a NaN stays
// causal). The results differ from the recurrence's by rounding (tests/test_runtime.py holds both
// to the torch ops and to float64); below kChunkedMinTokens tokens (decode, speculative decoding's
// verify rows) the recurrence above runs, so those rows keep the bits a decode step gives.

constexpr int64_t kScanChunk = 16;
constexpr int64_t kChunkedMinTokens = kMaxStreamRows + 1;  // ops.h: where the prefill GEMM starts too
constexpr int64_t kChunkedMaxStateFloats = 1 << 15;        // the transposed state on a task's stack (128 KB)

struct ChunkedScan {
  const MambaScan* m;
  const float* xdt;  // [H][T][P]: dt_t x_t, head-major (a chunk's rows of a head contiguous)
  const float* cb;   // [chunks][G][L][L]: C_t . B_j for j <= t
  const float* A;    // [H]
  int64_t chunks;
};

// C_t . B_j of every chunk and group (j <= t), chunks in parallel, and zeros above the diagonal (j > t):
// mamba_head_chunked's 8-wide products of a token's row read those lanes too (and never use them).
void chunk_cb(const MambaScan& m, float* cb, int64_t c0, int64_t c1) {
  const int64_t L = kScanChunk, N = m.N;
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t g = 0; g < m.G; ++g) {
      float* out = cb + (c * m.G + g) * L * L;
      const int64_t len = std::min(L, m.T - c * L);
      for (int64_t t = 0; t < len; ++t) {
        const float* Ct = m.bc + (c * L + t) * 2 * m.G * N + m.G * N + g * N;
        for (int64_t j = 0; j <= t; ++j) {
          const float* Bj = m.bc + (c * L + j) * 2 * m.G * N + g * N;
          __m256 acc = _mm256_setzero_ps();
          int64_t n = 0;
          for (; n + 8 <= N; n += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(Ct + n), _mm256_loadu_ps(Bj + n), acc);
          float s = hsum(acc);
          for (; n < N; ++n) s += Ct[n] * Bj[n];
          out[t * L + j] = s;
        }
        for (int64_t j = t + 1; j < L; ++j) out[t * L + j] = 0.0f;
      }
    }
}

// y[r][p0 .. p0 + 8 V) = scale[r] * sum_n c[r][n] st[n][p0 ..] for R rows (c at stride ldc): (1).
template <int R, int V>
inline void readout_tile(const float* c, int64_t ldc, const float* st, int64_t P, int64_t N, const float* scale,
                         float* y, int64_t ldy) {
  __m256 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t n = 0; n < N; ++n) {
    __m256 s[V];
    for (int v = 0; v < V; ++v) s[v] = _mm256_loadu_ps(st + n * P + 8 * v);
    for (int r = 0; r < R; ++r) {
      const __m256 cv = _mm256_broadcast_ss(c + r * ldc + n);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(cv, s[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 sc = _mm256_set1_ps(scale[r]);
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(y + r * ldy + 8 * v, _mm256_mul_ps(acc[r][v], sc));
  }
}

// st[n][p0 .. p0 + 8 V) = keep * st[n][..] + sum_j b[j][n] w[j][..] for R rows n: (3).
template <int R, int V>
inline void update_tile(const float* b, int64_t ldb, const float* w, int64_t L, float* st, int64_t P, float keep) {
  __m256 acc[R][V];
  const __m256 k = _mm256_set1_ps(keep);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_mul_ps(_mm256_loadu_ps(st + r * P + 8 * v), k);
  for (int64_t j = 0; j < L; ++j) {
    __m256 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = _mm256_loadu_ps(w + j * P + 8 * v);
    for (int r = 0; r < R; ++r) {
      const __m256 bv = _mm256_broadcast_ss(b + j * ldb + r);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(bv, wv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(st + r * P + 8 * v, acc[r][v]);
}

// The column blocks of P: 16 wide (two registers) where they fit, then 8.
template <class F16W, class F8W>
inline void p_blocks(int64_t P, const F16W& sixteen, const F8W& eight) {
  int64_t p = 0;
  for (; p + 16 <= P; p += 16) sixteen(p);
  for (; p < P; p += 8) eight(p);
}

// exp(max(float(d), -80)) of 8 log-decays (two vectors of 4 doubles) through exp8: a NaN stays NaN.
inline __m256 decay8(__m256d lo, __m256d hi) {
  const __m256 d = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(lo)), _mm256_cvtpd_ps(hi), 1);
  return exp8(_mm256_max_ps(_mm256_set1_ps(-80.0f), d));  // max returns its second operand on a NaN
}

void mamba_head_chunked(const void* ctx, int64_t h) {
  const auto& cs = *static_cast<const ChunkedScan*>(ctx);
  const auto& m = *cs.m;
  const int64_t g = h / (m.H / m.G), P = m.P, N = m.N, L = kScanChunk, ld = 2 * m.G * N;
  float* state = m.ssm + h * P * N;
  alignas(32) float st[kChunkedMaxStateFloats];  // the state, [N][P]
  for (int64_t p = 0; p < P; ++p)
    for (int64_t n = 0; n < N; ++n) st[n * P + p] = state[p * N + n];
  alignas(32) float w[kScanChunk * kMaxHeadDim], mix[kScanChunk * kScanChunk];
  alignas(32) double a[kScanChunk];
  alignas(32) float ea[kScanChunk], tail[kScanChunk];
  const float Ah = cs.A[h];
  for (int64_t c = 0; c < cs.chunks; ++c) {
    const int64_t t0 = c * L, len = std::min(L, m.T - t0);
    const float* xdt = cs.xdt + (h * m.T + t0) * P;
    double run = 0.0;
    for (int64_t t = 0; t < L; ++t) {  // past len: the last value repeated (read by no result)
      if (t < len) run += double(std::max(m.dt[(t0 + t) * m.H + h] * Ah, -80.0f));  // the recurrence's log-decay
      a[t] = run;
    }
    // The decay factors, 8 at a time through exp8 (a prefill takes ~170 of them per chunk and head;
    // one std::exp call each was ~2% of the prefill): exp of a difference <= 0 taken in double, then
    // rounded and clamped at -80 as before.
    const __m256d last = _mm256_set1_pd(a[len - 1]);
    for (int64_t j = 0; j < L; j += 8) {
      const __m256d a0 = _mm256_load_pd(a + j), a1 = _mm256_load_pd(a + j + 4);
      _mm256_store_ps(ea + j, decay8(a0, a1));
      _mm256_store_ps(tail + j, decay8(_mm256_sub_pd(last, a0), _mm256_sub_pd(last, a1)));
    }
    // decay-weighted C_t . B_j (j <= t; the lanes past t are computed and never read: chunk_cb's zeros
    // times factors that may be +inf there, so NaN at worst), and each token's xdt weighted by its
    // decay to the chunk's end
    const float* cb = cs.cb + (c * m.G + g) * L * L;
    for (int64_t t = 0; t < len; ++t) {
      const __m256d at = _mm256_set1_pd(a[t]);
      for (int64_t j = 0; j <= t; j += 8) {
        const __m256 f = decay8(_mm256_sub_pd(at, _mm256_load_pd(a + j)), _mm256_sub_pd(at, _mm256_load_pd(a + j + 4)));
        _mm256_storeu_ps(mix + t * L + j, _mm256_mul_ps(f, _mm256_loadu_ps(cb + t * L + j)));
      }
    }
    for (int64_t j = 0; j < len; ++j) {
      const __m256 f = _mm256_set1_ps(tail[j]);
      for (int64_t p = 0; p < P; p += 8)
        _mm256_storeu_ps(w + j * P + p, _mm256_mul_ps(f, _mm256_loadu_ps(xdt + j * P + p)));
    }
    // (1): rows of tokens, 6 (or what is left) at a time
    float* y0 = m.y + t0 * m.E + h * P;
    const float* c0 = m.bc + t0 * ld + m.G * N + g * N;
    for (int64_t t = 0; t < len; t += 6) {
      const int rows = int(std::min<int64_t>(6, len - t));
      const float *ct = c0 + t * ld, *sc = ea + t;
      float* yt = y0 + t * m.E;
      // one tile of `rows` tokens by V vectors of head channels (rows and V fixed at compile time)
      auto tile = [&](auto vecs, int64_t p) {
        constexpr int V = decltype(vecs)::value;
        switch (rows) {
          case 6: readout_tile<6, V>(ct, ld, st + p, P, N, sc, yt + p, m.E); break;
          case 5: readout_tile<5, V>(ct, ld, st + p, P, N, sc, yt + p, m.E); break;
          case 4: readout_tile<4, V>(ct, ld, st + p, P, N, sc, yt + p, m.E); break;
          case 3: readout_tile<3, V>(ct, ld, st + p, P, N, sc, yt + p, m.E); break;
          case 2: readout_tile<2, V>(ct, ld, st + p, P, N, sc, yt + p, m.E); break;
          default: readout_tile<1, V>(ct, ld, st + p, P, N, sc, yt + p, m.E); break;
        }
      };
      p_blocks(
          P, [&](int64_t p) { tile(std::integral_constant<int, 2>{}, p); },
          [&](int64_t p) { tile(std::integral_constant<int, 1>{}, p); });
    }
    // (2): each token's row over the tokens up to it
    for (int64_t t = 0; t < len; ++t) {
      float* yt = y0 + t * m.E;
      for (int64_t p = 0; p < P; p += 8) {
        __m256 acc = _mm256_loadu_ps(yt + p);
        for (int64_t j = 0; j <= t; ++j)
          acc = _mm256_fmadd_ps(_mm256_set1_ps(mix[t * L + j]), _mm256_loadu_ps(xdt + j * P + p), acc);
        _mm256_storeu_ps(yt + p, acc);
      }
    }
    // (3): rows of the state (n), 6 at a time
    const float* b0 = m.bc + t0 * ld + g * N;
    const float keep = ea[len - 1];
    for (int64_t n = 0; n < N; n += 6) {
      const int rows = int(std::min<int64_t>(6, N - n));
      float* sn = st + n * P;
      const float* bn = b0 + n;
      p_blocks(
          P,
          [&](int64_t p) {
            switch (rows) {
              case 6: update_tile<6, 2>(bn, ld, w + p, len, sn + p, P, keep); break;
              case 5: update_tile<5, 2>(bn, ld, w + p, len, sn + p, P, keep); break;
              case 4: update_tile<4, 2>(bn, ld, w + p, len, sn + p, P, keep); break;
              case 3: update_tile<3, 2>(bn, ld, w + p, len, sn + p, P, keep); break;
              case 2: update_tile<2, 2>(bn, ld, w + p, len, sn + p, P, keep); break;
              default: update_tile<1, 2>(bn, ld, w + p, len, sn + p, P, keep); break;
            }
          },
          [&](int64_t p) {
            switch (rows) {
              case 6: update_tile<6, 1>(bn, ld, w + p, len, sn + p, P, keep); break;
              case 5: update_tile<5, 1>(bn, ld, w + p, len, sn + p, P, keep); break;
              case 4: update_tile<4, 1>(bn, ld, w + p, len, sn + p, P, keep); break;
              case 3: update_tile<3, 1>(bn, ld, w + p, len, sn + p, P, keep); break;
              case 2: update_tile<2, 1>(bn, ld, w + p, len, sn + p, P, keep); break;
              default: update_tile<1, 1>(bn, ld, w + p, len, sn + p, P, keep); break;
            }
          });
    }
  }
  for (int64_t p = 0; p < P; ++p)
    for (int64_t n = 0; n < N; ++n) state[p * N + n] = st[n * P + p];
}

}  // namespace

namespace {

// mamba_mixer, and (mamba_mixer_rows) with what a Deferral asks and the conv state after the first token
// written to conv_saved (non-null) on the way.
at::Tensor mixer(const at::Tensor& zxbcdt, const at::Tensor& conv_state, const at::Tensor& conv_w,
                 const std::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const at::Tensor& A,
                 const at::Tensor& D, const at::Tensor& ssm_state, const at::Tensor& norm_w, int64_t n_groups,
                 double eps, double dt_min, double dt_max, int64_t threads, float* conv_saved, const Deferral& rows) {
  const int64_t H = ssm_state.size(0), P = ssm_state.size(1), N = ssm_state.size(2);
  const int64_t E = H * P, G = n_groups, C = E + 2 * G * N, K = conv_w.size(0), W = E + C + H;
  TORCH_CHECK(zxbcdt.is_cpu() && zxbcdt.scalar_type() == at::kFloat && zxbcdt.is_contiguous() && zxbcdt.dim() == 2 &&
                  zxbcdt.size(1) == W,
              "zxbcdt: contiguous fp32 [T, E + C + H]");
  for (const at::Tensor* t : {&conv_state, &conv_w, &dt_bias, &A, &D, &ssm_state, &norm_w})
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(), "mamba_mixer: fp32 contiguous");
  TORCH_CHECK(
      K >= 2 && K <= kMaxConvWidth && conv_state.size(0) == K - 1 && conv_state.size(1) == C && conv_w.size(1) == C,
      "conv shapes (width 2..16)");
  TORCH_CHECK(dt_bias.numel() == H, "dt_bias: [H]");
  TORCH_CHECK(P >= 1 && P <= kMaxHeadDim, "head dim 1..256");
  TORCH_CHECK(!conv_b || (conv_b->is_cpu() && conv_b->scalar_type() == at::kFloat && conv_b->is_contiguous() &&
                          conv_b->numel() == C),
              "conv_b: contiguous fp32 [C]");
  TORCH_CHECK(G >= 1 && H % G == 0 && E % G == 0 && norm_w.numel() == E && A.numel() == H && D.numel() == H,
              "head shapes");
  const int64_t T = zxbcdt.size(0);
  const int n_threads = thread_count(threads);
  at::Tensor out = at::empty({T, E}, zxbcdt.options());
  if (T == 0) return out;
  const float* in = zxbcdt.data_ptr<float>();
  float* cs = conv_state.data_ptr<float>();
  const float* cw = conv_w.data_ptr<float>();
  const float* cb = conv_b ? conv_b->data_ptr<float>() : nullptr;
  const float* Dp = D.data_ptr<float>();
  const float* nw = norm_w.data_ptr<float>();
  const int64_t per = E / G;
  TORCH_CHECK(!(rows.n_deferred || rows.exported) || T <= kMaxStreamRows,
              "mamba_mixer: deferred and exported rows go with the recurrence's few rows");
  TORCH_CHECK(!rows.exported || P * N <= kLocalStateFloats, "mamba_mixer: a head's state too large to export rows");
  TORCH_CHECK(!rows.exported || T >= 2, "mamba_mixer: exported rows follow a first row");
  if (T <= kMaxStreamRows && P % 8 == 0) {
    // rows_head's channels start where the general path's do
    thread_local std::vector<float> bc;  // kept between calls: a step runs ~30 of these
    const int64_t BC = C - E;
    bc.resize(size_t(T * BC));
    const float* src[kMaxConvWidth];
    const ConvWindow window{cs, in, C, K, W, E};
    for (int64_t t = 0; t < T; ++t) {
      window.of_token(t, src);
      conv_span(src, cw, cb, C, K, E, C, bc.data() + t * BC);
    }
    rows.export_B(ScanRowLayout{E, G * N, H}, bc.data(), BC, T);  // (the heads export x dt and decay)
    window.advance(T, E, C, conv_saved);  // B and C's channels of the conv state (rows_head moves the heads')
    float* y = out.data_ptr<float>();
    const FewRows d{ssm_state.data_ptr<float>(),
                    cs,
                    in,
                    cw,
                    cb,
                    bc.data(),
                    dt_bias.data_ptr<float>(),
                    A.data_ptr<float>(),
                    Dp,
                    y,
                    conv_saved,
                    T,
                    H,
                    P,
                    N,
                    G,
                    E,
                    C,
                    K,
                    W,
                    float(dt_min),
                    float(dt_max),
                    rows};
    pool().run(&rows_head, &d, H, n_threads - 1);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < G; ++g)
        rms_norm_row(y + t * E + g * per, nw + g * per, y + t * E + g * per, per, float(eps));
    return out;
  }
  // (1) One pass over the tokens, rows in parallel: dt = clamp(softplus(raw + bias)) (and for the
  // recurrence decay = exp(max(dt * A, -80)), as in runtime/ssm.py; the chunked scan sums the
  // log-decays dt * A itself), the causal depthwise conv over [state; inputs] and SiLU, and for the
  // chunked scan dt * x head-major (a chunk's rows of a head contiguous: read by the heads at x's row
  // stride, E floats, a page apart on the real shape, the loads missed and were ~20% of the scan).
  // In one pass x is still in L1 when dt * x is taken (three passes and pool jobs before).
  const ConvWindow window{cs, in, C, K, W, E};
  // The conv's output split in two: x [T, E] and B, C [T, 2 G N], so that the scan reads each
  // token's B and C from one short contiguous row rather than at the stride of a whole conv row.
  const int64_t BC = C - E;
  const bool chunked = T >= kChunkedMinTokens && P % 8 == 0 && P * N <= kChunkedMaxStateFloats;
  const auto x_buf = scratch(size_t(T * E)), bc_buf = scratch(size_t(T * BC));
  // dt [T, H], and for the recurrence decay [T, H] after it
  const auto dt_buf = scratch(size_t((chunked ? 1 : 2) * T * H)), xdt_buf = scratch(chunked ? size_t(H * T * P) : 0);
  float *const xs = x_buf.get(), *const bcs = bc_buf.get(), *const xdt = xdt_buf.get();
  float *const dt = dt_buf.get(), *const decay = chunked ? nullptr : dt + T * H;
  const float* db = dt_bias.data_ptr<float>();
  const float* Ap = A.data_ptr<float>();
  auto token_rows = [&](int64_t t0, int64_t t1) {
    const float* src[kMaxConvWidth];
    for (int64_t t = t0; t < t1; ++t) {
      const float* raw = in + t * W + E + C;
      if (chunked) {  // a prefill: 8 heads at a time (softplus_dt8: within an ulp or two of softplus_dt)
        int64_t h = 0;
        for (; h + 8 <= H; h += 8)
          _mm256_storeu_ps(dt + t * H + h, softplus_dt8(_mm256_loadu_ps(raw + h), _mm256_loadu_ps(db + h),
                                                        float(dt_min), float(dt_max)));
        for (; h < H; ++h) dt[t * H + h] = softplus_dt(raw[h], db[h], float(dt_min), float(dt_max));
      } else {
        for (int64_t h = 0; h < H; ++h)
          dt_decay(raw[h], db[h], Ap[h], float(dt_min), float(dt_max), dt + t * H + h, decay + t * H + h);
      }
      window.of_token(t, src);
      conv_span(src, cw, cb, C, K, 0, E, xs + t * E);
      conv_span(src, cw, cb, C, K, E, C, bcs + t * BC);
      if (!chunked) continue;
      for (int64_t h = 0; h < H; ++h) {
        const __m256 d = _mm256_set1_ps(dt[t * H + h]);
        const float* xt = xs + t * E + h * P;
        float* o = xdt + (h * T + t) * P;
        for (int64_t p = 0; p < P; p += 8) _mm256_storeu_ps(o + p, _mm256_mul_ps(_mm256_loadu_ps(xt + p), d));
      }
    }
  };
  parallel_rows(T, 16, n_threads, token_rows);
  window.advance(T, 0, C, conv_saved);
  // (3) the scan, one head per task: in chunks for a prefill (above), token by token for a few tokens
  float* y = out.data_ptr<float>();
  rows.export_B(ScanRowLayout{E, G * N, H}, bcs, BC, T);  // (the heads export x dt and decay)
  MambaScan m{ssm_state.data_ptr<float>(), xs, bcs, dt, decay, y, T, H, P, N, G, E, rows};
  if (chunked) {
    const int64_t chunks = (T + kScanChunk - 1) / kScanChunk;
    const auto cb = scratch(size_t(chunks * G * kScanChunk * kScanChunk));
    parallel_rows(chunks, 4, n_threads, [&](int64_t c0, int64_t c1) { chunk_cb(m, cb.get(), c0, c1); });
    const ChunkedScan cs{&m, xdt, cb.get(), Ap, chunks};
    pool().run(&mamba_head_chunked, &cs, H, n_threads - 1);
  } else {
    pool().run(&mamba_head, &m, H, n_threads - 1);
  }
  // (4) D skip, gate with silu(z), RMS-normalise within each group, scale
  auto gate_rows = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* yt = y + t * E;
      const float* xt = xs + t * E;
      const float* zt = in + t * W;
      for (int64_t h = 0; h < H; ++h) gate_head(yt + h * P, xt + h * P, zt + h * P, Dp[h], P);
      for (int64_t g = 0; g < G; ++g) rms_norm_row(yt + g * per, nw + g * per, yt + g * per, per, float(eps));
    }
  };
  parallel_rows(T, 16, n_threads, gate_rows);
  return out;
}

}  // namespace

// zxbcdt [T, E + C + H] fp32 (in_proj output); conv_state [K-1, C] fp32 (updated); conv_w [K, C];
// ssm_state [H, P, N] fp32 (updated). Returns the gated, normalised y [T, E] that out_proj takes.
at::Tensor mamba_mixer(const at::Tensor& zxbcdt, const at::Tensor& conv_state, const at::Tensor& conv_w,
                       const std::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const at::Tensor& A,
                       const at::Tensor& D, const at::Tensor& ssm_state, const at::Tensor& norm_w, int64_t n_groups,
                       double eps, double dt_min, double dt_max, int64_t threads) {
  return mixer(zxbcdt, conv_state, conv_w, conv_b, dt_bias, A, D, ssm_state, norm_w, n_groups, eps, dt_min, dt_max,
               threads, nullptr, Deferral{});
}

namespace {

// A Deferral's rows (deferred or exported) for a state [H, P, N] of n_groups groups: contiguous fp32
// [n, H P + n_groups N + H] (n = rows, or any with rows < 0).
const float* scan_rows(const std::optional<at::Tensor>& t, const at::Tensor& ssm, int64_t n_groups, int64_t rows,
                       const char* what) {
  if (!t) return nullptr;
  TORCH_CHECK(t->is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                  t->size(1) == scan_row_width(ssm, n_groups) && (rows < 0 || t->size(0) == rows),
              what, ": contiguous fp32 [rows, E + G N + H] scan rows");
  return t->data_ptr<float>();
}

}  // namespace

int64_t scan_row_width(const at::Tensor& ssm_state, int64_t n_groups) {
  const int64_t H = ssm_state.size(0);
  return ScanRowLayout{H * ssm_state.size(1), n_groups * ssm_state.size(2), H}.width();
}

at::Tensor mamba_mixer_rows(const at::Tensor& zxbcdt, const at::Tensor& conv_state, const at::Tensor& conv_w,
                            const std::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const at::Tensor& A,
                            const at::Tensor& D, const at::Tensor& ssm_state, const at::Tensor& norm_w,
                            int64_t n_groups, double eps, double dt_min, double dt_max, int64_t threads,
                            const std::optional<at::Tensor>& deferred, const std::optional<at::Tensor>& conv_saved,
                            const std::optional<at::Tensor>& exported) {
  TORCH_CHECK(ssm_state.dim() == 3 && zxbcdt.dim() == 2, "mamba_mixer_rows: ssm [H, P, N], zxbcdt [T, W]");
  TORCH_CHECK(!conv_saved || (conv_saved->sizes() == conv_state.sizes() && conv_saved->is_contiguous() &&
                              conv_saved->scalar_type() == at::kFloat),
              "mamba_mixer_rows: conv_saved shaped like the conv state (contiguous fp32)");
  TORCH_CHECK(!conv_saved || zxbcdt.size(0) >= 2, "mamba_mixer_rows: the conv state after the first of >= 2 rows");
  Deferral rows;
  rows.deferred = scan_rows(deferred, ssm_state, n_groups, -1, "deferred");
  rows.n_deferred = deferred ? deferred->size(0) : 0;
  rows.exported = const_cast<float*>(scan_rows(exported, ssm_state, n_groups, zxbcdt.size(0) - 1, "exported"));
  return mixer(zxbcdt, conv_state, conv_w, conv_b, dt_bias, A, D, ssm_state, norm_w, n_groups, eps, dt_min, dt_max,
               threads, conv_saved ? conv_saved->data_ptr<float>() : nullptr, rows);
}

namespace {

struct AdvanceRows {
  float* ssm;
  Deferral rows;
  ScanRowLayout lay;
  int64_t H, P, N, G;
};

void advance_task(const void* ctx, int64_t h) {
  const auto& a = *static_cast<const AdvanceRows*>(ctx);
  apply_deferred(a.ssm + h * a.P * a.N, a.rows, a.lay, h, h / (a.H / a.G), a.P, a.N);
}

}  // namespace

void mamba_advance(const at::Tensor& ssm_state, const at::Tensor& rows, int64_t n_groups, int64_t threads) {
  TORCH_CHECK(
      ssm_state.is_cpu() && ssm_state.scalar_type() == at::kFloat && ssm_state.is_contiguous() && ssm_state.dim() == 3,
      "mamba_advance: ssm_state contiguous fp32 [H, P, N]");
  const int64_t H = ssm_state.size(0), P = ssm_state.size(1), N = ssm_state.size(2);
  TORCH_CHECK(n_groups >= 1 && H % n_groups == 0, "mamba_advance: n_groups divides the heads");
  const AdvanceRows a{ssm_state.data_ptr<float>(),
                      Deferral{scan_rows(rows, ssm_state, n_groups, -1, "rows"), rows.size(0), nullptr},
                      ScanRowLayout{H * P, n_groups * N, H},
                      H,
                      P,
                      N,
                      n_groups};
  if (a.rows.n_deferred) pool().run(&advance_task, &a, H, thread_count(threads) - 1);
}

}  // namespace granite
