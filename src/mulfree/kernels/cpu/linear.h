// Internal API of the packed ternary kernels: one BitLinear application on int8 activations (LinearJob) and
// the drivers that run a step's linears over the thread pool, as GEMV tiles (gemv.h, gemv_<isa>.cpp) or as
// panel GEMMs for prefill (gemm.h, gemm_<isa>.cpp).
//
// Every path computes the exact integer dot sum_k trit[n, k] * q[t, k] (T2R4 kernels as sum_k c * q - sum_k q with
// c = trit + 1, formats/t2r4.h; T1R4 kernels directly, formats/t1.h), then y = dot * a_scale[t] * w_scale.
#pragma once
#include "formats/t1.h"
#include "formats/t2r4.h"
#include "mulfree_cpu.h"
#include "pool.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

// Target strings of the AVX-512 tiers (each kernel carries its ISA; the package is built for generic x86-64).
#define MF_AVX512 "avx512f,avx512bw,avx512vl,avx512vnni"
#define MF_AMX MF_AVX512 ",amx-tile,amx-int8"

namespace ternary {

using t2r4::kBlock;
using t2r4::kRows;

constexpr int64_t kPanelRows = 32;  // output rows per panel of the panel GEMMs: 2 row tiles = 8 row groups

// The packed weight formats (both interleave rows by 4, so row groups are the unit of work of every driver).
enum class Format { T2R4 = 0, T1R4 = 1 };
// The Format of a name ("t2" or "t1"); std::invalid_argument otherwise.
Format parse_format(const std::string &name);
// Kpad of a K-long row and the bytes of one row group (4 rows x Kpad weights) in format f.
inline int64_t padded_k(Format f, int64_t K) { return f == Format::T1R4 ? t1::padded_k(K) : t2r4::padded_k(K); }
inline int64_t group_bytes(Format f, int64_t Kpad) { return f == Format::T1R4 ? t1::group_bytes(Kpad) : Kpad; }

// A BitLinear application on quantized activations: Y[t, n] = (dot - sumq[t]) * a_scale[t] * w_scale.
struct LinearJob {
  const uint8_t *W;  // packed [ceil(N/4), Kpad]
  int64_t N, Kpad;
  float w_scale;
  const int8_t *Q;  // [T, Kpad]
  const int32_t *sumq;
  const float *a_scale;
  int64_t T;
  float *Y;      // [T, ldy] float output, or
  int32_t *Yi;   // [T, ldy] exact integer output sum_k trit * q
  int64_t ldy;
  // glu = I > 0 (panel GEMMs only, I % kPanelRows == 0): rows [0, I) are gates, [I, 2I) ups, and the output
  // is Y[t, n] = silu(gate_n) * up_n for n < I, as glu_row would compute it from the [T, 2I] result.
  int64_t glu = 0;
  Format fmt = Format::T2R4;
  const int32_t *wsum = nullptr;  // T1R4: sum_k trit[n, k] per row (rows of every group, padding rows 0)
  int64_t K = 0;                  // the rows' real length (0: Kpad); T1R4 prefill converts only that far
  int64_t groups() const { return t2r4::row_groups(N); }
  int64_t group_bytes() const { return ternary::group_bytes(fmt, Kpad); }
  int64_t out_groups() const { return glu ? glu / kRows : groups(); }  // row groups that own outputs
};

constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Software prefetch into L2 of the 256-byte block kPrefetchBlocks ahead (4 KiB): faster cold GEMV sweeps than
// none or L1 2 KiB ahead (docs/packed.md). Prefetches never fault, so running past the matrix end is harmless.
constexpr int64_t kPrefetchBlocks = 16;

__attribute__((always_inline)) inline void prefetch_line_l2(const uint8_t *p) {
  _mm_prefetch((const char *)p, _MM_HINT_T1);
}
__attribute__((always_inline)) inline void prefetch_block(const uint8_t *p) {
  for (int l = 0; l < 4; ++l) prefetch_line_l2(p + 64 * l);
}

__attribute__((target("avx2"), always_inline)) inline __m256i ld256(const void *p) {
  return _mm256_loadu_si256((const __m256i *)p);
}

// Work items of the GEMV regions: 16 row groups (64 rows), small enough to balance two threads, big
// enough that claiming one (an atomic CAS) is noise.
constexpr int64_t kChunk = 16;

// The first kPrefetchBlocks blocks of rows g0.. of j into L2. The kernels prefetch that far ahead along
// the rows, so at a work item's end they prefetch the next item's head, which another thread may own, and
// the head of the next item this thread claims (or of the next job in the same item) would be read cold.
// Items are claimed dynamically; Pool::likely_next names the likely next one.
inline void prefetch_head(const LinearJob &j, int64_t g0) {
  for (int64_t b = 0; b < kPrefetchBlocks; ++b) prefetch_block(j.W + g0 * j.group_bytes() + b * kBlock);
}

// sum_k trit[n, k] of every row (padding rows too: [row_groups(N) * 4]) of T1R4 weights [row groups, Kpad * 4 / 5].
LineVec<int32_t> t1_row_sums(const uint8_t *W, int64_t N, int64_t Kpad);

// The work items of one parallel region over several linears: (job, first row group), every `step`
// row groups of every job.
std::vector<std::pair<int, int64_t>> row_group_chunks(const LinearJob *jobs, int njobs, int64_t step);
// Rows of row groups [g0, g1) of j for all its tokens, by the GEMV tiles of `isa` (calling thread only).
void linear_rows(Isa isa, const LinearJob &j, int64_t g0, int64_t g1);
// Whether a batch of T tokens of format `fmt` runs as panel GEMMs on `isa` (gemm.cpp: the thresholds per tier, and
// one more for T1R4, whose weights are converted to T2R4 for them).
bool uses_panels(Isa isa, Format fmt, int64_t T);
// Runs several independent linears in one parallel region (GEMV tiles split by row groups, or panel GEMMs); the
// jobs of one call share a format.
void run_linears(Isa isa, int threads, const LinearJob *jobs, int njobs);
// All linears of one call as panel GEMMs (gemm.cpp); T1R4 linears converted to T2R4 first (gemm_t1.cpp).
void run_linears_panels(Isa isa, int threads, const LinearJob *jobs, int njobs);
void run_linears_t1_panels(Isa isa, int threads, const LinearJob *jobs, int njobs);

// Runs linears of equal N in one parallel region whose chunks own the same rows of every job, then
// calls epi(n0, n1) on those rows in the same chunk: an elementwise step over the outputs (the MLGRU state
// update over i/f/g, silu(gate) * up over the two GLU halves) runs split across the threads, next to the
// outputs it reads, at no extra hand-off. Not for panel GEMMs (the caller checks uses_panels).
template <class F>
void run_aligned_linears(Isa isa, int threads, const LinearJob *jobs, int njobs, F &&epi) {
  const int64_t N = jobs[0].N, groups = jobs[0].groups();
  auto rows = [&](int64_t g0, int64_t g1) {
    for (int i = 1; i < njobs; ++i) prefetch_head(jobs[i], g0);
    for (int i = 0; i < njobs; ++i) linear_rows(isa, jobs[i], g0, g1);
    epi(g0 * kRows, std::min(N, g1 * kRows));
  };
  if (N * jobs[0].Kpad * jobs[0].T * njobs < (int64_t(1) << 20)) return rows(0, groups);  // as run_linears
  const int64_t nc = (groups + kChunk - 1) / kChunk;
  get_pool(threads).run_chunks(nc, [&](int64_t c) {
    if (const int64_t cn = Pool::likely_next(c); cn >= 0 && cn < nc) prefetch_head(jobs[0], cn * kChunk);
    rows(c * kChunk, std::min(groups, (c + 1) * kChunk));
  });
}

// Splits [0, n) into contiguous ranges over the pool (inline when n < 2: decode steps are too
// small to pay for a hand-off).
template <class F>
void for_ranges(int threads, int64_t n, F &&fn) {
  if (n < 2) {
    fn(0, n);
    return;
  }
  const int64_t nc = std::min<int64_t>(n, 16);
  get_pool(threads).run_chunks(nc, [&](int64_t c) { fn(n * c / nc, n * (c + 1) / nc); });
}

}  // namespace ternary
