// L-Mul matmul on float32 bit patterns: C[M,N] = sum_k lmul(A[M,K], B[K,N]), float32 accumulation in
// ascending k (the order of the torch reference `mulfree.ops.lmul.lmul_matmul`, so results are equal
// bit for bit). Each product is one integer add on the magnitude fields:
//
//   float32: s eeeeeeee mmmmmmmmmmmmmmmmmmmmmmm      |x|bits + |y|bits - OFFSET, sign = xor
//   OFFSET = (127 << 23) - ((1 << 23) >> l(k))      (0x3F780000 for a full mantissa; passed in)
//
// bfloat16 operands are float32 values with zero low bits (same exponent range, same OFFSET), so this
// kernel also serves bf16 and k-bit operands rounded by the caller.
// Special values as in the reference: zero/subnormal operand -> 0, underflow -> 0, overflow -> inf,
// NaN operand or inf*0 -> 0x7FC00000, inf*nonzero -> inf; the sign is the xor of the operand signs.
// Tiers: lmul_f32_ref (one product), scalar/AVX2/AVX-512 matmuls chosen at run time.
#include "mulfree_cpu.h"

#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr uint32_t kMag = 0x7FFFFFFFu, kSign = 0x80000000u, kMinNormal = 0x00800000u;
constexpr uint32_t kInf = 0x7F800000u, kNaN = 0x7FC00000u;

// One L-Mul product on float32 bit patterns.
inline uint32_t lmul_f32_ref(uint32_t a, uint32_t b, uint32_t offset) {
  const uint32_t ma = a & kMag, mb = b & kMag;
  const bool za = ma < kMinNormal, zb = mb < kMinNormal;
  const bool ia = ma == kInf, ib = mb == kInf;
  if (ma > kInf || mb > kInf || (ia && zb) || (ib && za)) return kNaN;
  const uint32_t sign = (a ^ b) & kSign;
  if (za || zb) return sign;
  if (ia || ib) return sign | kInf;
  const uint32_t sum = ma + mb;  // < 2^32: both fields are below 0x7F800000
  if (sum < offset + kMinNormal) return sign;  // exponent underflow
  const uint32_t mag = sum - offset;
  return sign | (mag >= kInf ? kInf : mag);
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Args {
  const uint32_t *a;  // [M, K] row-major
  const uint32_t *b;  // [K, N] row-major
  float *c;           // [M, N]
  int64_t M, K, N;
  uint32_t offset;
};

void rows_scalar(const Args &p, int64_t r0, int64_t r1) {
  std::vector<float> acc(p.N);
  for (int64_t i = r0; i < r1; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k = 0; k < p.K; ++k) {
      const uint32_t a = p.a[i * p.K + k];
      const uint32_t *brow = p.b + k * p.N;
      for (int64_t j = 0; j < p.N; ++j) acc[j] += bits_to_float(lmul_f32_ref(a, brow[j], p.offset));
    }
    std::copy(acc.begin(), acc.end(), p.c + i * p.N);
  }
}

// AVX2: 8 lanes. Unsigned compares are done as signed compares after flipping the top bit.
__attribute__((target("avx2,fma"))) inline __m256i lmul8(uint32_t a, __m256i b, uint32_t offset) {
  const __m256i flip = _mm256_set1_epi32(int(kSign));
  const __m256i mb = _mm256_and_si256(b, _mm256_set1_epi32(int(kMag)));
  const __m256i sign = _mm256_and_si256(_mm256_xor_si256(b, _mm256_set1_epi32(int(a))), flip);
  const uint32_t ma = a & kMag;
  const __m256i sum = _mm256_add_epi32(mb, _mm256_set1_epi32(int(ma)));
  const __m256i sumf = _mm256_xor_si256(sum, flip);
  // mb fields are < 2^31, so signed compares on mb are exact
  const __m256i under = _mm256_cmpgt_epi32(_mm256_set1_epi32(int((offset + kMinNormal) ^ kSign)), sumf);
  const __m256i over = _mm256_cmpgt_epi32(sumf, _mm256_set1_epi32(int((offset + kInf - 1) ^ kSign)));
  __m256i r = _mm256_sub_epi32(sum, _mm256_set1_epi32(int(offset)));
  r = _mm256_andnot_si256(under, r);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(int(kInf)), over);
  const __m256i zb = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(kMinNormal)), mb);
  const __m256i ib = _mm256_cmpeq_epi32(mb, _mm256_set1_epi32(int(kInf)));
  const __m256i nb = _mm256_cmpgt_epi32(mb, _mm256_set1_epi32(int(kInf)));
  const bool za = ma < kMinNormal, ia = ma == kInf, na = ma > kInf;
  r = za ? _mm256_setzero_si256() : _mm256_andnot_si256(zb, r);
  if (ia) r = _mm256_set1_epi32(int(kInf));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(int(kInf)), ib);
  r = _mm256_or_si256(r, sign);
  __m256i nan = nb;
  if (na) nan = _mm256_set1_epi32(-1);
  if (ia) nan = _mm256_or_si256(nan, zb);
  if (za) nan = _mm256_or_si256(nan, ib);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(int(kNaN)), nan);
}

