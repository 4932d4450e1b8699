#include "bench/memory_kernels.h"

#include <immintrin.h>

namespace moe::bench {

__attribute__((target("avx512f"))) float ReadSumAvx512(const float* data, int64_t n) {
  __m512 acc[8];
  for (__m512& a : acc) a = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += kFloatsPerBlock) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_add_ps(acc[j], _mm512_load_ps(data + i + 16 * j));
  }
  __m512 total = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]),
                                             _mm512_add_ps(acc[2], acc[3])),
                               _mm512_add_ps(_mm512_add_ps(acc[4], acc[5]),
                                             _mm512_add_ps(acc[6], acc[7])));
  // _mm512_reduce_add_ps trips a GCC 12 -Wuninitialized false positive in its header.
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, total);
  float sum = 0;
  for (float lane : lanes) sum += lane;
  return sum;
}

__attribute__((target("avx512f"))) void CopyAvx512(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += kFloatsPerBlock) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      _mm512_store_ps(dst + i + 16 * j, _mm512_load_ps(src + i + 16 * j));
    }
  }
}

}  // namespace moe::bench
