// Memory-bound kernels: RMSNorm (with fused residual add), Add, SiluMul, SigmoidGatedAdd,
// Embedding, RoPE, the KV-cache write, bf16 rounding, bias add and the small-M GEMM used
// for decode. Launchers are declared in launch.h; all accumulate in f32.
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/launch.h"

namespace moe::kernels::cuda::internal {
namespace {

constexpr int kThreads = 256;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
unsigned GridFor(int64_t n, int threads = kThreads) {
  int64_t blocks = CeilDiv(n, threads);
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

// ---- RMSNorm: one block per row --------------------------------------------------------
template <bool kWeightBf16, bool kResidual>
__global__ void RmsNormKernel(RmsNormParams p) {
  const int64_t row = blockIdx.x;
  const float* in = p.in.data + row * p.in.ld;
  float* res = kResidual ? p.residual.data + row * p.residual.ld : nullptr;
  float sum = 0.f;
  for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) {
    float v = in[d];
    if (kResidual) {
      v += res[d];
      res[d] = v;  // read back below by the same thread
    }
    sum += v * v;
  }
  sum = BlockSum(sum);
  const float inv = rsqrtf(sum / static_cast<float>(p.dim) + p.eps);
  float* out = p.out.data + row * p.out.ld;
  for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) {
    float v = kResidual ? res[d] : in[d];
    out[d] = v * inv * LoadWeight<kWeightBf16>(p.weight, d);
  }
}

// ---- 2-d elementwise: grid-stride over rows * cols ------------------------------------
__global__ void AddKernel(ConstMatF32 a, ConstMatF32 b, MatF32 out, int64_t rows, int64_t cols) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < rows * cols;
       i += int64_t{gridDim.x} * blockDim.x) {
    int64_t r = i / cols, c = i % cols;
    out.data[r * out.ld + c] = a.data[r * a.ld + c] + b.data[r * b.ld + c];
  }
}

__global__ void SiluMulKernel(ConstMatF32 gate_up, MatF32 out, int64_t rows, int64_t f) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < rows * f;
       i += int64_t{gridDim.x} * blockDim.x) {
    int64_t r = i / f, c = i % f;
    float g = gate_up.data[r * gate_up.ld + c];
    float u = gate_up.data[r * gate_up.ld + f + c];
    out.data[r * out.ld + c] = g / (1.f + expf(-g)) * u;
  }
}

__global__ void SigmoidGatedAddKernel(ConstMatF32 in, ConstMatF32 gate, MatF32 out,
                                      int64_t rows, int64_t cols) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < rows * cols;
       i += int64_t{gridDim.x} * blockDim.x) {
    int64_t r = i / cols, c = i % cols;
    float s = 1.f / (1.f + expf(-gate.data[r * gate.ld]));
    out.data[r * out.ld + c] += s * in.data[r * in.ld + c];
  }
}

// ---- Embedding: one block per row ------------------------------------------------------
template <bool kBf16>
__global__ void EmbeddingKernel(EmbeddingParams p) {
  const int64_t row = blockIdx.x;
  const int32_t id = p.ids[row];
  float* out = p.out.data + row * p.out.ld;
  if (id < 0 || id >= p.vocab) {
    if (threadIdx.x == 0) *p.bad_id = 1;
    for (int64_t d = threadIdx.x; d < p.hidden; d += blockDim.x) out[d] = 0.f;
    return;
  }
  const int64_t base = id * p.table_ld;
  for (int64_t d = threadIdx.x; d < p.hidden; d += blockDim.x) {
    out[d] = LoadWeight<kBf16>(p.table, base + d);
  }
}

// ---- RoPE: one block per token, threads over (head, pair) -------------------------------
__global__ void RopeKernel(RopeParams p) {
  const int64_t t = blockIdx.x;
  const int32_t pos = p.positions[t];
  if (pos < 0 || pos >= p.max_positions) return;
  const int half = p.rotary_dim / 2;
  const float* cos_row = p.cos + int64_t{pos} * half;
  const float* sin_row = p.sin + int64_t{pos} * half;
  for (int64_t i = threadIdx.x; i < p.heads * half; i += blockDim.x) {
    const int64_t h = i / half;
    const int j = static_cast<int>(i % half);
    float* x = p.x + t * p.token_stride + h * p.head_stride;
    const int a = p.interleaved ? 2 * j : j;
    const int b = p.interleaved ? 2 * j + 1 : j + half;
    const float x0 = x[a], x1 = x[b], c = cos_row[j], s = sin_row[j];
    x[a] = x0 * c - x1 * s;
    x[b] = x1 * c + x0 * s;
  }
}

