// All decoder layers of a decode step, or of a verify of up to kMaxStreamRows (16) rows, in one call.
//
// A decode step runs ~10 kernels per layer. From Python each call cost 5-15 us on top of its work
// (the torch.ops dispatcher, the wrappers' checks, a tensor or two allocated), ~300 calls a step:
// 5-7 ms on 2 cores, a fifth of an int8 step. Here the same kernels run in the same order on the
// same data, so the results are bit-identical to the layer-by-layer path in runtime/layers.py,
// which stays the reference (and the path for long prefills, RoPE models and the torch fallback).
//
// T rows (T <= kMaxStreamRows, what the streaming linear kernels take with one read of the weights), either
// - consecutive tokens of one sequence at positions pos .. pos + T - 1 (one `pos`: speculative
//   decoding's verify, the fed token and its drafts; or a short prefill). Attention appends T KV
//   entries and attends row i over the positions up to pos + i (causal); the Mamba layers advance
//   their states over the rows in order. Or
// - one token for each of T sequences (T `pos`, one per row: runtime/rows.py's candidates), each
//   with its own Mamba states and KV buffers: only those parts run row by row.
// One sequence's Mamba states may have rows deferred (`deferred`: runtime/state.py's ModelState says why),
// which each layer applies before the new rows. A journaled call (conv_saved and exported given: state.py's
// Journal) leaves each SSM state as it is after those and the first row (the other rows advance a copy),
// the other rows' scan inputs in exported (those a rollback keeps become deferred ones) and the conv state
// after the first row in conv_saved, and returns the in_proj rows after the first (for the conv states of
// the rows kept).
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>

#include <cstring>

#include "common.h"
#include "ops.h"

