// Prefill on T1R4 weights: each linear of the call is converted to T2R4 once (formats/t1.h -> formats/t2r4.h, the
// same codes) and runs as the T2R4 panel GEMMs (gemm.cpp). The conversion costs about one token's GEMV, against the
// T GEMV tiles' decodes it replaces (batches of at least a panel tier's min_tokens, 16-64 tokens, come here).
#include "gemm.h"

#include <cstring>

namespace ternary {
namespace {

// T2R4 byte offset of the 32 codes k0 .. k0 + 31 (k0 % 32 == 0) of row r in a row group, and the bit pair they go
// to: block k0 / 256, row r's 64 bytes, byte k0 % 64, bit pair (k0 % 256) / 64.
inline int64_t t2_offset(int64_t k0, int r) { return k0 / kBlock * kBlock + r * t2r4::kRowBytes + k0 % 64; }
inline int t2_shift(int64_t k0) { return 2 * (int)(k0 % kBlock / 64); }

// Codes past the T1R4 rows (k in [Kpad1, Kpad2) when 160-padding is shorter than 256-padding): weight 0, code 1.
void pad_groups(uint8_t *W2, int64_t Kpad1, int64_t Kpad2, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g)
    for (int r = 0; r < kRows; ++r)
      for (int64_t k0 = Kpad1; k0 < Kpad2; k0 += 32) {
        uint8_t *dst = W2 + g * Kpad2 + t2_offset(k0, r);
        for (int i = 0; i < 32; ++i) dst[i] |= (uint8_t)(1 << t2_shift(k0));
      }
}

void convert_scalar(const uint8_t *W1, int64_t Kpad1, uint8_t *W2, int64_t Kpad2, int64_t g0, int64_t g1) {
  const int64_t kmax = std::min(Kpad1, Kpad2);
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t *src = W1 + g * t1::group_bytes(Kpad1);
    uint8_t *dst = W2 + g * Kpad2;
    for (int64_t b = 0; b < Kpad1 / t1::kBlock; ++b)
      for (int r = 0; r < kRows; ++r)
        for (int j = 0; j < t1::kTrits; ++j) {
          const int64_t k0 = b * t1::kBlock + 32 * j;
          if (k0 >= kmax) continue;
          for (int i = 0; i < 32; ++i)
            dst[t2_offset(k0, r) + i] |= (uint8_t)(t1::code(src[b * 128 + r * 32 + i], j) << t2_shift(k0));
        }
  }
}

// The codes from the compares of gemv_t1_avx2.cpp: code = 1 + [s < -42] - [s > 42] with s = m ^ 0x80 (masks -1 / 0).
__attribute__((target("avx2"))) void convert_avx2(const uint8_t *W1, int64_t Kpad1, uint8_t *W2, int64_t Kpad2,
                                                   int64_t g0, int64_t g1) {
  const __m256i flip = _mm256_set1_epi8((char)0x80), lo = _mm256_set1_epi8(-42), hi = _mm256_set1_epi8(42);
  const __m256i one = _mm256_set1_epi8(1);
  const int64_t kmax = std::min(Kpad1, Kpad2);
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t *src = W1 + g * t1::group_bytes(Kpad1);
    uint8_t *dst = W2 + g * Kpad2;
    for (int64_t b = 0; b < Kpad1 / t1::kBlock; ++b)
      for (int r = 0; r < kRows; ++r) {
        __m256i s = _mm256_xor_si256(ld256(src + b * 128 + r * 32), flip);
        for (int j = 0; j < t1::kTrits; ++j) {
          const int64_t k0 = b * t1::kBlock + 32 * j;
          if (k0 < kmax) {
            const __m256i c = _mm256_add_epi8(one, _mm256_sub_epi8(_mm256_cmpgt_epi8(lo, s), _mm256_cmpgt_epi8(s, hi)));
            __m256i *p = (__m256i *)(dst + t2_offset(k0, r));
            // codes <= 2 << 6: 16-bit shifts never carry into the next byte
            _mm256_storeu_si256(p, _mm256_or_si256(_mm256_loadu_si256(p), _mm256_sll_epi16(c, _mm_cvtsi32_si128(t2_shift(k0)))));
          }
          s = _mm256_add_epi8(s, _mm256_add_epi8(s, s));
        }
      }
  }
}

}  // namespace

void run_linears_t1_panels(Isa isa, int threads, const LinearJob *jobs, int njobs) {
  // (References to the caller's buffers, so the pool's workers see them, not their own thread_local ones.)
  thread_local std::vector<LineVec<uint8_t>> caller_w;
  thread_local std::vector<LineVec<int8_t>> caller_q;
  thread_local std::vector<LinearJob> caller_jobs;
  std::vector<LineVec<uint8_t>> &w2 = caller_w;
  std::vector<LineVec<int8_t>> &q2 = caller_q;
  std::vector<LinearJob> &t2 = caller_jobs;
  w2.resize((size_t)njobs);
  q2.resize((size_t)njobs);
  t2.assign(jobs, jobs + njobs);
  for (int i = 0; i < njobs; ++i) {
    const LinearJob &j = jobs[i];
    // Columns past K hold zero activations, so the T2R4 rows end at K rounded up to 256 (shorter or longer than
    // the T1R4 rows' K rounded up to 160): codes past Kpad2 are dropped, and those past Kpad1 are padding.
    const int64_t G = j.groups(), Kpad2 = t2r4::padded_k(j.K ? j.K : j.Kpad), T = j.T;
    w2[(size_t)i].resize((size_t)(G * Kpad2));
    uint8_t *W2 = w2[(size_t)i].data();
    for_ranges(threads, G, [&](int64_t g0, int64_t g1) {
      std::memset(W2 + g0 * Kpad2, 0, (size_t)((g1 - g0) * Kpad2));  // the codes are or-ed in
      if (isa == Isa::Scalar)
        convert_scalar(j.W, j.Kpad, W2, Kpad2, g0, g1);
      else
        convert_avx2(j.W, j.Kpad, W2, Kpad2, g0, g1);
      pad_groups(W2, j.Kpad, Kpad2, g0, g1);  // nothing when Kpad2 <= Kpad1
    });
    // The activations at the T2R4 row length (zeros past K in both).
    q2[(size_t)i].assign((size_t)(T * Kpad2), 0);
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(q2[(size_t)i].data() + t * Kpad2, j.Q + t * j.Kpad, (size_t)std::min(j.Kpad, Kpad2));
    LinearJob &c = t2[(size_t)i];
    c.W = W2;
    c.Kpad = Kpad2;
    c.Q = q2[(size_t)i].data();
    c.fmt = Format::T2R4;
    c.wsum = nullptr;
  }
  run_linears_panels(isa, threads, t2.data(), njobs);
}

}  // namespace ternary
