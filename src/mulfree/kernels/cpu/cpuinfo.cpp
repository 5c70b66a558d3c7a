// Run-time CPU feature detection: the package is built for generic x86-64 and each
// ISA-specific kernel is compiled with a target attribute, so we must ask the CPU.
#include "mulfree_cpu.h"
#include <nanobind/stl/string.h>
#include <nanobind/stl/map.h>
#include <map>
#include <stdexcept>
#include <string>
#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {
// AMX needs the CPU (cpuid leaf 7: AMX-TILE, AMX-INT8) and the kernel's per-process grant of the
// 8 KiB tile-data state (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16+); without the grant the first
// tile instruction would fault.
bool amx_int8_usable() {
#if defined(__x86_64__) && defined(__linux__)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
}  // namespace

const CpuFeatures &cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures r{};
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    r.avx2 = __builtin_cpu_supports("avx2");
    r.fma = __builtin_cpu_supports("fma");
    unsigned a, b, c, d;  // AVX-VNNI: cpuid leaf 7 subleaf 1, eax bit 4 (not every gcc's __builtin_cpu_supports knows it)
    r.avxvnni = MF_HAVE_AVXVNNI && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1);
    r.avx512f = __builtin_cpu_supports("avx512f");
    r.avx512bw = __builtin_cpu_supports("avx512bw");
    r.avx512vl = __builtin_cpu_supports("avx512vl");
    r.avx512vnni = __builtin_cpu_supports("avx512vnni");
#endif
    r.amx_int8 = MF_HAVE_AMX && r.avx512vnni && amx_int8_usable();
#if defined(__x86_64__) && defined(__linux__)
    // AMX-BF16: cpuid leaf 7 edx bit 22; AVX512-BF16: leaf 7 subleaf 1 eax bit 5.
    unsigned a0, b0, c0, d0, a1, b1, c1, d1;
    r.amx_bf16 = r.amx_int8 && __get_cpuid_count(7, 0, &a0, &b0, &c0, &d0) && ((d0 >> 22) & 1) &&
                 __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && ((a1 >> 5) & 1);
#endif
    return r;
  }();
  return f;
}

Isa parse_isa(const std::string &name) {
  const CpuFeatures &f = cpu_features();
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2") {
    if (!(f.avx2 && f.fma)) throw std::invalid_argument("backend 'avx2' is not supported by this CPU");
    return Isa::Avx2;
  }
  if (name == "avxvnni") {
    if (!(f.avx2 && f.fma && f.avxvnni)) throw std::invalid_argument("backend 'avxvnni' is not supported by this CPU");
    return Isa::AvxVnni;
  }
  if (name == "avx512") {
    if (!(f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni))
      throw std::invalid_argument("backend 'avx512' is not supported by this CPU");
    return Isa::Avx512;
  }
  throw std::invalid_argument("unknown backend '" + name + "' (use scalar, avx2, avxvnni or avx512)");
}

void register_cpuinfo(nb::module_ &m) {
  m.def("cpu_features", [] {
    const CpuFeatures &f = cpu_features();
    return std::map<std::string, bool>{{"avx2", f.avx2 && f.fma},
                                       {"avxvnni", f.avx2 && f.fma && f.avxvnni},
                                       {"avx512", f.avx512f && f.avx512bw && f.avx512vl},
                                       {"avx512vnni", f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni},
                                       {"amx_int8", f.amx_int8},
                                       {"amx_bf16", f.amx_bf16}};
  }, "Which SIMD instruction sets this CPU (and OS) supports: {'avx2', 'avxvnni', 'avx512', 'avx512vnni', "
         "'amx_int8', 'amx_bf16'}.");
}
