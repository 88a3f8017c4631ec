// All decoder layers of one decode step (T = 1) in one call.
//
// A decode step runs ~10 kernels per layer. From Python each call cost 5-15 us on top of its work
// (the torch.ops dispatcher, the wrappers' checks, a tensor or two allocated), ~300 calls a step:
// 5-7 ms on 2 cores, a fifth of an int8 step. Here the same kernels run in the same order on the
// same data, so the results are bit-identical to the layer-by-layer path in runtime/layers.py,
// which stays the reference (and the path for prefill, RoPE models and the torch fallback).
#include <ATen/ops/add.h>

#include <cstring>

#include "common.h"
#include "ops.h"

namespace granite {

// x [1, D] fp32, the embedded token (the residual stream, updated in place and returned).
// weights, per layer in order: ln_in, ln_post, mlp_in (w, scale), mlp_out (w, scale), then
//   Mamba: in_proj (w, scale, bias), conv_w, conv_b, dt_bias, A, D, norm_w, out_proj (w, scale, bias)
//   attention: qkv (w, scale, bias), o (w, scale, bias)
// ints: n_groups, n_q, n_kv, head_dim, then each layer's kind (0 Mamba, 1 attention).
// floats: eps, residual multiplier, dt_min, dt_max, attention scale.
// conv, ssm: the Mamba layers' states; k, v: the attention layers' KV buffers [nkv, cap, hd] with
// room at `pos`. Returns the residual stream after the last layer (before the final norm).
at::Tensor decode_layers(const at::Tensor& x_in, const c10::List<std::optional<at::Tensor>>& weights,
                         at::IntArrayRef ints, at::ArrayRef<double> floats, at::TensorList conv, at::TensorList ssm,
                         at::TensorList k, at::TensorList v, int64_t pos, int64_t threads) {
  TORCH_CHECK(x_in.is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2 && x_in.size(0) == 1,
              "x: fp32 [1, D]");
  TORCH_CHECK(ints.size() >= 4 && floats.size() == 5, "decode_layers: ints or floats malformed");
  const int64_t G = ints[0], nq = ints[1], nkv = ints[2], hd = ints[3], L = int64_t(ints.size()) - 4;
  const double eps = floats[0], rm = floats[1], dt_min = floats[2], dt_max = floats[3], scale = floats[4];
  size_t at_w = 0;
  auto next = [&]() -> std::optional<at::Tensor> {
    TORCH_CHECK(at_w < weights.size(), "decode_layers: too few weights");
    return weights.get(at_w++);
  };
  auto need = [&]() -> at::Tensor {
    auto t = next();
    TORCH_CHECK(t.has_value(), "decode_layers: a required weight is None");
    return *t;
  };
  // one PackedLinear: its weight, scale and bias
  auto linear3 = [&](const at::Tensor& in) {
    const at::Tensor w = need();
    const auto s = next(), b = next();
    return linear(in, w, s, b, threads);
  };
  TORCH_CHECK(pos >= 0, "decode_layers: pos >= 0");
  // Every state checked before any is touched: a bad one must not leave the others advanced.
  for (at::TensorList states : {conv, ssm, k, v})
    for (const at::Tensor& t : states)
      TORCH_CHECK(t.is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                  "decode_layers: states and KV buffers must be contiguous fp32 CPU tensors");
  for (size_t j = 0; j < k.size(); ++j)
    TORCH_CHECK(j < v.size() && k[j].dim() == 3 && k[j].sizes() == v[j].sizes() && k[j].size(0) == nkv &&
                    k[j].size(2) == hd && pos < k[j].size(1),
                "decode_layers: KV buffers [nkv, cap > pos, hd]");
  if (L == 0) return x_in.clone();
  at::Tensor x = x_in.contiguous();
  at::Tensor h;
  size_t m = 0, a = 0;  // Mamba and attention layers seen
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor ln_in = need(), ln_post = need();
    const at::Tensor mlp_in = need();
    const auto mlp_in_s = next();
    const at::Tensor mlp_out = need();
    const auto mlp_out_s = next();
    if (i == 0) h = rms_norm(x, ln_in, eps, threads);  // later layers' input norm ends the layer before
    if (ints[4 + i] == 0) {
      TORCH_CHECK(m < conv.size() && m < ssm.size(), "decode_layers: fewer Mamba states than layers");
      const at::Tensor zxbcdt = linear3(h);
      const at::Tensor conv_w = need();
      const auto conv_b = next();
      const at::Tensor dt_bias = need(), A = need(), D = need(), norm_w = need();
      const at::Tensor y =
          mamba_mixer(zxbcdt, conv[m], conv_w, conv_b, dt_bias, A, D, ssm[m], norm_w, G, eps, dt_min, dt_max, threads);
      h = linear3(y);
      ++m;
    } else {
      TORCH_CHECK(a < k.size() && a < v.size(), "decode_layers: fewer KV buffers than attention layers");
      const at::Tensor& kb = k[a];
      const at::Tensor& vb = v[a];
      const at::Tensor qkv = linear3(h);
      TORCH_CHECK(qkv.numel() == (nq + 2 * nkv) * hd, "decode_layers: qkv width");
      const float* src = qkv.data_ptr<float>();
      const int64_t cap = kb.size(1);
      for (int64_t j = 0; j < nkv; ++j) {
        std::memcpy(kb.data_ptr<float>() + (j * cap + pos) * hd, src + (nq + j) * hd, sizeof(float) * hd);
        std::memcpy(vb.data_ptr<float>() + (j * cap + pos) * hd, src + (nq + nkv + j) * hd, sizeof(float) * hd);
      }
      const at::Tensor out = attention_decode(qkv.view({-1}).narrow(0, 0, nq * hd), kb, vb, pos + 1, scale, threads);
      h = linear3(out);
      ++a;
    }
    h = add_rms_norm(x, h, rm, ln_post, eps, threads);
    h = linear(swiglu(linear(h, mlp_in, mlp_in_s, std::nullopt, threads), threads), mlp_out, mlp_out_s, std::nullopt,
               threads);
    if (i + 1 < L) {
      // the next layer's input norm: its weight is the next entry
      TORCH_CHECK(at_w < weights.size() && weights.get(at_w).has_value(), "decode_layers: too few weights");
      h = add_rms_norm(x, h, rm, *weights.get(at_w), eps, threads);
    } else {
      x = at::add(x, h, rm);
    }
  }
  TORCH_CHECK(at_w == weights.size() && m == conv.size() && a == k.size(),
              "decode_layers: weights or states left over");
  return x;
}

}  // namespace granite
