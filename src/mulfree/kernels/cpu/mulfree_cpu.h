// Shared declarations of the `_cpu` extension: each kernel family lives in its own .cpp
// file and registers its Python entry points through one of these functions.
#pragma once
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void register_cpuinfo(nb::module_ &m);  // cpuinfo.cpp
void register_ternary(nb::module_ &m);  // ternary.cpp: packed 2-bit GEMV/GEMM, fused norm+quant
void register_lmul(nb::module_ &m);     // lmul.cpp: L-Mul matmul
void register_shiftadd(nb::module_ &m); // shiftadd.cpp: BCQ lookup-table GEMV

// Instruction sets the running CPU offers (queried once, at run time).
struct CpuFeatures {
  bool avx2, fma, avx512f, avx512bw, avx512vl, avx512vnni;
  bool amx_int8;  // AMX-TILE + AMX-INT8, and the OS granted this process the tile state
};
const CpuFeatures &cpu_features();