// ---- KV-cache write: one block per token ------------------------------------------------
template <bool kBf16>
__global__ void WriteKvKernel(KvWriteParams p) {
  const int64_t t = blockIdx.x;
  const int64_t slot = p.slots[t];
  if (slot < 0 || slot >= p.num_blocks * p.block_size) return;
  const int64_t blk = slot / p.block_size, off = slot % p.block_size;
  for (int64_t i = threadIdx.x; i < p.heads * p.dim; i += blockDim.x) {
    const int64_t h = i / p.dim, d = i % p.dim;
    const float v = p.src[t * p.src_t + h * p.src_h + d];
    const int64_t dst = blk * p.c_b + off * p.c_s + h * p.c_h + d;
    if (kBf16) {
      static_cast<uint16_t*>(p.cache)[dst] = F32ToBf16Bits(v);
    } else {
      static_cast<float*>(p.cache)[dst] = v;
    }
  }
}

__global__ void ToBf16Kernel(ConstMatF32 in, uint16_t* out, int64_t rows, int64_t cols) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < rows * cols;
       i += int64_t{gridDim.x} * blockDim.x) {
    int64_t r = i / cols, c = i % cols;
    out[i] = F32ToBf16Bits(in.data[r * in.ld + c]);
  }
}

template <bool kBf16>
__global__ void AddBiasKernel(const void* bias, MatF32 out, int64_t rows, int64_t cols) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < rows * cols;
       i += int64_t{gridDim.x} * blockDim.x) {
    int64_t r = i / cols, c = i % cols;
    out.data[r * out.ld + c] += LoadWeight<kBf16>(bias, c);
  }
}

// ---- Small-M GEMM: one warp per output column n, lanes split k -------------------------
// Weights are streamed once (the decode case is bound by weight bandwidth); activations of
// the <= 8 rows stay in L1/L2. The vector path reads 8 bf16 (16 bytes) per lane per step.
constexpr int kSkinnyWarps = 8;

template <bool kBf16, bool kVector>
__global__ void __launch_bounds__(kSkinnyWarps * 32) SkinnyGemmKernel(SkinnyGemmParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t n = blockIdx.x * int64_t{kSkinnyWarps} + (threadIdx.x >> 5);
  if (n >= p.n) return;
  float acc[kSkinnyMaxRows];
#pragma unroll
  for (int m = 0; m < kSkinnyMaxRows; ++m) acc[m] = 0.f;
  if (kVector) {
    // k % 8 == 0 and 16-byte aligned rows (checked by the launcher).
    constexpr int kVec = 8;
    for (int64_t k0 = int64_t{lane} * kVec; k0 < p.k; k0 += 32 * kVec) {
      float w[kVec];
      if (kBf16) {
        const uint4 raw = *reinterpret_cast<const uint4*>(
            static_cast<const uint16_t*>(p.weight) + n * p.weight_ld + k0);
        const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          w[2 * j] = __uint_as_float(words[j] << 16);
          w[2 * j + 1] = __uint_as_float(words[j] & 0xffff0000u);
        }
      } else {
        const float* wp = static_cast<const float*>(p.weight) + n * p.weight_ld + k0;
        const float4 a = *reinterpret_cast<const float4*>(wp);
        const float4 b = *reinterpret_cast<const float4*>(wp + 4);
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
        w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
      }
#pragma unroll
      for (int m = 0; m < kSkinnyMaxRows; ++m) {
        if (m < p.rows) {
          const float* x = p.in.data + m * p.in.ld + k0;
          const float4 a = *reinterpret_cast<const float4*>(x);
          const float4 b = *reinterpret_cast<const float4*>(x + 4);
          acc[m] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x +
                    w[5] * b.y + w[6] * b.z + w[7] * b.w;
        }
      }
    }
  } else {
    for (int64_t k = lane; k < p.k; k += 32) {
      const float w = LoadWeight<kBf16>(p.weight, n * p.weight_ld + k);
#pragma unroll
      for (int m = 0; m < kSkinnyMaxRows; ++m) {
        if (m < p.rows) acc[m] += w * p.in.data[m * p.in.ld + k];
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kSkinnyMaxRows; ++m) {
    if (m < p.rows) {
      const float v = WarpSum(acc[m]);
      if (lane == 0) {
        float* o = p.out.data + m * p.out.ld + n;
        *o = p.accumulate ? *o + v : v;
      }
    }
  }
}

}  // namespace

