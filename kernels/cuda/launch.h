// Internal to kernels/cuda: the launchers of the device kernels (*.cu), shared by the .cu
// files (nvcc) and the .cc files that validate views and call them (host compiler).
//
// Launchers take raw device pointers, row strides ("ld", in elements, innermost stride 1)
// and sizes that the caller has already validated, enqueue on `stream` and return the
// launch's cudaError_t. No Abseil here: nvcc compiles this header. bf16 data is passed as
// untyped pointers with a flag and read as raw 16-bit words (upper half of an f32).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moe::kernels::cuda::internal {

// A matrix argument: row-major, `ld` elements between rows.
struct MatF32 {
  float* data = nullptr;
  int64_t ld = 0;
};
struct ConstMatF32 {
  const float* data = nullptr;
  int64_t ld = 0;
};

// ---- elementwise.cu ------------------------------------------------------------------

struct RmsNormParams {
  ConstMatF32 in;         // [rows, dim]
  const void* weight;     // [dim] f32 or bf16
  bool weight_bf16;
  MatF32 out;             // [rows, dim]
  MatF32 residual;        // [rows, dim] or data == nullptr
  int64_t rows, dim;
  float eps;
};
cudaError_t LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream);

// out = a + b
cudaError_t LaunchAdd(ConstMatF32 a, ConstMatF32 b, MatF32 out, int64_t rows, int64_t cols,
                      cudaStream_t stream);
// out[:, :f] = silu(in[:, :f]) * in[:, f:2f]
cudaError_t LaunchSiluMul(ConstMatF32 gate_up, MatF32 out, int64_t rows, int64_t f,
                          cudaStream_t stream);
// out += sigmoid(gate[m, 0]) * in
cudaError_t LaunchSigmoidGatedAdd(ConstMatF32 in, ConstMatF32 gate, MatF32 out, int64_t rows,
                                  int64_t cols, cudaStream_t stream);

struct EmbeddingParams {
  const int32_t* ids;   // [rows]
  const void* table;    // [vocab, hidden] f32 or bf16, row stride table_ld
  bool table_bf16;
  int64_t table_ld, vocab;
  MatF32 out;           // [rows, hidden]
  int64_t rows, hidden;
  int32_t* bad_id;      // device flag set to 1 when an id is out of range (row zeroed)
};
cudaError_t LaunchEmbedding(const EmbeddingParams& p, cudaStream_t stream);

struct RopeParams {
  float* x;                 // [tokens, heads, head_dim], strides below, innermost 1
  int64_t token_stride, head_stride;
  int64_t tokens, heads;
  const int32_t* positions; // [tokens]; out-of-range positions leave the token unchanged
  const float* cos;         // [max_positions, rotary_dim / 2]
  const float* sin;
  int rotary_dim, max_positions;
  bool interleaved;
};
cudaError_t LaunchRope(const RopeParams& p, cudaStream_t stream);

struct KvWriteParams {
  const float* src;        // [tokens, heads, dim], strides src_t, src_h
  int64_t src_t, src_h;
  void* cache;             // [blocks, block_size, heads, dim], strides c_b, c_s, c_h
  bool cache_bf16;
  int64_t c_b, c_s, c_h;
  int64_t num_blocks, block_size;
  const int64_t* slots;    // [tokens]; slots < 0 or beyond the cache are skipped
  int64_t tokens, heads, dim;
};
cudaError_t LaunchWriteKv(const KvWriteParams& p, cudaStream_t stream);

// Rounds f32 rows to bf16 (nearest even), contiguous output [rows, cols].
cudaError_t LaunchToBf16(ConstMatF32 in, uint16_t* out, int64_t rows, int64_t cols,
                         cudaStream_t stream);
// out[m, n] += bias[n]
cudaError_t LaunchAddBias(const void* bias, bool bias_bf16, MatF32 out, int64_t rows,
                          int64_t cols, cudaStream_t stream);

