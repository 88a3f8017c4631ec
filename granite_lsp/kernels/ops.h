// The ops the extension registers (ops.cpp), one source file per concern.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "isa.h"  // isa_level, isa_levels, set_isa_level, isa_note

namespace granite {

// The most rows of x the streaming kernels take (one read of the weights for all of them, each row's
// result bit-identical alone or batched), and so the most rows of a one-call step (step.cpp: a decode
// step, a verify) and of the Mamba recurrence (mamba.cpp); from one more on, the blocked GEMM and the
// chunked scan run (another rounding). The one place this is decided: Python reads this line
// (build.header_constant, ops.py's GEMV_MAX_ROWS).
constexpr int64_t kMaxStreamRows = 16;

// linear.cpp: x @ W^T (+ b) for fp32 / bf16 / fp16 / int8 W, streaming (few rows) or blocked (many)
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias, int64_t threads);
at::Tensor gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& bias, int64_t threads);
double read_probe(const at::Tensor& buf, int64_t threads);

// mamba.cpp
at::Tensor mamba_mixer(const at::Tensor& zxbcdt, const at::Tensor& conv_state, const at::Tensor& conv_w,
                       const std::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const at::Tensor& A,
                       const at::Tensor& D, const at::Tensor& ssm_state, const at::Tensor& norm_w, int64_t n_groups,
                       double eps, double dt_min, double dt_max, int64_t threads);
// ... for T <= kMaxStreamRows rows, with what runtime/state.py's ModelState defers (mamba.cpp's Deferral):
// `deferred` [n, E + G N + H] rows the SSM state has yet to advance over, applied first (in place);
// `exported` [T - 1, E + G N + H]: the rows after the first leave the SSM state as it is after it and
// their scan inputs there instead; `conv_saved`: the conv state after the first row (T >= 2). A
// journaled verify (step.cpp) gives the last two.
at::Tensor mamba_mixer_rows(const at::Tensor& zxbcdt, const at::Tensor& conv_state, const at::Tensor& conv_w,
                            const std::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const at::Tensor& A,
                            const at::Tensor& D, const at::Tensor& ssm_state, const at::Tensor& norm_w,
                            int64_t n_groups, double eps, double dt_min, double dt_max, int64_t threads,
                            const std::optional<at::Tensor>& deferred, const std::optional<at::Tensor>& conv_saved,
                            const std::optional<at::Tensor>& exported);
// The floats of one scan row (x dt [E], B [G N], decay [H]) for an SSM state [H, P, N] of n_groups groups.
int64_t scan_row_width(const at::Tensor& ssm_state, int64_t n_groups);
// ssm_state [H, P, N] advanced over `rows` [n, E + G N + H] as mamba_mixer_rows advances it over deferred
// rows, bit for bit (ModelState.settle)
void mamba_advance(const at::Tensor& ssm_state, const at::Tensor& rows, int64_t n_groups, int64_t threads);

// attention.cpp
at::Tensor attention_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t length, double scale,
                            int64_t threads);
// ... of the T rows of qkv (the n_heads query heads first in each) at consecutive positions, row t over
// `length` + t positions: each row's result is attention_decode's for it (a verify's rows, step.cpp)
at::Tensor attention_decode_rows(const at::Tensor& qkv, const at::Tensor& k, const at::Tensor& v, int64_t length,
                                 int64_t n_heads, double scale, int64_t threads);
at::Tensor attention_prefill(const at::Tensor& qkv, const at::Tensor& k, const at::Tensor& v, int64_t pos,
                             int64_t n_heads, double scale, int64_t threads);

// norms.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, int64_t threads);
at::Tensor add_rms_norm(const at::Tensor& x, const at::Tensor& h, double alpha, const at::Tensor& w, double eps,
                        int64_t threads);
at::Tensor swiglu(const at::Tensor& gu, int64_t threads);

// step.cpp: every layer of a decode step (or a verify of up to 16 rows) in one call
std::vector<at::Tensor> decode_layers(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& weights,
                                      at::IntArrayRef ints, at::ArrayRef<double> floats, at::TensorList conv,
                                      at::TensorList ssm, at::TensorList k, at::TensorList v, at::IntArrayRef pos,
                                      int64_t threads, at::TensorList deferred, at::TensorList conv_saved,
                                      at::TensorList exported);

}  // namespace granite