__attribute__((target("avx2,fma"))) void rows_avx2(const Args &p, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    float *crow = p.c + i * p.N;
    int64_t j = 0;
    for (; j + 16 <= p.N; j += 16) {  // two accumulators: independent add chains
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (int64_t k = 0; k < p.K; ++k) {
        const uint32_t a = p.a[i * p.K + k];
        const uint32_t *brow = p.b + k * p.N + j;
        acc0 = _mm256_add_ps(acc0, _mm256_castsi256_ps(lmul8(a, _mm256_loadu_si256((const __m256i *)brow), p.offset)));
        acc1 = _mm256_add_ps(acc1, _mm256_castsi256_ps(lmul8(a, _mm256_loadu_si256((const __m256i *)(brow + 8)), p.offset)));
      }
      _mm256_storeu_ps(crow + j, acc0);
      _mm256_storeu_ps(crow + j + 8, acc1);
    }
    for (; j < p.N; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) acc += bits_to_float(lmul_f32_ref(p.a[i * p.K + k], p.b[k * p.N + j], p.offset));
      crow[j] = acc;
    }
  }
}

// AVX-512: 16 lanes with mask registers; a tail mask covers N % 16.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i lmul16(uint32_t a, __m512i b, uint32_t offset) {
  const __m512i mb = _mm512_and_si512(b, _mm512_set1_epi32(int(kMag)));
  const __m512i sign = _mm512_and_si512(_mm512_xor_si512(b, _mm512_set1_epi32(int(a))), _mm512_set1_epi32(int(kSign)));
  const uint32_t ma = a & kMag;
  const __m512i sum = _mm512_add_epi32(mb, _mm512_set1_epi32(int(ma)));
  const __mmask16 under = _mm512_cmplt_epu32_mask(sum, _mm512_set1_epi32(int(offset + kMinNormal)));
  const __mmask16 over = _mm512_cmpge_epu32_mask(sum, _mm512_set1_epi32(int(offset + kInf)));
  __m512i r = _mm512_maskz_sub_epi32(__mmask16(~under), sum, _mm512_set1_epi32(int(offset)));
  r = _mm512_mask_mov_epi32(r, over, _mm512_set1_epi32(int(kInf)));
  const __mmask16 zb = _mm512_cmplt_epu32_mask(mb, _mm512_set1_epi32(int(kMinNormal)));
  const __mmask16 ib = _mm512_cmpeq_epu32_mask(mb, _mm512_set1_epi32(int(kInf)));
  const __mmask16 nb = _mm512_cmpgt_epu32_mask(mb, _mm512_set1_epi32(int(kInf)));
  const bool za = ma < kMinNormal, ia = ma == kInf, na = ma > kInf;
  __mmask16 zero = za ? __mmask16(0xFFFF) : zb;
  __mmask16 inf = ia ? __mmask16(0xFFFF) : ib;
  __mmask16 nan = na ? __mmask16(0xFFFF) : nb;
  nan |= (ia ? zb : 0) | (za ? ib : 0);
  r = _mm512_maskz_mov_epi32(__mmask16(~zero), r);
  r = _mm512_mask_mov_epi32(r, inf, _mm512_set1_epi32(int(kInf)));
  r = _mm512_or_si512(r, sign);
  return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(int(kNaN)));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void rows_avx512(const Args &p, int64_t r0, int64_t r1) {
  // Block of 4 rows x 32 columns: each B load feeds 4 rows, 8 independent accumulators.
  constexpr int R = 4;
  for (int64_t i0 = r0; i0 < r1; i0 += R) {
    const int rows = int(std::min<int64_t>(R, r1 - i0));
    for (int64_t j = 0; j < p.N; j += 32) {
      const int64_t w0 = std::min<int64_t>(16, p.N - j), w1 = std::min<int64_t>(16, std::max<int64_t>(0, p.N - j - 16));
      const __mmask16 m0 = __mmask16((1u << w0) - 1), m1 = __mmask16((1u << w1) - 1);
      __m512 acc[R][2];
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (int64_t k = 0; k < p.K; ++k) {
        const uint32_t *brow = p.b + k * p.N + j;
        const __m512i b0 = _mm512_maskz_loadu_epi32(m0, brow);
        const __m512i b1 = _mm512_maskz_loadu_epi32(m1, brow + 16);
        for (int r = 0; r < rows; ++r) {
          const uint32_t a = p.a[(i0 + r) * p.K + k];
          acc[r][0] = _mm512_add_ps(acc[r][0], _mm512_castsi512_ps(lmul16(a, b0, p.offset)));
          if (w1) acc[r][1] = _mm512_add_ps(acc[r][1], _mm512_castsi512_ps(lmul16(a, b1, p.offset)));
        }
      }
      for (int r = 0; r < rows; ++r) {
        float *crow = p.c + (i0 + r) * p.N + j;
        _mm512_mask_storeu_ps(crow, m0, acc[r][0]);
        if (w1) _mm512_mask_storeu_ps(crow + 16, m1, acc[r][1]);
      }
    }
  }
}