// Small-M matrix product with f32 activations and f32/bf16 weights (no rounding of the
// activations): out[m, n] = sum_k in[m, k] * w[n, k] (+ out when accumulate), m < rows <=
// kSkinnyMaxRows. One warp per output column.
constexpr int kSkinnyMaxRows = 8;
struct SkinnyGemmParams {
  ConstMatF32 in;       // [rows, k]
  const void* weight;   // [n, k], row stride weight_ld
  int64_t weight_ld;
  bool weight_bf16;
  MatF32 out;           // [rows, n]
  int64_t rows, n, k;
  bool accumulate;
};
cudaError_t LaunchSkinnyGemm(const SkinnyGemmParams& p, cudaStream_t stream);

// ---- attention.cu --------------------------------------------------------------------

// Per-sequence data packed into one device buffer by the caller:
//   seq_info[s] = {q_start, q_len, context_len, block_table_offset}
//   block_tables[block_table_offset + i] = i-th block of sequence s
//   token_seq[t] = sequence of query row t, or -1 (row left untouched)
struct AttentionParams {
  const float* q;  // [tokens, heads, d], strides q_t, q_h
  int64_t q_t, q_h;
  const void* k_cache;  // [blocks, block_size, kv_heads, d], strides k_b, k_s, k_h
  const void* v_cache;  // [blocks, block_size, kv_heads, dv], strides v_b, v_s, v_h
  bool cache_bf16;
  int64_t k_b, k_s, k_h, v_b, v_s, v_h;
  int64_t block_size;
  float* out;      // [tokens, heads, dv], strides o_t, o_h
  int64_t o_t, o_h;
  int64_t tokens, heads, kv_heads, d, dv;
  float scale;
  const int32_t* seq_info;
  const int32_t* block_tables;
  const int32_t* token_seq;
};
constexpr int kAttentionMaxHeadDim = 1024;  // d and dv
cudaError_t LaunchPagedAttention(const AttentionParams& p, cudaStream_t stream);

// ---- moe.cu --------------------------------------------------------------------------

struct RouterParams {
  ConstMatF32 logits;     // [tokens, experts]
  const void* bias;       // [experts] f32 or bf16, or nullptr
  bool bias_bf16;
  bool sigmoid;
  int top_k;
  bool norm_topk_prob;
  int n_group, topk_group;
  bool group_top2_sum;
  float routed_scaling_factor;
  int32_t* topk_ids;      // [tokens, top_k], row stride ids_ld
  int64_t ids_ld;
  float* topk_weights;    // [tokens, top_k], row stride w_ld
  int64_t w_ld;
  int64_t tokens, experts;
};
constexpr int kRouterMaxExperts = 1024;
constexpr int kRouterMaxTopK = 32;
cudaError_t LaunchRouterTopK(const RouterParams& p, cudaStream_t stream);

// Computes the expert grouping of topk_ids (one warp, stable): expert_offsets [experts + 1],
// row_of / choice_of [tokens * k] for the first expert_offsets[experts] rows.
struct PermuteIndexParams {
  const int32_t* topk_ids;  // [tokens, k], row stride ids_ld
  int64_t ids_ld;
  int64_t tokens, k;
  int num_experts;
  int32_t* expert_offsets;  // device [experts + 1]
  int32_t* row_of;
  int32_t* choice_of;
};
cudaError_t LaunchPermuteIndex(const PermuteIndexParams& p, cudaStream_t stream);

// permuted[i] = x[row_of[i]] for i < *num_rows (a device scalar), over max_rows launch rows.
cudaError_t LaunchGatherRows(ConstMatF32 x, const int32_t* row_of, const int32_t* num_rows,
                             int64_t max_rows, int64_t cols, MatF32 permuted,
                             cudaStream_t stream);

// out[t] += sum_j weights[t, j] * y[slot_of[t * k + j]] over j with slot_of >= 0, in j
// order (deterministic). slot_of is built by LaunchInverseRows.
// slot_of [tokens * k] must be filled with -1 first; rows with an out-of-range token or
// choice are ignored.
cudaError_t LaunchInverseRows(const int32_t* row_of, const int32_t* choice_of, int64_t rows,
                              int64_t tokens, int64_t k, int32_t* slot_of, cudaStream_t stream);
cudaError_t LaunchCombineRows(ConstMatF32 y, const int32_t* slot_of, const float* weights,
                              int64_t weights_ld, int64_t tokens, int64_t k, int64_t cols,
                              MatF32 out, cudaStream_t stream);

}  // namespace moe::kernels::cuda::internal
