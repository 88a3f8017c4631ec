// Run-time choice of the kernels' instruction-set level (isa.h).
#include "isa.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace granite {
namespace {

const char* const kNames[] = {"avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"};
constexpr int kCount = 5;

// AMX's tile data (8 KB of state per thread) is off until the process asks the OS for it
// (Linux >= 5.16: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); a tile instruction before
// that faults. Asked once, here, for the whole process (threads started later inherit it). Where
// it is refused (an older kernel, a hypervisor that hides XTILEDATA), the amx level is not offered
// and a GRANITE_LSP_ISA=amx's note says why (with the errno); isa.py's cpu_levels makes the same
// request, so Python and C++ agree on the levels (not where the compiler lacks AMX, isa.h: there
// the extension's isa_levels() is the one to believe).
// Returns "" when granted, else why not (for the note a GRANITE_LSP_ISA=amx gets).
std::string amx_refusal() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) return "";
  return std::string("Linux refused the tile state (arch_prctl: ") + std::strerror(errno) + ")";
#else
  return "only Linux is asked for the tile state";
#endif
}

// Why a CPU with AMX's flags stops below amx ("" where it does not), decided with cpu_max.
std::string& amx_note() {
  static std::string note;
  return note;
}

// The highest level the CPU (and the OS, which must save the ZMM registers: __builtin_cpu_supports
// checks that through XGETBV) supports.
int cpu_max() {
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")))
    return int(Isa::kAvx2);
  if (!__builtin_cpu_supports("avx512vnni")) return int(Isa::kAvx512);
  if (!__builtin_cpu_supports("avx512bf16")) return int(Isa::kAvx512Vnni);
#if GRANITE_HAVE_AMX  // (older compilers know neither the intrinsics nor these feature names: isa.h)
  if (!(__builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") && __builtin_cpu_supports("amx-bf16")))
    return int(Isa::kAvx512Bf16);
  amx_note() = amx_refusal();
  return amx_note().empty() ? int(Isa::kAmx) : int(Isa::kAvx512Bf16);
#else
  return int(Isa::kAvx512Bf16);
#endif
}

int index_of(const std::string& name) {
  for (int i = 0; i < kCount; ++i)
    if (name == kNames[i]) return i;
  return -1;
}

struct State {
  int max = cpu_max();
  std::atomic<int> level{max};
  std::string note;
  State() {
    const char* env = std::getenv("GRANITE_LSP_ISA");
    if (!env || !*env) return;
    const int i = index_of(env);
    if (i < 0)
      note = std::string("GRANITE_LSP_ISA=") + env + " is not a level (" +
             c10::Join(", ", std::vector<std::string>(kNames, kNames + kCount)) + ")";
    else if (i > max)
      note = std::string("GRANITE_LSP_ISA=") + env + ": this CPU's highest level is " + kNames[max] +
             (amx_note().empty() ? "" : " (it has AMX, but " + amx_note() + ")");
    else level.store(i);
  }
};

State& state() {
  static State s;
  return s;
}

}  // namespace

Isa isa() { return Isa(state().level.load(std::memory_order_relaxed)); }

std::vector<std::string> isa_levels() { return {kNames, kNames + state().max + 1}; }

std::string isa_level() { return kNames[int(isa())]; }

std::string set_isa_level(const std::string& name) {
  const int i = index_of(name);
  TORCH_CHECK(i >= 0 && i <= state().max, "ISA level '", name,
              "' is not one of this CPU's: ", c10::Join(", ", isa_levels()));
  return kNames[state().level.exchange(i)];
}

std::string isa_note() { return state().note; }

}  // namespace granite