using RowsFn = void (*)(const Args &, int64_t, int64_t);

RowsFn pick(const std::string &backend) {
  switch (parse_isa(backend)) {
    case Isa::Avx512: return rows_avx512;
    case Isa::Avx2:
    case Isa::AvxVnni: return rows_avx2;
    default: return rows_scalar;
  }
}

using F32Mat = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

nb::ndarray<nb::numpy, float, nb::ndim<2>> lmul_matmul_f32(F32Mat a, F32Mat b, uint32_t offset,
                                                           const std::string &backend, int threads) {
  if (a.shape(1) != b.shape(0)) throw std::invalid_argument("lmul_matmul_f32: a is [M, K], b must be [K, N]");
  const int64_t M = int64_t(a.shape(0)), K = int64_t(a.shape(1)), N = int64_t(b.shape(1));
  const RowsFn fn = pick(backend);
  float *c = new float[size_t(std::max<int64_t>(1, M * N))];
  nb::capsule owner(c, [](void *ptr) noexcept { delete[] static_cast<float *>(ptr); });
  Args p{reinterpret_cast<const uint32_t *>(a.data()), reinterpret_cast<const uint32_t *>(b.data()), c, M, K, N, offset};
  {
    nb::gil_scoped_release release;
    int nt = threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency()));
    nt = int(std::min<int64_t>(nt, std::max<int64_t>(1, (M * N * K) >> 16)));  // small jobs: one thread
    nt = int(std::min<int64_t>(nt, std::max<int64_t>(1, M / 4)));
    if (nt <= 1) {
      fn(p, 0, M);
    } else {
      std::vector<std::thread> pool;
      const int64_t step = ((M + nt - 1) / nt + 3) / 4 * 4;  // whole 4-row blocks per thread
      for (int64_t r = 0; r < M; r += step) pool.emplace_back(fn, std::cref(p), r, std::min(M, r + step));
      for (auto &t : pool) t.join();
    }
  }
  return nb::ndarray<nb::numpy, float, nb::ndim<2>>(c, {size_t(M), size_t(N)}, owner);
}

}  // namespace

void register_lmul(nb::module_ &m) {
  m.def("lmul_matmul_f32", &lmul_matmul_f32, nb::arg("a"), nb::arg("b"), nb::arg("offset"),
        nb::arg("backend") = "scalar", nb::arg("threads") = 0,
        "L-Mul matmul of float32 matrices a [M, K] @ b [K, N] -> float32 [M, N]; products are integer adds "
        "of the bit patterns minus `offset` (0x3F780000 for full float32), accumulated in ascending k.");
}
