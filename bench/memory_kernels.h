// Memory-streaming loops used to measure bandwidth (moe-bench-limits, moe-bench-kernels).
//
// Both need AVX-512F at run time (callers check __builtin_cpu_supports("avx512f")); they are
// compiled with per-function target attributes, so the rest of the build keeps its flags.
// `data`, `src` and `dst` must be 64-byte aligned and n a multiple of kFloatsPerBlock.
// Stateless; any thread may call them.
//
//   g_sink += ReadSumAvx512(buffer, n);   // reads n floats once
#pragma once

#include <cstdint>

namespace moe::bench {

// Floats per loop iteration: 8 zmm registers, 512 bytes.
inline constexpr int64_t kFloatsPerBlock = 128;

// Sum of data[0, n) with AVX-512 loads into 8 independent accumulators.
float ReadSumAvx512(const float* data, int64_t n);

// dst[i] = src[i] for i in [0, n), with ordinary (write-allocate) stores.
void CopyAvx512(const float* src, float* dst, int64_t n);

}  // namespace moe::bench
