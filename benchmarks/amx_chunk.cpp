// What bounds the AMX panel GEMM's chunk on one core (docs/packed.md, "What bounds the AMX step")? Nanoseconds per
// chunk of 32 rows x 512 k (4 KiB of 2-bit weights, 8 k steps of 4 tdpbssd per 32 tokens), the tile loop of
// gemm_amx.cpp with its parts added one at a time:
// - tiles: the 2 x 2 block's loads and multiplies alone (weight tiles from one L1 slice, activation tiles walking a
//   32-token x 2048-k block from L2, as in a 2048-wide linear);
// - + stream: the next chunk's 64 weight lines prefetched into L2 from a 1 GiB buffer, spread over the k steps;
// - + unpack: the 4 KiB of 2-bit weights shifted and masked into the 16 KiB slice before the tile loop (from a hot
//   source, so without the stream);
// - + both: the kernel's own order (the unpack reads the lines the previous chunk prefetched);
// - interleaved: the next chunk's unpack spread over this chunk's k steps into a second slice (4-step chunks, 8
//   lines a step), with and without the stream;
// - four panels: 4-step chunks run for four panels in turn (each panel's C tiles stored and reloaded around its k
//   steps), so a k range's activation tiles come from L2 once for four panels; with and without the stream.
// Every mode runs the same tile instructions on the same data; only what surrounds them changes. Linux only
// (it asks the kernel for the tile state); exits with a message on a CPU without AMX-INT8.
//
//   g++ -O2 -o /tmp/amx_chunk benchmarks/amx_chunk.cpp && /tmp/amx_chunk
//
// Prints ns per chunk for 32 and 128 tokens (best of 3 passes) and a JSON line.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#define AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw"), noinline))

namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
TileConfig config;

constexpr int64_t kSteps = 32;       // k steps of the activation block (2048 k)
constexpr int64_t kChunkBytes = 4096;  // 2-bit weights of one 8-step chunk

// Four tile rows (k steps s = 0..3 of 16 rows apart by 2048 bytes in the slice) from one 64-byte line.
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void unpack_line(const uint8_t *src, int8_t *dst) {
  const __m512i m3 = _mm512_set1_epi8(3), v = _mm512_load_si512(src);
  for (int s = 0; s < 4; ++s) _mm512_store_si512(dst + s * 2048, _mm512_and_si512(_mm512_srli_epi16(v, 2 * s), m3));
}
// Line l of a chunk into the slice: row block l / 32 (4 k steps), row tile l / 16 % 2, row l % 16.
inline int8_t *line_dst(int8_t *slice, int l) { return slice + (l / 32) * 8192 + (l / 16 % 2) * 1024 + (l % 16) * 64; }

__attribute__((target("amx-tile"), always_inline)) inline void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// One k step of the 2 x 2 block: C tiles tmm0-3 += weight tiles (tmm4-5) x activation tiles (tmm6-7).
__attribute__((target("amx-tile,amx-int8"), always_inline)) inline void step(const int8_t *w, const int8_t *a) {
  _tile_loadd(4, w, 64);
  _tile_loadd(6, a, 64);
  _tile_loadd(7, a + 1024, 64);
  _tile_dpbssd(0, 4, 6);
  _tile_loadd(5, w + 1024, 64);
  _tile_dpbssd(2, 4, 7);
  _tile_dpbssd(1, 5, 6);
  _tile_dpbssd(3, 5, 7);
}

// Chunks of 8 k steps in the kernel's order; `stream`: prefetch chunk c + 1 from S during chunk c; `unpack`: unpack
// chunk c (from S when streaming, else from a hot 4 KiB) into the slice before its tile loop.
AMX double serial(const uint8_t *S, int64_t nchunks, int tokens, bool stream, bool unpack, int8_t *slice,
                  const int8_t *acts) {
  _tile_loadconfig(&config);
  zero_c();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t c = 0; c < nchunks; ++c) {
    const uint8_t *src = stream ? S + c * kChunkBytes : S, *next = S + (c + 1) * kChunkBytes;
    if (unpack)
      for (int l = 0; l < 64; ++l) unpack_line(src + l * 64, line_dst(slice, l));
    int pf = 0;
    for (int tb = 0; tb < tokens / 32; ++tb)
      for (int ks = 0; ks < 8; ++ks) {
        step(slice + ks * 2048, acts + (tb * kSteps + (c * 8 + ks) % kSteps) * 2048);
        for (int i = 0; stream && i < 64 / (8 * tokens / 32) && pf < 64; ++i, ++pf)
          _mm_prefetch((const char *)next + pf * 64, _MM_HINT_T1);
      }
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  _tile_release();
  return dt / nchunks * 1e9;
}

// Chunks of 4 k steps, two slices: chunk c multiplies slice c % 2 while its k steps unpack chunk c + 1 into the
// other, 8 lines a step (on the first 32-token block); streaming prefetches chunk c + 2 meanwhile. ns per 8 k steps.
AMX double interleaved(const uint8_t *S, int64_t nchunks, int tokens, bool stream, int8_t *slices, const int8_t *acts) {
  _tile_loadconfig(&config);
  zero_c();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t c = 0; c < nchunks; ++c) {
    int8_t *now = slices + (c % 2) * 8192, *ahead = slices + ((c + 1) % 2) * 8192;
    const uint8_t *src = stream ? S + (c + 1) * 2048 : S, *pf = S + (c + 2) * 2048;
    for (int tb = 0; tb < tokens / 32; ++tb)
      for (int ks = 0; ks < 4; ++ks) {
        step(now + ks * 2048, acts + (tb * kSteps + (c * 4 + ks) % kSteps) * 2048);
        for (int i = 0; tb == 0 && i < 8; ++i) {
          const int l = ks * 8 + i;
          unpack_line(src + l * 64, line_dst(ahead, l));
          if (stream) _mm_prefetch((const char *)pf + l * 64, _MM_HINT_T1);
        }
      }
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  _tile_release();
  return dt / nchunks * 1e9 * 2;
}