namespace granite {

// x [T, D] fp32, T <= kMaxStreamRows (ops.h), the embedded tokens (the residual stream, updated in place).
// weights, per layer in order: ln_in, ln_post, mlp_in (w, scale), mlp_out (w, scale), then
//   Mamba: in_proj (w, scale, bias), conv_w, conv_b, dt_bias, A, D, norm_w, out_proj (w, scale, bias)
//   attention: qkv (w, scale, bias), o (w, scale, bias)
// ints: n_groups, n_q, n_kv, head_dim, then each layer's kind (0 Mamba, 1 attention).
// floats: eps, residual multiplier, dt_min, dt_max, attention scale.
// conv, ssm: the Mamba layers' states; k, v: the attention layers' KV buffers [nkv, cap, hd] with
// room for the new positions; with S sequences (S = pos.size(), 1 or T) layer j's state or buffer of
// sequence s is entry j * S + s. deferred: empty, or (one sequence) one [n, E + G N + H] per Mamba layer.
// conv_saved, exported: empty, or (one sequence, T >= 2) one per Mamba layer (a journaled call, see above):
// shaped like its conv state, and [T - 1, E + G N + H].
// Returns [the residual stream after the last layer (before the final norm)], followed in a
// journaled call by each Mamba layer's in_proj rows 1 .. T - 1.
std::vector<at::Tensor> decode_layers(const at::Tensor& x_in, const c10::List<std::optional<at::Tensor>>& weights,
                                      at::IntArrayRef ints, at::ArrayRef<double> floats, at::TensorList conv,
                                      at::TensorList ssm, at::TensorList k, at::TensorList v, at::IntArrayRef pos,
                                      int64_t threads, at::TensorList deferred, at::TensorList conv_saved,
                                      at::TensorList exported) {
  TORCH_CHECK(x_in.is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2 && x_in.size(0) >= 1 &&
                  x_in.size(0) <= kMaxStreamRows,
              "x: fp32 [T, D], 1 <= T <= ", kMaxStreamRows);
  TORCH_CHECK(ints.size() >= 4 && floats.size() == 5, "decode_layers: ints or floats malformed");
  const int64_t T = x_in.size(0);
  const int64_t G = ints[0], nq = ints[1], nkv = ints[2], hd = ints[3], L = int64_t(ints.size()) - 4;
  const double eps = floats[0], rm = floats[1], dt_min = floats[2], dt_max = floats[3], scale = floats[4];
  const bool journaled = !conv_saved.empty() || !exported.empty();
  const int64_t S = int64_t(pos.size());
  TORCH_CHECK(S == 1 || S == T, "decode_layers: one position, or one per row");
  TORCH_CHECK(!journaled || (S == 1 && T >= 2), "decode_layers: a journaled call has one sequence and >= 2 rows");
  TORCH_CHECK(deferred.empty() || S == 1, "decode_layers: deferred rows go with one sequence");
  int64_t n_mamba = 0;
  for (int64_t i = 0; i < L; ++i) n_mamba += ints[4 + i] == 0;
  TORCH_CHECK(conv.size() == size_t(n_mamba * S) && ssm.size() == conv.size() &&
                  k.size() == size_t((L - n_mamba) * S) && v.size() == k.size(),
              "decode_layers: one state per Mamba layer and sequence, one KV buffer per attention layer and sequence");
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
  for (const int64_t p : pos) TORCH_CHECK(p >= 0, "decode_layers: pos >= 0");
  // Every state checked before any is touched: a bad one must not leave the others advanced.
  for (at::TensorList states : {conv, ssm, k, v, deferred, conv_saved, exported})
    for (const at::Tensor& t : states)
      TORCH_CHECK(t.is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                  "decode_layers: states, deferred rows, journal and KV buffers must be contiguous fp32 CPU tensors");
  for (size_t j = 0; j < k.size(); ++j)
    TORCH_CHECK(k[j].dim() == 3 && k[j].sizes() == v[j].sizes() && k[j].size(0) == nkv && k[j].size(2) == hd &&
                    pos[j % S] + T / S <= k[j].size(1),
                "decode_layers: KV buffers [nkv, cap >= pos + new positions, hd]");
  TORCH_CHECK(deferred.empty() || deferred.size() == ssm.size(), "decode_layers: deferred rows for every Mamba layer");
  TORCH_CHECK(exported.empty() || exported.size() == ssm.size(), "decode_layers: exported rows for every Mamba layer");
  for (at::TensorList rows : {deferred, exported})
    for (size_t j = 0; j < rows.size(); ++j) {
      const at::Tensor& s = ssm[j];
      TORCH_CHECK(s.dim() == 3 && rows[j].dim() == 2 && rows[j].size(1) == scan_row_width(s, G),
                  "decode_layers: deferred and exported rows [n, E + G N + H]");
    }
  if (journaled) {
    TORCH_CHECK(conv_saved.size() == conv.size() && exported.size() == ssm.size(),
                "decode_layers: one journal buffer of each kind per Mamba state");
    for (size_t j = 0; j < conv.size(); ++j)
      TORCH_CHECK(conv_saved[j].sizes() == conv[j].sizes() && exported[j].dim() == 2 && exported[j].size(0) == T - 1,
                  "decode_layers: conv journal buffers shaped like the states, T - 1 exported rows");
  }
  std::vector<at::Tensor> out(1);
  if (L == 0) {
    out[0] = x_in.clone();
    return out;
  }
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
      const at::Tensor zxbcdt = linear3(h);
      const at::Tensor conv_w = need();
      const auto conv_b = next();
      const at::Tensor dt_bias = need(), A = need(), D = need(), norm_w = need();
      auto mix = [&](const at::Tensor& rows, int64_t seq = 0) {
        return mamba_mixer(rows, conv[m * S + seq], conv_w, conv_b, dt_bias, A, D, ssm[m * S + seq], norm_w, G, eps,
                           dt_min, dt_max, threads);
      };
      auto some = [](at::TensorList list, size_t j) {
        return list.empty() ? std::optional<at::Tensor>() : std::optional<at::Tensor>(list[j]);
      };
      at::Tensor y;
      if (S > 1) {  // each row its own sequence (runtime/rows.py)
        std::vector<at::Tensor> ys;
        for (int64_t t = 0; t < T; ++t) ys.push_back(mix(zxbcdt.narrow(0, t, 1), t));
        y = at::cat(ys);
      } else if (journaled || !deferred.empty()) {
        // deferred rows applied in place; a journaled verify's rows exported, not written into the state
        // (why: runtime/state.py's Journal)
        y = mamba_mixer_rows(zxbcdt, conv[m], conv_w, conv_b, dt_bias, A, D, ssm[m], norm_w, G, eps, dt_min, dt_max,
                             threads, some(deferred, m), some(conv_saved, m), some(exported, m));
        if (journaled) out.push_back(zxbcdt.narrow(0, 1, T - 1));
      } else {
        y = mix(zxbcdt);
      }
      h = linear3(y);
      ++m;
    } else {
      const at::Tensor qkv = linear3(h);
      TORCH_CHECK(qkv.size(1) == (nq + 2 * nkv) * hd, "decode_layers: qkv width");
      // row t: its sequence's buffers and position (one sequence: consecutive positions)
      auto kv_of = [&](int64_t t) { return a * S + (S > 1 ? t : 0); };
      auto pos_of = [&](int64_t t) { return S > 1 ? pos[t] : pos[0] + t; };
      for (int64_t t = 0; t < T; ++t) {
        const at::Tensor &kb = k[kv_of(t)], &vb = v[kv_of(t)];
        const int64_t cap = kb.size(1), at_pos = pos_of(t);
        const float* src = qkv.data_ptr<float>() + t * qkv.size(1);
        for (int64_t j = 0; j < nkv; ++j) {
          std::memcpy(kb.data_ptr<float>() + (j * cap + at_pos) * hd, src + (nq + j) * hd, sizeof(float) * hd);
          std::memcpy(vb.data_ptr<float>() + (j * cap + at_pos) * hd, src + (nq + nkv + j) * hd, sizeof(float) * hd);
        }
      }
      // each row over the positions up to its own (Attention.attend's fused branch); one sequence's rows
      // in one call (its keys and values read once for all of them), each the same as alone
      if (S == 1) {
        h = linear3(attention_decode_rows(qkv, k[kv_of(0)], v[kv_of(0)], pos[0] + 1, nq, scale, threads));
      } else {
        std::vector<at::Tensor> rows;
        rows.reserve(size_t(T));
        for (int64_t t = 0; t < T; ++t)
          rows.push_back(attention_decode(qkv.select(0, t).narrow(0, 0, nq * hd), k[kv_of(t)], v[kv_of(t)],
                                          pos_of(t) + 1, scale, threads));
        h = linear3(at::cat(rows));
      }
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
  TORCH_CHECK(at_w == weights.size(), "decode_layers: weights left over");
  out[0] = x;
  return out;
}

}  // namespace granite
