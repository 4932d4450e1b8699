// Mixture-of-experts kernels: router top-k (softmax/sigmoid scores, correction bias,
// group-limited selection, renormalisation, scaling) and the permute/unpermute data
// movement around the grouped expert FFN.
#include <climits>
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/launch.h"

namespace moe::kernels::cuda::internal {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// Warp-wide argmax: larger value wins, ties go to the lower index; every lane gets it.
__device__ __forceinline__ void WarpArgMax(float& value, int& index) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v = __shfl_xor_sync(kFull, value, offset);
    const int i = __shfl_xor_sync(kFull, index, offset);
    if (v > value || (v == value && i < index)) {
      value = v;
      index = i;
    }
  }
}

// ---- Router: one warp per token ---------------------------------------------------------
constexpr int kRouterWarps = 4;

template <bool kBiasBf16>
__global__ void __launch_bounds__(kRouterWarps * 32) RouterKernel(RouterParams p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t = blockIdx.x * int64_t{kRouterWarps} + warp;
  if (t >= p.tokens) return;  // whole warps only; no block-wide barrier below
  const int num_experts = static_cast<int>(p.experts);
  extern __shared__ float smem[];
  float* scores = smem + warp * 2 * num_experts;  // [E] unbiased scores
  float* choice = scores + num_experts;           // [E] selection scores
  const float* logits = p.logits.data + t * p.logits.ld;

  if (p.sigmoid) {
    for (int e = lane; e < num_experts; e += 32) scores[e] = 1.f / (1.f + expf(-logits[e]));
  } else {
    float mx = -INFINITY;
    for (int e = lane; e < num_experts; e += 32) mx = fmaxf(mx, logits[e]);
    mx = WarpMax(mx);
    float sum = 0.f;
    for (int e = lane; e < num_experts; e += 32) {
      const float v = expf(logits[e] - mx);
      scores[e] = v;
      sum += v;
    }
    sum = WarpSum(sum);
    for (int e = lane; e < num_experts; e += 32) scores[e] /= sum;
  }
  for (int e = lane; e < num_experts; e += 32) {
    choice[e] = scores[e] + (p.bias != nullptr ? LoadWeight<kBiasBf16>(p.bias, e) : 0.f);
  }
  __syncwarp();

  if (p.n_group > 1) {
    const int group_size = num_experts / p.n_group;
    float group_score = -INFINITY;
    if (lane < p.n_group) {
      float best = -INFINITY, second = -INFINITY;
      for (int e = lane * group_size; e < (lane + 1) * group_size; ++e) {
        const float v = choice[e];
        if (v > best) {
          second = best;
          best = v;
        } else if (v > second) {
          second = v;
        }
      }
      group_score = p.group_top2_sum ? best + second : best;
    }
    bool kept = false;
    for (int g = 0; g < p.topk_group; ++g) {
      float v = (lane < p.n_group && !kept) ? group_score : -INFINITY;
      int idx = (lane < p.n_group && !kept) ? lane : INT_MAX;
      WarpArgMax(v, idx);
      if (lane == idx) kept = true;
    }
    const unsigned kept_mask = __ballot_sync(kFull, kept);
    for (int e = lane; e < num_experts; e += 32) {
      if (!((kept_mask >> (e / group_size)) & 1u)) choice[e] = -INFINITY;
    }
    __syncwarp();
  }

  int my_id = -1;
  float my_weight = 0.f;
  for (int k = 0; k < p.top_k; ++k) {
    float v = -INFINITY;
    int idx = INT_MAX;
    for (int e = lane; e < num_experts; e += 32) {
      if (choice[e] > v) {  // strided ascending: the first of equal values is the lowest id
        v = choice[e];
        idx = e;
      }
    }
    WarpArgMax(v, idx);
    if (idx != INT_MAX) {
      if (lane == k) {
        my_id = idx;
        my_weight = scores[idx];
      }
      __syncwarp();
      if (lane == 0) choice[idx] = -INFINITY;
    }
    __syncwarp();
  }
  if (p.norm_topk_prob) {
    const float sum = WarpSum(lane < p.top_k ? my_weight : 0.f);
    my_weight /= sum + (p.sigmoid ? 1e-20f : 0.f);
  }
  my_weight *= p.routed_scaling_factor;
  if (lane < p.top_k) {
    p.topk_ids[t * p.ids_ld + lane] = my_id;
    p.topk_weights[t * p.w_ld + lane] = my_weight;
  }
}