// Four panels per k range: chunks of 4 k steps, each run for 4 panels in turn (the C tiles of a panel loaded from and
// stored to an L1 buffer around its k steps), so the range's activation tiles are read from L2 once for four
// panels; each panel's slice is unpacked before its k steps (from the stream when streaming, which prefetches the
// next range's lines meanwhile). ns per panel and 8 k steps.
AMX double four_panels(const uint8_t *S, int64_t nranges, int tokens, bool stream, int8_t *slice, const int8_t *acts,
                       int32_t *C) {
  _tile_loadconfig(&config);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t c = 0; c < nranges; ++c) {
    const uint8_t *src = stream ? S + c * 4 * 2048 : S, *next = S + (c + 1) * 4 * 2048;
    int pf = 0;
    for (int p = 0; p < 4; ++p) {
      for (int l = 0; l < 32; ++l) unpack_line(src + p * 2048 + l * 64, line_dst(slice, l));
      for (int tb = 0; tb < tokens / 32; ++tb) {
        int32_t *c4 = C + (p * 4 + tb) * 1024;
        _tile_loadd(0, c4, 64);
        _tile_loadd(1, c4 + 256, 64);
        _tile_loadd(2, c4 + 512, 64);
        _tile_loadd(3, c4 + 768, 64);
        for (int ks = 0; ks < 4; ++ks) {
          step(slice + ks * 2048, acts + (tb * kSteps + (c * 4 + ks) % kSteps) * 2048);
          for (int i = 0; stream && i < 8 / (tokens / 32); ++i, ++pf) _mm_prefetch((const char *)next + pf * 64, _MM_HINT_T1);
        }
        _tile_stored(0, c4, 64);
        _tile_stored(1, c4 + 256, 64);
        _tile_stored(2, c4 + 512, 64);
        _tile_stored(3, c4 + 768, 64);
      }
    }
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  _tile_release();
  return dt / nranges / 4 * 1e9 * 2;
}

template <class F>
double best_of_3(F &&run) {
  double best = 1e30;
  for (int pass = 0; pass < 3; ++pass) best = std::min(best, run());
  return best;
}

}  // namespace

int main() {
  if (!__builtin_cpu_supports("amx-int8") || syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) != 0) {
    std::printf("this CPU (or kernel) offers no AMX-INT8 tiles\n");
    return 1;
  }
  for (int i = 0; i < 8; ++i) {
    config.rows[i] = 16;
    config.colsb[i] = 64;
  }
  const int64_t bytes = int64_t(1) << 30, chunks = bytes / kChunkBytes - 2;
  auto *S = (uint8_t *)std::aligned_alloc(4096, bytes);
  auto *slices = (int8_t *)std::aligned_alloc(64, 2 * 16384);
  auto *acts = (int8_t *)std::aligned_alloc(64, 4 * kSteps * 2048);  // up to 128 tokens
  std::memset(S, 0x55, bytes);
  std::memset(slices, 1, 2 * 16384);
  std::memset(acts, 1, 4 * kSteps * 2048);
  const char *names[8] = {"tiles", "stream", "unpack", "both", "interleaved", "interleaved_stream", "four_panels", "four_panels_stream"};
  double ns[2][8];
  auto *C = (int32_t *)std::aligned_alloc(64, 16 * 4096);
  std::memset(C, 0, 16 * 4096);
  for (int r = 0; r < 2; ++r) {
    const int tokens = r ? 128 : 32;
    const int64_t hot = 20000, cold = chunks / (tokens / 32) / 4;  // a quarter of the buffer per pass
    ns[r][0] = best_of_3([&] { return serial(S, hot, tokens, false, false, slices, acts); });
    ns[r][1] = best_of_3([&] { return serial(S, cold, tokens, true, false, slices, acts); });
    ns[r][2] = best_of_3([&] { return serial(S, hot, tokens, false, true, slices, acts); });
    ns[r][3] = best_of_3([&] { return serial(S, cold, tokens, true, true, slices, acts); });
    ns[r][4] = best_of_3([&] { return interleaved(S, 2 * hot, tokens, false, slices, acts); });
    ns[r][5] = best_of_3([&] { return interleaved(S, 2 * cold, tokens, true, slices, acts); });
    ns[r][6] = best_of_3([&] { return four_panels(S, hot / 2, tokens, false, slices, acts, C); });
    ns[r][7] = best_of_3([&] { return four_panels(S, cold / 2, tokens, true, slices, acts, C); });
  }
  std::printf("one core, ns per chunk of 32 rows x 512 k (best of 3)\n%-20s %8s %8s\n", "", "32 tok", "128 tok");
  for (int m = 0; m < 8; ++m) std::printf("%-20s %8.0f %8.0f\n", names[m], ns[0][m], ns[1][m]);
  std::printf("{\"bench\": \"amx_chunk\"");
  for (int r = 0; r < 2; ++r)
    for (int m = 0; m < 8; ++m) std::printf(", \"%s_%d\": %.0f", names[m], r ? 128 : 32, ns[r][m]);
  std::printf("}\n");
}
