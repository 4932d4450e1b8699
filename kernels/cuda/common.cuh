// Internal to kernels/cuda: small device helpers shared by the .cu files (bf16 bits,
// warp/block reductions). Device code only; no Abseil.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moe::kernels::cuda::internal {

__device__ __forceinline__ float Bf16BitsToF32(uint16_t v) {
  return __uint_as_float(static_cast<uint32_t>(v) << 16);
}

// Round to nearest even, NaN stays NaN (same as common::F32ToBf16).
__device__ __forceinline__ uint16_t F32ToBf16Bits(float f) {
  const uint32_t bits = __float_as_uint(f);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) {
    return static_cast<uint16_t>((bits >> 16) | 0x40);
  }
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// Element `i` of an f32 or bf16 array, widened to f32.
template <bool kBf16>
__device__ __forceinline__ float LoadWeight(const void* data, int64_t i) {
  if constexpr (kBf16) {
    return Bf16BitsToF32(static_cast<const uint16_t*>(data)[i]);
  } else {
    return static_cast<const float*>(data)[i];
  }
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float BlockSum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = WarpSum(v);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? partial[lane] : 0.f;
  return WarpSum(v);
}

}  // namespace moe::kernels::cuda::internal