// ---- Permute index: one warp, stable counting sort over (token, choice) ----------------
__global__ void __launch_bounds__(32) PermuteIndexKernel(PermuteIndexParams p) {
  extern __shared__ int32_t cursor[];  // [E]
  const int lane = threadIdx.x;
  const int num_experts = p.num_experts;
  for (int e = lane; e < num_experts; e += 32) cursor[e] = 0;
  __syncwarp();
  const int64_t n = p.tokens * p.k;
  const auto expert_of = [&](int64_t i) -> int {
    if (i >= n) return -1;
    const int e = p.topk_ids[(i / p.k) * p.ids_ld + i % p.k];
    return (e >= 0 && e < num_experts) ? e : -1;
  };
  for (int64_t i0 = 0; i0 < n; i0 += 32) {  // counts
    const int e = expert_of(i0 + lane);
    const unsigned peers = __match_any_sync(kFull, e);
    if (e >= 0 && lane == __ffs(peers) - 1) cursor[e] += __popc(peers);
    __syncwarp();
  }
  int carry = 0;  // exclusive scan: cursor[e] becomes expert e's first row
  for (int e0 = 0; e0 < num_experts; e0 += 32) {
    const int e = e0 + lane;
    const int count = e < num_experts ? cursor[e] : 0;
    int inclusive = count;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int v = __shfl_up_sync(kFull, inclusive, offset);
      if (lane >= offset) inclusive += v;
    }
    if (e < num_experts) {
      cursor[e] = carry + inclusive - count;
      p.expert_offsets[e] = carry + inclusive - count;
    }
    carry += __shfl_sync(kFull, inclusive, 31);
  }
  if (lane == 0) p.expert_offsets[num_experts] = carry;
  __syncwarp();
  for (int64_t i0 = 0; i0 < n; i0 += 32) {  // placement
    const int64_t i = i0 + lane;
    const int e = expert_of(i);
    const unsigned peers = __match_any_sync(kFull, e);
    if (e >= 0) {
      const int pos = cursor[e] + __popc(peers & ((1u << lane) - 1u));
      p.row_of[pos] = static_cast<int32_t>(i / p.k);
      p.choice_of[pos] = static_cast<int32_t>(i % p.k);
    }
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) cursor[e] += __popc(peers);
    __syncwarp();
  }
}

__global__ void GatherRowsKernel(ConstMatF32 x, const int32_t* row_of, const int32_t* num_rows,
                                 int64_t cols, MatF32 permuted) {
  const int64_t i = blockIdx.x;
  if (i >= *num_rows) return;
  const float* src = x.data + int64_t{row_of[i]} * x.ld;
  float* dst = permuted.data + i * permuted.ld;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

__global__ void InverseRowsKernel(const int32_t* row_of, const int32_t* choice_of, int64_t rows,
                                  int64_t tokens, int64_t k, int32_t* slot_of) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < rows;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = row_of[i], j = choice_of[i];
    if (t >= 0 && t < tokens && j >= 0 && j < k) slot_of[t * k + j] = static_cast<int32_t>(i);
  }
}

__global__ void CombineRowsKernel(ConstMatF32 y, const int32_t* slot_of, const float* weights,
                                  int64_t weights_ld, int64_t k, int64_t cols, MatF32 out) {
  const int64_t t = blockIdx.x;
  float* o = out.data + t * out.ld;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float acc = o[c];
    for (int64_t j = 0; j < k; ++j) {
      const int32_t s = slot_of[t * k + j];
      if (s >= 0) acc += weights[t * weights_ld + j] * y.data[int64_t{s} * y.ld + c];
    }
    o[c] = acc;
  }
}

}  // namespace

cudaError_t LaunchRouterTopK(const RouterParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return cudaSuccess;
  if (p.experts > kRouterMaxExperts || p.top_k > kRouterMaxTopK || p.n_group > 32) {
    return cudaErrorInvalidValue;
  }
  const unsigned grid = static_cast<unsigned>((p.tokens + kRouterWarps - 1) / kRouterWarps);
  const size_t smem = size_t{kRouterWarps} * 2 * p.experts * sizeof(float);
  if (p.bias_bf16) RouterKernel<true><<<grid, kRouterWarps * 32, smem, stream>>>(p);
  else RouterKernel<false><<<grid, kRouterWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchPermuteIndex(const PermuteIndexParams& p, cudaStream_t stream) {
  PermuteIndexKernel<<<1, 32, (p.num_experts + 1) * sizeof(int32_t), stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchGatherRows(ConstMatF32 x, const int32_t* row_of, const int32_t* num_rows,
                             int64_t max_rows, int64_t cols, MatF32 permuted,
                             cudaStream_t stream) {
  if (max_rows == 0) return cudaSuccess;
  GatherRowsKernel<<<static_cast<unsigned>(max_rows), 128, 0, stream>>>(x, row_of, num_rows,
                                                                        cols, permuted);
  return cudaGetLastError();
}

cudaError_t LaunchInverseRows(const int32_t* row_of, const int32_t* choice_of, int64_t rows,
                              int64_t tokens, int64_t k, int32_t* slot_of, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>((rows + 255) / 256);
  InverseRowsKernel<<<grid, 256, 0, stream>>>(row_of, choice_of, rows, tokens, k, slot_of);
  return cudaGetLastError();
}

cudaError_t LaunchCombineRows(ConstMatF32 y, const int32_t* slot_of, const float* weights,
                              int64_t weights_ld, int64_t tokens, int64_t k, int64_t cols,
                              MatF32 out, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  CombineRowsKernel<<<static_cast<unsigned>(tokens), 128, 0, stream>>>(y, slot_of, weights,
                                                                       weights_ld, k, cols, out);
  return cudaGetLastError();
}

}  // namespace moe::kernels::cuda::internal
