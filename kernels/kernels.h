// The backend-neutral kernel API: every numerical operation of the forward pass.
//
// Each op takes one Args struct of TensorViews (common/tensor.h) and returns a Status. The
// backend is chosen from the device of the output tensor: Device::kCpu runs kernels/cpu,
// Device::kCuda runs kernels/cuda (when built; otherwise Unimplemented). Callers never branch
// on the backend. All tensors of one call live on the same device.
//
// Conventions
// - Activations are f32. Weights are f32 or bf16 (Args say which ops accept which); bf16
//   weights stay bf16 in memory. A product with bf16 weights rounds its f32 input rows to
//   bf16 and accumulates in f32 (AVX512-BF16 dot products on the CPU, tensor cores on CUDA),
//   as bf16 inference does everywhere; with f32 weights everything is f32.
// - Shapes are written next to each field: [tokens, hidden] etc. Row-major; a view may have
//   a larger row stride than its width (strides()[0]) unless the field says contiguous.
// - Linear weights use the checkpoint layout [out_features, in_features] (PyTorch nn.Linear).
// - Unsupported dtypes/shapes return Unimplemented or InvalidArgument naming the field; a
//   kernel never reads or writes outside its views.
// - CPU kernels run on a process-wide thread pool (SetCpuThreads); calls from several
//   threads are safe (they serialise on the pool). CUDA kernels run on `stream` when set.
//
// Example (one decoder layer's first half):
//   MOE_RETURN_IF_ERROR(kernels::RmsNorm({.in = hidden, .weight = w.input_norm,
//                                         .eps = cfg.rms_norm_eps, .out = normed}));
//   MOE_RETURN_IF_ERROR(kernels::Linear({.in = normed, .weight = w.q_proj, .out = q}));
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"
#include "common/tensor.h"

