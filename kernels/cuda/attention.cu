// Paged attention for prefill, decode and mixed batches (GQA; MLA through a strided v view).
//
// First version: one block of 128 threads per (query row, head), streaming that row's keys
// in tiles of 64 with an online softmax in f32; K/V are f32 or bf16 cache blocks addressed
// through the sequence's block table. Correct for every batch shape the API allows; fast
// enough for decode at moderate contexts. Performance plan (README.md): a split-KV decode
// kernel that shares each K/V tile across the query heads of one KV head (GQA/MLA), and a
// tensor-core (mma/wgmma) prefill kernel over query tiles.
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/launch.h"

namespace moe::kernels::cuda::internal {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;                                    // keys per tile
constexpr int kAccPerThread = kAttentionMaxHeadDim / kThreads;

template <bool kBf16>
__global__ void __launch_bounds__(kThreads) PagedAttentionKernel(AttentionParams p) {
  const int64_t t = blockIdx.x;
  const int64_t h = blockIdx.y;
  const int32_t s = p.token_seq[t];
  if (s < 0) return;
  const int32_t* info = p.seq_info + 4 * s;
  const int32_t q_start = info[0], q_len = info[1], context_len = info[2];
  const int32_t* table = p.block_tables + info[3];
  // This row is position context_len - q_len + (t - q_start) and sees keys 0..pos.
  const int64_t num_keys = int64_t{context_len} - q_len + (t - q_start) + 1;
  const int64_t kvh = h / (p.heads / p.kv_heads);

  extern __shared__ float smem[];
  float* q_s = smem;                    // [d]
  float* score = q_s + p.d;             // [kTile]
  int32_t* blk_s = reinterpret_cast<int32_t*>(score + kTile);  // [kTile]
  int32_t* off_s = blk_s + kTile;                               // [kTile]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float* q = p.q + t * p.q_t + h * p.q_h;
  for (int64_t d = threadIdx.x; d < p.d; d += kThreads) q_s[d] = q[d];

  float m = -INFINITY, l = 0.f;
  float acc[kAccPerThread];
#pragma unroll
  for (int i = 0; i < kAccPerThread; ++i) acc[i] = 0.f;

  for (int64_t tile0 = 0; tile0 < num_keys; tile0 += kTile) {
    const int nt = static_cast<int>(num_keys - tile0 < kTile ? num_keys - tile0 : kTile);
    if (threadIdx.x < nt) {
      const int64_t key = tile0 + threadIdx.x;
      blk_s[threadIdx.x] = table[key / p.block_size];
      off_s[threadIdx.x] = static_cast<int32_t>(key % p.block_size);
    }
    __syncthreads();  // also publishes q_s on the first tile
    for (int j = warp; j < nt; j += kWarps) {
      const int64_t base = blk_s[j] * p.k_b + off_s[j] * p.k_s + kvh * p.k_h;
      float dot = 0.f;
      for (int64_t d = lane; d < p.d; d += 32) dot += q_s[d] * LoadWeight<kBf16>(p.k_cache, base + d);
      dot = WarpSum(dot);
      if (lane == 0) score[j] = dot * p.scale;
    }
    __syncthreads();
    float tile_max = -INFINITY;
    for (int j = 0; j < nt; ++j) tile_max = fmaxf(tile_max, score[j]);
    const float new_m = fmaxf(m, tile_max);
    const float correction = __expf(m - new_m);  // 0 on the first tile (m = -inf)
    __syncthreads();  // every thread has read the raw scores
    if (threadIdx.x < nt) score[threadIdx.x] = __expf(score[threadIdx.x] - new_m);
    __syncthreads();
    float tile_sum = 0.f;
    for (int j = 0; j < nt; ++j) tile_sum += score[j];
    l = l * correction + tile_sum;
#pragma unroll
    for (int i = 0; i < kAccPerThread; ++i) acc[i] *= correction;
    for (int j = 0; j < nt; ++j) {
      const int64_t base = blk_s[j] * p.v_b + off_s[j] * p.v_s + kvh * p.v_h;
      const float pj = score[j];
#pragma unroll
      for (int i = 0; i < kAccPerThread; ++i) {
        const int64_t d = threadIdx.x + int64_t{i} * kThreads;
        if (d < p.dv) acc[i] += pj * LoadWeight<kBf16>(p.v_cache, base + d);
      }
    }
    m = new_m;
    __syncthreads();  // before the next tile overwrites score/blk_s/off_s
  }

  float* out = p.out + t * p.o_t + h * p.o_h;
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int i = 0; i < kAccPerThread; ++i) {
    const int64_t d = threadIdx.x + int64_t{i} * kThreads;
    if (d < p.dv) out[d] = acc[i] * inv;
  }
}

}  // namespace

cudaError_t LaunchPagedAttention(const AttentionParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.heads == 0) return cudaSuccess;
  if (p.d > kAttentionMaxHeadDim || p.dv > kAttentionMaxHeadDim || p.heads > 65535) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(p.tokens), static_cast<unsigned>(p.heads));
  const size_t smem = (p.d + kTile) * sizeof(float) + 2 * kTile * sizeof(int32_t);
  if (p.cache_bf16) PagedAttentionKernel<true><<<grid, kThreads, smem, stream>>>(p);
  else PagedAttentionKernel<false><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace moe::kernels::cuda::internal
