// Prefill on T1R4 weights: each linear of the call is converted to T2R4 once (formats/t1.h -> formats/t2r4.h, the
// same codes) and runs as the T2R4 panel GEMMs (gemm.cpp). The conversion costs about two tokens' GEMVs, against the
// T GEMV tiles' decodes it replaces (batches of at least 32 tokens come here: kT1PanelMinTokens, gemm.cpp).
#include "gemm.h"

#include <cstring>

namespace ternary {
namespace {

// A row is converted through a buffer of its codes (one byte each, k in order, L1-resident): the T1R4 digits are
// decoded into it, padding codes (1) fill it up to the T2R4 row length, and each 64-byte row block of T2R4 is then
// four of its 64-code runs or-ed at their bit pairs (formats/t2r4.h), written once.
void decode_row_scalar(const uint8_t *W1, int64_t Kpad1, int r, uint8_t *codes) {
  for (int64_t b = 0; b < Kpad1 / t1::kBlock; ++b)
    for (int j = 0; j < t1::kTrits; ++j)
      for (int i = 0; i < t1::kRowBytes; ++i)
        codes[b * t1::kBlock + 32 * j + i] = (uint8_t)t1::code(W1[b * 128 + r * t1::kRowBytes + i], j);
}

void pack_row_scalar(const uint8_t *codes, int64_t Kpad2, int r, uint8_t *W2) {
  for (int64_t k0 = 0; k0 < Kpad2; k0 += kBlock)
    for (int i = 0; i < t2r4::kRowBytes; ++i) {
      const uint8_t *c = codes + k0 + i;
      W2[k0 + r * t2r4::kRowBytes + i] = (uint8_t)(c[0] | c[64] << 2 | c[128] << 4 | c[192] << 6);
    }
}

// The codes from the compares of gemv_t1_avx2.cpp: code = 1 + [s < -42] - [s > 42] with s = m ^ 0x80 (masks -1 / 0).
__attribute__((target("avx2"))) void decode_row_avx2(const uint8_t *W1, int64_t Kpad1, int r, uint8_t *codes) {
  const __m256i flip = _mm256_set1_epi8((char)0x80), lo = _mm256_set1_epi8(-42), hi = _mm256_set1_epi8(42);
  const __m256i one = _mm256_set1_epi8(1);
  for (int64_t b = 0; b < Kpad1 / t1::kBlock; ++b) {
    __m256i s = _mm256_xor_si256(ld256(W1 + b * 128 + r * t1::kRowBytes), flip);
    for (int j = 0; j < t1::kTrits; ++j) {
      const __m256i c = _mm256_add_epi8(one, _mm256_sub_epi8(_mm256_cmpgt_epi8(lo, s), _mm256_cmpgt_epi8(s, hi)));
      _mm256_storeu_si256((__m256i *)(codes + b * t1::kBlock + 32 * j), c);
      s = _mm256_add_epi8(s, _mm256_add_epi8(s, s));
    }
  }
}

// Codes <= 2 << 6: the 16-bit shifts never carry into the next byte.
__attribute__((target("avx2"))) void pack_row_avx2(const uint8_t *codes, int64_t Kpad2, int r, uint8_t *W2) {
  for (int64_t k0 = 0; k0 < Kpad2; k0 += kBlock)
    for (int h = 0; h < t2r4::kRowBytes; h += 32) {
      const uint8_t *c = codes + k0 + h;
      const __m256i lo = _mm256_or_si256(ld256(c), _mm256_slli_epi16(ld256(c + 64), 2));
      const __m256i hi = _mm256_or_si256(_mm256_slli_epi16(ld256(c + 128), 4), _mm256_slli_epi16(ld256(c + 192), 6));
      _mm256_storeu_si256((__m256i *)(W2 + k0 + r * t2r4::kRowBytes + h), _mm256_or_si256(lo, hi));
    }
}

// Row groups [g0, g1) of a T1R4 matrix (rows Kpad1 long) as T2R4 rows Kpad2 long: codes past Kpad2 are dropped,
// those past Kpad1 are padding.
void convert_groups(Isa isa, const uint8_t *W1, int64_t Kpad1, uint8_t *W2, int64_t Kpad2, int64_t g0, int64_t g1) {
  thread_local LineVec<uint8_t> codes;
  codes.resize((size_t)std::max(Kpad1, Kpad2));
  std::memset(codes.data() + Kpad1, 1, (size_t)std::max<int64_t>(0, Kpad2 - Kpad1));
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t *src = W1 + g * t1::group_bytes(Kpad1);
    uint8_t *dst = W2 + g * Kpad2;
    for (int r = 0; r < kRows; ++r) {
      if (isa == Isa::Scalar) {
        decode_row_scalar(src, Kpad1, r, codes.data());
        pack_row_scalar(codes.data(), Kpad2, r, dst);
      } else {
        decode_row_avx2(src, Kpad1, r, codes.data());
        pack_row_avx2(codes.data(), Kpad2, r, dst);
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
    for_ranges(threads, G, [&](int64_t g0, int64_t g1) { convert_groups(isa, j.W, j.Kpad, W2, Kpad2, g0, g1); });
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
