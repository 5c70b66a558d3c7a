// Run-time CPU feature detection: the package is built for generic x86-64 and each
// ISA-specific kernel is compiled with a target attribute, so we must ask the CPU.
#include "mulfree_cpu.h"
#include <nanobind/stl/string.h>
#include <nanobind/stl/map.h>
#include <map>
#include <string>

const CpuFeatures &cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures r{};
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    r.avx2 = __builtin_cpu_supports("avx2");
    r.fma = __builtin_cpu_supports("fma");
    r.avx512f = __builtin_cpu_supports("avx512f");
    r.avx512bw = __builtin_cpu_supports("avx512bw");
    r.avx512vl = __builtin_cpu_supports("avx512vl");
    r.avx512vnni = __builtin_cpu_supports("avx512vnni");
#endif
    return r;
  }();
  return f;
}

void register_cpuinfo(nb::module_ &m) {
  m.def("cpu_features", [] {
    const CpuFeatures &f = cpu_features();
    return std::map<std::string, bool>{{"avx2", f.avx2 && f.fma},
                                       {"avx512", f.avx512f && f.avx512bw && f.avx512vl},
                                       {"avx512vnni", f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni}};
  }, "Which SIMD instruction sets this CPU supports: {'avx2', 'avx512', 'avx512vnni'}.");
}
