// Shared declarations of the `_cpu` extension: each kernel family lives in its own .cpp
// file and registers its Python entry points through one of these functions.
#pragma once
#include <nanobind/nanobind.h>

#include <cstddef>
#include <cstdint>
#include <new>
#include <string>
#include <vector>

namespace nb = nanobind;

void register_cpuinfo(nb::module_ &m);  // cpuinfo.cpp
void register_ternary(nb::module_ &m);  // bind.cpp: packed 2-bit GEMV/GEMM, elementwise steps, Engine
void register_lmul(nb::module_ &m);     // lmul.cpp: L-Mul matmul
void register_shiftadd(nb::module_ &m); // shiftadd_bind.cpp: BCQ lookup-table GEMV / GEMM
void register_shiftadd_llama(nb::module_ &m);  // shiftadd_llama.cpp: Llama decode step on ShiftAdd layers
void register_hadamard(nb::module_ &m); // hadamard.cpp: block Walsh-Hadamard transform (incoherence)
void register_bcq_fit(nb::module_ &m);  // bcq_fit.cpp: Accuracy-mode BCQ column fit (quantizer)
void register_gptq_columns(nb::module_ &m);  // gptq_columns.cpp: GPTQ's column loop over a lazy block
void register_train_ops(nb::module_ &m);  // train_ops.cpp: fused element-wise forward/backward of MMfree training
void register_grad_amx(nb::module_ &m);   // grad_amx.cpp: a ternary BitLinear's backward products on AMX-BF16

// AMX and AVX-VNNI intrinsics need gcc >= 11 or clang >= 12; an older compiler builds everything but those
// paths. (-DMF_HAVE_AMX=0 / -DMF_HAVE_AVXVNNI=0 build without them on purpose.)
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                            (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define MF_NEW_X86_INTRINSICS 1
#else
#define MF_NEW_X86_INTRINSICS 0
#endif
#ifndef MF_HAVE_AMX
#define MF_HAVE_AMX MF_NEW_X86_INTRINSICS
#endif
#ifndef MF_HAVE_AVXVNNI
#define MF_HAVE_AVXVNNI MF_NEW_X86_INTRINSICS
#endif

// Instruction sets the running CPU offers (queried once, at run time).
struct CpuFeatures {
  bool avx2, fma, avxvnni, avx512f, avx512bw, avx512vl, avx512vnni;
  bool amx_int8;  // AMX-TILE + AMX-INT8, the OS granted this process the tile state, and MF_HAVE_AMX
  bool amx_bf16;  // the same with AMX-BF16 and AVX512-BF16 (Sapphire Rapids and later)
};
const CpuFeatures &cpu_features();

// The SIMD path a kernel runs. Names are the backends of mulfree.kernels ("avxvnni" = AVX2 plus the VEX
// vpdpbusd of Intel's client cores since Alder Lake; "avx512" = AVX-512 with VNNI), and the values index
// per-ISA kernel tables.
enum class Isa { Scalar = 0, Avx2 = 1, AvxVnni = 2, Avx512 = 3 };
// AVX-VNNI only adds the int8 dot product: every other kernel runs its AVX2 code there.
inline bool avx2_class(Isa isa) { return isa == Isa::Avx2 || isa == Isa::AvxVnni; }
// The Isa of a backend name; std::invalid_argument if the name is unknown or this CPU lacks it.
Isa parse_isa(const std::string &name);

// Storage aligned to a cache line (64 bytes). malloc aligns to 16 only, so a 64-byte vector load or an AMX
// tile row from a std::vector buffer straddles two lines, which slows the AMX tile loop down severely
// (benchmarks/amx_tiles.cpp measures it; docs/packed.md). Kernel scratch buffers use LineVec.
template <class T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <class U>
  LineAllocator(const LineAllocator<U> &) {}
  T *allocate(std::size_t n) { return static_cast<T *>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T *p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
  friend bool operator==(const LineAllocator &, const LineAllocator &) { return true; }
  friend bool operator!=(const LineAllocator &, const LineAllocator &) { return false; }
};
template <class T>
using LineVec = std::vector<T, LineAllocator<T>>;

// Resizes scratch that only grows to at least n elements: calls alternate between shapes, and a vector that shrank
// would fault in and zero-fill its pages again when it grows back.
template <class V>
void grow(V &v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize((size_t)n);
}