cudaError_t LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(p.rows);
  const bool res = p.residual.data != nullptr;
  if (p.weight_bf16) {
    if (res) RmsNormKernel<true, true><<<grid, kThreads, 0, stream>>>(p);
    else RmsNormKernel<true, false><<<grid, kThreads, 0, stream>>>(p);
  } else {
    if (res) RmsNormKernel<false, true><<<grid, kThreads, 0, stream>>>(p);
    else RmsNormKernel<false, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t LaunchAdd(ConstMatF32 a, ConstMatF32 b, MatF32 out, int64_t rows, int64_t cols,
                      cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  AddKernel<<<GridFor(rows * cols), kThreads, 0, stream>>>(a, b, out, rows, cols);
  return cudaGetLastError();
}

cudaError_t LaunchSiluMul(ConstMatF32 gate_up, MatF32 out, int64_t rows, int64_t f,
                          cudaStream_t stream) {
  if (rows * f == 0) return cudaSuccess;
  SiluMulKernel<<<GridFor(rows * f), kThreads, 0, stream>>>(gate_up, out, rows, f);
  return cudaGetLastError();
}

cudaError_t LaunchSigmoidGatedAdd(ConstMatF32 in, ConstMatF32 gate, MatF32 out, int64_t rows,
                                  int64_t cols, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  SigmoidGatedAddKernel<<<GridFor(rows * cols), kThreads, 0, stream>>>(in, gate, out, rows,
                                                                        cols);
  return cudaGetLastError();
}

cudaError_t LaunchEmbedding(const EmbeddingParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(p.rows);
  if (p.table_bf16) EmbeddingKernel<true><<<grid, kThreads, 0, stream>>>(p);
  else EmbeddingKernel<false><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchRope(const RopeParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.rotary_dim < 2) return cudaSuccess;
  RopeKernel<<<static_cast<unsigned>(p.tokens), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchWriteKv(const KvWriteParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(p.tokens);
  if (p.cache_bf16) WriteKvKernel<true><<<grid, 128, 0, stream>>>(p);
  else WriteKvKernel<false><<<grid, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchToBf16(ConstMatF32 in, uint16_t* out, int64_t rows, int64_t cols,
                         cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  ToBf16Kernel<<<GridFor(rows * cols), kThreads, 0, stream>>>(in, out, rows, cols);
  return cudaGetLastError();
}

cudaError_t LaunchAddBias(const void* bias, bool bias_bf16, MatF32 out, int64_t rows,
                          int64_t cols, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  if (bias_bf16) AddBiasKernel<true><<<GridFor(rows * cols), kThreads, 0, stream>>>(bias, out, rows, cols);
  else AddBiasKernel<false><<<GridFor(rows * cols), kThreads, 0, stream>>>(bias, out, rows, cols);
  return cudaGetLastError();
}

cudaError_t LaunchSkinnyGemm(const SkinnyGemmParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.n == 0) return cudaSuccess;
  if (p.rows > kSkinnyMaxRows) return cudaErrorInvalidValue;
  const auto aligned = [](const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  };
  const bool vector = p.k % 8 == 0 && p.in.ld % 4 == 0 && p.weight_ld % 8 == 0 && aligned(p.in.data) &&
                      aligned(p.weight);
  const unsigned grid = static_cast<unsigned>(CeilDiv(p.n, kSkinnyWarps));
  constexpr int kBlock = kSkinnyWarps * 32;
  if (p.weight_bf16) {
    if (vector) SkinnyGemmKernel<true, true><<<grid, kBlock, 0, stream>>>(p);
    else SkinnyGemmKernel<true, false><<<grid, kBlock, 0, stream>>>(p);
  } else {
    if (vector) SkinnyGemmKernel<false, true><<<grid, kBlock, 0, stream>>>(p);
    else SkinnyGemmKernel<false, false><<<grid, kBlock, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace moe::kernels::cuda::internal