namespace moe::kernels {

using common::TensorView;

// Execution options shared by every op.
struct Exec {
  void* stream = nullptr;  // cudaStream_t for Device::kCuda; ignored on the CPU
};

// Threads used by CPU kernels (0 = hardware concurrency). Call before the first kernel.
void SetCpuThreads(int num_threads);
int CpuThreads();

// ---------------------------------------------------------------------------------------
// Dense algebra

// out = in · weightᵀ (+ bias) (+ out when accumulate).
struct LinearArgs {
  TensorView in;      // [M, K] f32
  TensorView weight;  // [N, K] f32 or bf16, contiguous rows
  TensorView bias;    // [N] f32 or bf16, optional (empty view = none)
  TensorView out;     // [M, N] f32
  bool accumulate = false;
  Exec exec;
};
absl::Status Linear(const LinearArgs& args);

// out[m] = table[ids[m]] (widened to f32). Ids outside [0, V) are InvalidArgument.
struct EmbeddingArgs {
  TensorView ids;    // [M] i32
  TensorView table;  // [V, H] f32 or bf16
  TensorView out;    // [M, H] f32
  Exec exec;
};
absl::Status Embedding(const EmbeddingArgs& args);

// ---------------------------------------------------------------------------------------
// Normalisation and elementwise

// out = in / sqrt(mean(in²) + eps) * weight. With `residual` set, first residual += in and
// the normalised value is of the updated residual (the fused "add & norm" of a decoder
// layer). `in` and `out` may alias. Rows may be heads: in [M, D] with any row stride.
struct RmsNormArgs {
  TensorView in;        // [M, D] f32
  TensorView weight;    // [D] f32 or bf16
  double eps = 1e-6;
  TensorView out;       // [M, D] f32
  TensorView residual;  // [M, D] f32, optional, updated in place
  Exec exec;
};
absl::Status RmsNorm(const RmsNormArgs& args);

// out = a + b (out may alias a or b).
struct AddArgs {
  TensorView a, b;  // [M, N] f32
  TensorView out;   // [M, N] f32
  Exec exec;
};
absl::Status Add(const AddArgs& args);

// out = silu(gate_up[:, :F]) * gate_up[:, F:]   (the SwiGLU activation)
struct SiluMulArgs {
  TensorView gate_up;  // [M, 2F] f32
  TensorView out;      // [M, F] f32
  Exec exec;
};
absl::Status SiluMul(const SiluMulArgs& args);

// out[m] += sigmoid(gate_logit[m]) * in[m]   (Qwen2-MoE's gated shared expert)
struct SigmoidGatedAddArgs {
  TensorView in;          // [M, H] f32
  TensorView gate_logit;  // [M, 1] f32
  TensorView out;         // [M, H] f32
  Exec exec;
};
absl::Status SigmoidGatedAdd(const SigmoidGatedAddArgs& args);

// ---------------------------------------------------------------------------------------
// Rotary position embedding

enum class RopeStyle {
  kHalf,        // rotate pairs (i, i + d/2): Llama/Qwen/Mixtral/OLMoE ("neox")
  kInterleaved  // rotate pairs (2i, 2i+1): DeepSeek-V2/V3
};

// Precomputed cos/sin per position for one rotary dimension, including the scaling variant
// (linear, YaRN with its attention factor folded into cos/sin). Built on the host once.
struct RopeTable {
  int rotary_dim = 0;
  int max_positions = 0;
  std::vector<float> cos;  // [max_positions, rotary_dim / 2]
  std::vector<float> sin;  // [max_positions, rotary_dim / 2]
};
struct RopeScalingParams {
  enum class Type { kNone, kLinear, kYarn } type = Type::kNone;
  double factor = 1.0;
  int original_max_positions = 0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;           // YaRN: DeepSeek's mscale
  double mscale_all_dim = 0.0;   // YaRN: DeepSeek's mscale_all_dim
  double attention_factor = 0.0; // YaRN: explicit attention factor (0 = derive)
  bool truncate = true;          // YaRN: floor/ceil the correction range (HF `truncate`)
};
absl::StatusOr<RopeTable> BuildRopeTable(int rotary_dim, int max_positions, double theta,
                                         const RopeScalingParams& scaling);
// YaRN's mscale helper (0.1 * mscale * ln(scale) + 1, or 1 when scale <= 1).
double YarnMscale(double scale, double mscale);

// Rotates the first table.rotary_dim features of every head of x in place.
struct RopeArgs {
  TensorView x;          // [T, heads, head_dim] f32 (row strides may exceed heads*head_dim)
  TensorView positions;  // [T] i32, each < table.max_positions
  const RopeTable* table = nullptr;
  RopeStyle style = RopeStyle::kHalf;
  Exec exec;
};
absl::Status Rope(const RopeArgs& args);

// ---------------------------------------------------------------------------------------
// Paged attention (prefill, decode and mixed batches; GQA and MLA)

// One sequence's part of a batch: its query rows are [q_start, q_start + q_len) and are the
// last q_len positions of a context of context_len tokens, whose keys/values sit in the
// cache blocks listed in block_table (position p is in block block_table[p / block_size]
// at offset p % block_size). Causal: query at position p sees keys 0..p.
struct AttentionSeq {
  int32_t q_start = 0;
  int32_t q_len = 0;
  int32_t context_len = 0;
  const int32_t* block_table = nullptr;  // host memory, ceil(context_len / block_size) ids
  int32_t num_blocks = 0;
};

// Writes new keys/values into the cache: row t goes to flat slot slots[t]
// (= block * block_size + offset). For MLA, k is the [T, 1, L + R] latent row and v empty.
struct KvWriteArgs {
  TensorView k;        // [T, kv_heads, D] f32
  TensorView v;        // [T, kv_heads, Dv] f32, or empty
  TensorView slots;    // [T] i64
  TensorView k_cache;  // [num_blocks, block_size, kv_heads, D] f32 or bf16
  TensorView v_cache;  // [num_blocks, block_size, kv_heads, Dv] f32 or bf16, or empty
  Exec exec;
};
absl::Status WriteKvCache(const KvWriteArgs& args);

// out = softmax(q · kᵀ · scale + causal mask) · v per head; query head h uses kv head
// h / (heads / kv_heads). MLA runs through the same op with kv_heads = 1, k = latent cache
// [.., 1, L + R] and v = a view of its first L features (strided).
struct AttentionArgs {
  TensorView q;        // [T, heads, D] f32
  TensorView k_cache;  // [num_blocks, block_size, kv_heads, D]
  TensorView v_cache;  // [num_blocks, block_size, kv_heads, Dv]
  const std::vector<AttentionSeq>* seqs = nullptr;
  float scale = 1.0f;
  TensorView out;      // [T, heads, Dv] f32
  Exec exec;
};
absl::Status PagedAttention(const AttentionArgs& args);

// ---------------------------------------------------------------------------------------
// Mixture of experts

enum class Scoring { kSoftmax, kSigmoid };
enum class GroupScore {
  kMax,      // DeepSeek-V2 group_limited_greedy: best expert of the group
  kTop2Sum   // DeepSeek-V3 noaux_tc: sum of the group's two best (biased) scores
};

// Picks top_k experts per token from router logits.
//   scores = softmax(logits) or sigmoid(logits)
//   choice scores = scores + correction_bias (when given; selection only)
//   with n_group > 1: keep the topk_group best groups (by GroupScore), mask the rest
//   ids = top_k of choice scores; weights = scores[ids] (the unbiased ones)
//   if norm_topk_prob: weights /= sum(weights) (+1e-20 when sigmoid, as the reference)
//   weights *= routed_scaling_factor
// Ties break toward the lower expert id.
struct RouterArgs {
  TensorView logits;           // [T, E] f32
  TensorView correction_bias;  // [E] f32 or bf16, optional
  Scoring scoring = Scoring::kSoftmax;
  int top_k = 1;
  bool norm_topk_prob = false;
  int n_group = 1;
  int topk_group = 1;
  GroupScore group_score = GroupScore::kMax;
  double routed_scaling_factor = 1.0;
  TensorView topk_ids;         // [T, top_k] i32
  TensorView topk_weights;     // [T, top_k] f32
  Exec exec;
};
absl::Status RouterTopK(const RouterArgs& args);

// Groups token rows by expert: rows routed to expert e (over all top-k choices) are
// contiguous in `permuted`, experts in ascending order, tokens ascending inside an expert.
// `row_of[i]` is the source token of permuted row i, `choice_of[i]` its position in the
// token's top-k list, `expert_offsets[e]..[e+1]` the range of expert e. Ids < 0 or >=
// num_experts are skipped (a remote or absent expert).
struct PermuteArgs {
  TensorView x;               // [T, H] f32
  TensorView topk_ids;        // [T, k] i32
  int num_experts = 0;
  TensorView permuted;        // [T * k, H] f32 (only the first expert_offsets[E] rows used)
  TensorView row_of;          // [T * k] i32
  TensorView choice_of;       // [T * k] i32
  TensorView expert_offsets;  // [E + 1] i32 (host-readable)
  Exec exec;
};
absl::Status Permute(const PermuteArgs& args);

// out[row_of[i]] += weight(row_of[i], choice_of[i]) * y[i] for every permuted row i.
struct UnpermuteArgs {
  TensorView y;               // [R, H] f32, R = expert_offsets[E]
  TensorView row_of;          // [R] i32
  TensorView choice_of;       // [R] i32
  TensorView topk_weights;    // [T, k] f32
  TensorView out;             // [T, H] f32, accumulated into
  Exec exec;
};
absl::Status Unpermute(const UnpermuteArgs& args);

// The weights of one SwiGLU expert (or a dense MLP / shared expert):
//   y = down · (silu(gate · x) * (up · x))
struct SwigluWeights {
  TensorView gate;  // [F, H] f32 or bf16
  TensorView up;    // [F, H] f32 or bf16
  TensorView down;  // [H, F] f32 or bf16
};

// Grouped expert FFN: for every token t and choice j with e = topk_ids[t, j] in
// [0, experts.size()) and experts[e] present, out[t] += topk_weights[t, j] * expert_e(x[t]).
// Each expert's weights are read once for all of its tokens. Ids outside the table (or
// experts with empty views) are skipped, so a worker can hold a subset of the experts.
struct ExpertFfnArgs {
  TensorView x;             // [T, H] f32
  TensorView topk_ids;      // [T, k] i32
  TensorView topk_weights;  // [T, k] f32
  const std::vector<SwigluWeights>* experts = nullptr;  // indexed by expert id (or slot)
  TensorView out;           // [T, H] f32, accumulated into
  Exec exec;
};
absl::Status ExpertFfn(const ExpertFfnArgs& args);

// Dense SwiGLU MLP (dense layers, shared experts): out (+)= mlp(x).
struct MlpArgs {
  TensorView x;  // [T, H] f32
  const SwigluWeights* weights = nullptr;
  TensorView out;  // [T, H] f32
  bool accumulate = false;
  Exec exec;
};
absl::Status Mlp(const MlpArgs& args);

}  // namespace moe::kernels
