// Registers the extension's ops as torch.ops.<name given to cpp_extension.load>.
#include "ops.h"

#include <torch/library.h>

#include "common.h"

using namespace granite;

namespace {

// An op's entry point that runs its body with denormals flushed (common.h's DenormalsFlushed says why):
// `flushed<&op>` has op's signature, so the schema below binds to it as to op itself.
template <auto F, class Sig = decltype(F)>
struct Flushed;
template <auto F, class R, class... A>
struct Flushed<F, R (*)(A...)> {
  static R call(A... args) {
    const DenormalsFlushed guard;
    return F(std::forward<A>(args)...);
  }
};
template <auto F>
constexpr auto flushed = &Flushed<F>::call;

}  // namespace

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {  // torch.ops.<name given to cpp_extension.load>
  m.def("linear(Tensor x, Tensor w, Tensor? scale, Tensor? bias, int threads) -> Tensor", flushed<&linear>);
  m.def("gemm(Tensor x, Tensor w, Tensor? scale, Tensor? bias, int threads) -> Tensor", flushed<&gemm>);
  m.def("isa_level() -> str", &isa_level);
  m.def("isa_levels() -> str[]", &isa_levels);
  m.def("set_isa_level(str name) -> str", &set_isa_level);
  m.def("isa_note() -> str", &isa_note);
  m.def("read_probe(Tensor buf, int threads) -> float", flushed<&read_probe>);
  m.def("rms_norm(Tensor x, Tensor w, float eps, int threads) -> Tensor", flushed<&rms_norm>);
  m.def("add_rms_norm(Tensor(a!) x, Tensor h, float alpha, Tensor w, float eps, int threads) -> Tensor",
        flushed<&add_rms_norm>);
  m.def("swiglu(Tensor gu, int threads) -> Tensor", flushed<&swiglu>);
  m.def("attention_decode(Tensor q, Tensor k, Tensor v, int length, float scale, int threads) -> Tensor",
        flushed<&attention_decode>);
  m.def("attention_prefill(Tensor qkv, Tensor k, Tensor v, int pos, int n_heads, float scale, int threads) -> Tensor",
        flushed<&attention_prefill>);
  m.def(
      "mamba_mixer(Tensor zxbcdt, Tensor(a!) conv_state, Tensor conv_w, Tensor? conv_b, Tensor dt_bias, "
      "Tensor A, Tensor D, Tensor(b!) ssm_state, Tensor norm_w, int n_groups, float eps, float dt_min, float dt_max, "
      "int threads) "
      "-> Tensor",
      flushed<&mamba_mixer>);
  m.def(
      "decode_layers(Tensor(a!) x, Tensor?[] weights, int[] ints, float[] floats, Tensor(b!)[] conv, "
      "Tensor(c!)[] ssm, Tensor(d!)[] k, Tensor(e!)[] v, int[] pos, int threads, Tensor[] deferred, "
      "Tensor(f!)[] conv_saved, Tensor(g!)[] exported) -> Tensor[]",
      flushed<&decode_layers>);
  m.def("mamba_advance(Tensor(a!) ssm_state, Tensor rows, int n_groups, int threads) -> ()", flushed<&mamba_advance>);
}
