// Which instruction-set level the kernels run at: one build for every x86-64 CPU with AVX2/FMA/F16C
// (the floor), with the faster paths compiled per function (isa-specific source files under
// `#pragma GCC target`) and chosen at run time from the CPU's features. No global -mavx512 flag: a
// binary in a shared cache must run on an AVX2-only machine.
//
// The levels, each including the ones before it:
//   avx2         AVX2 + FMA + F16C: every kernel (the reference the others are tested against)
//   avx512       AVX-512 F/BW/VL/DQ: the prefill GEMM on 16-lane registers, bit-identical to avx2;
//                decode's streaming kernels for fp16 / bf16 weights on 16 lanes (summed in another
//                order than avx2's 8 lanes: fp32 rounding only)
//   avx512_vnni  + AVX512_VNNI: int8 weights' products (prefill GEMM and decode's streaming kernels)
//                on vpdpbusd, with the activations quantized to int8 per row (results move, within
//                the tolerances tests/test_kernels.py and tests/test_precisions.py state)
//   avx512_bf16  + AVX512_BF16: bf16 weights' products (prefill GEMM and decode's streaming
//                kernels) on vdpbf16ps, which rounds the activations to bf16 (results move, within
//                the tolerances tests/test_kernels.py and tests/test_precisions.py state)
//   amx          + AMX-TILE, AMX-INT8, AMX-BF16 and the OS's leave to use the tile data (Linux:
//                arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), asked once per process; a CPU
//                with AMX whose kernel refuses it stays at avx512_bf16): int8 and bf16 weights'
//                products on tile matmuls, the prefill GEMM (linear_amx.cpp) and the streaming kernels
//                (1..kMaxStreamRows rows: decode, verify; linear_amx_stream.cpp). int8: bit-identical
//                to avx512_vnni (the same quantized x, exact int32 sums, the same epilogue); bf16: the
//                same bf16-rounded x summed in fp32 in another order than vdpbf16ps (linear_amx.cpp
//                says how far apart), a row's bits the same in the streaming kernels (any row count)
//                and the GEMM. Every other format runs as at avx512_bf16.
// GRANITE_LSP_ISA=<level> caps the level (a name above what the CPU has, or unknown, is ignored
// with the reason in isa_note()); set_isa_level() changes it at run time, for the tests.
#pragma once

#include <string>
#include <vector>

// Whether this compiler builds the amx level: AMX's intrinsics, `#pragma GCC target("amx-tile,...")`
// and __builtin_cpu_supports("amx-tile") need GCC >= 11 (with binutils >= 2.36). With an older one
// every other level builds, the amx sources compile to nothing and isa.cpp never offers amx (isa.py's
// cpu_levels, which reads /proc/cpuinfo, still lists it: tests/conftest.py's level fixture skips a
// level the extension lacks).
#if !defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11
#define GRANITE_HAVE_AMX 1
#else
#define GRANITE_HAVE_AMX 0
#endif

namespace granite {

// VNNI before BF16: every CPU with AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4) has
// AVX512_VNNI, while Cascade Lake and Ice Lake have VNNI without BF16.
enum class Isa : int { kAvx2 = 0, kAvx512 = 1, kAvx512Vnni = 2, kAvx512Bf16 = 3, kAmx = 4 };

// The level the kernels use now (an atomic read: cheap enough for every product).
Isa isa();
// Names of the levels this CPU supports, lowest first.
std::vector<std::string> isa_levels();
// The level in use, by name.
std::string isa_level();
// Sets the level by name (must be one of isa_levels()); returns the previous one.
std::string set_isa_level(const std::string& name);
// Why GRANITE_LSP_ISA was not applied ('' when it was, or is unset).
std::string isa_note();

}  // namespace granite
