// Model: the exact forward pass of a Mixture-of-Experts decoder on the kernel API, over a
// mixed batch of sequences and a paged KV cache.
//
// Layer design (every numeric step is one kernels:: call; T = tokens in the batch):
//   hidden = Embedding(ids)                                       // [T, hidden] residual
//   normed = RmsNorm(hidden, layer[0].input_norm)
//   for each layer l:
//     attn_out = Attention_l(normed)                              // [T, hidden]
//       GQA: q/k/v = Linear(+bias) → qk-norm (per head, or whole projection) → RoPE →
//            WriteKvCache(k, v) → PagedAttention(q, cache) → o_proj
//       MLA: q = q_b(RmsNorm(q_a(x))) or q_proj(x)                // [T, H, dn + R]
//            kv = kv_a_proj(x) = [latent L | k_pe R]; RmsNorm(latent); RoPE(k_pe);
//            WriteKvCache(kv) into the compressed latent cache [.., 1, L + R];
//            absorbed query q_cat[h] = [W_UKᵀ_h · q_nope_h | RoPE(q_pe_h)]   // [T, H, L + R]
//            PagedAttention with kv_heads = 1, K = latent row, V = latent[:L] // [T, H, L]
//            per head W_UV_h · out_h → [T, H * dv] → o_proj
//     normed = RmsNorm(attn_out, post_attention_norm, residual: hidden += attn_out)
//     mlp_out = dense: Mlp(normed)
//               MoE:   RouterTopK(Linear(normed, router)) →
//                      ExpertExecutor::BeginRoutedExperts(l, normed, ids, weights, mlp_out)
//                      → shared expert into shared_out (Mlp, gated by
//                        sigmoid(Linear(normed, gate)) for Qwen2-MoE) while the routed
//                        experts run → FinishRoutedExperts(l) → mlp_out += shared_out
//     normed = RmsNorm(mlp_out, next input_norm, residual: hidden += mlp_out)
//   hidden += mlp_out; rows that want logits are gathered (Embedding over hidden as a table),
//   final RmsNorm, LM head Linear → logits [R, vocab].
// The routed experts are reached only through ExpertExecutor, so an expert-parallel data
// plane can replace the local call without the layer code knowing. Scratch buffers are
// sized for the largest batch seen so far and reused across steps; a larger batch grows
// them once.
//
// Batch: each SequenceInput carries the new tokens of one sequence (a prefill chunk, or one
// decode token) that follow its start_position tokens already in the cache, the sequence's
// block table (which must cover start_position + tokens), and which rows want logits. The
// caller (a frontend or generate loop) owns block tables and allocation (kv_cache.h); the
// Model owns only the cache memory.
//
// Contract: Forward validates the batch (empty sequences, positions beyond the RoPE table or
// the block table, block ids outside the cache, token ids outside the vocabulary) and
// returns InvalidArgument naming the sequence; kernel errors pass through. Logits are f32.
//
// Threads: Load once; Forward is not reentrant (one engine thread calls it). Kernels run on
// the process-wide CPU pool sized by ModelOptions::threads.
//
//   MOE_ASSIGN_OR_RETURN(auto model, Model::Load(dir, {.kv = {.num_blocks = 64}}));
//   BlockAllocator alloc(model->kv_cache().num_blocks());
//   SequenceBlocks blocks;
//   MOE_RETURN_IF_ERROR(blocks.Reserve(prompt.size(), model->kv_cache().block_size(), alloc));
//   ForwardBatch batch;
//   batch.seqs.push_back({.tokens = prompt, .start_position = 0, .block_table = blocks.table()});
//   MOE_ASSIGN_OR_RETURN(ForwardOutput out, model->Forward(batch));
//   // out.logits.Row(out.logits_offset[0]) is the next-token distribution.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "common/tensor.h"
#include "kernels/kernels.h"
#include "model/kv_cache.h"
#include "model/model_config.h"
#include "model/weights.h"

namespace moe::model {

// Computes the routed-expert part of one MoE layer for a batch of rows. The local
// implementation runs kernels::ExpertFfn over the experts this process holds; an
// expert-parallel implementation dispatches rows to remote ranks and combines the results.
// Contract: out [T, hidden] f32 is overwritten with Σ_j topk_weights[t, j] ·
// expert_{topk_ids[t, j]}(x[t]) (rows whose experts are absent get their partial sum); x
// [T, hidden] f32, topk_ids [T, k] i32, topk_weights [T, k] f32. Called from the thread
// running Model::Forward, once per MoE layer per step, layers in order.
//
// Overlap: Model::Forward calls the split form BeginRoutedExperts (start: e.g. send the
// dispatches), then computes the shared expert, then FinishRoutedExperts (complete: e.g.
// wait for the combines and write `out`). Between the two the caller neither writes x,
// topk_ids, topk_weights nor reads or writes `out`, and the views stay valid; a successful
// Begin is followed by exactly one Finish for the same layer. The defaults run everything
// in Begin, so an executor that only implements RunRoutedExperts behaves as before.
class ExpertExecutor {
 public:
  virtual ~ExpertExecutor() = default;
  virtual absl::Status RunRoutedExperts(int layer, common::TensorView x,
                                        common::TensorView topk_ids,
                                        common::TensorView topk_weights,
                                        common::TensorView out) = 0;
  virtual absl::Status BeginRoutedExperts(int layer, common::TensorView x,
                                          common::TensorView topk_ids,
                                          common::TensorView topk_weights,
                                          common::TensorView out) {
    return RunRoutedExperts(layer, x, topk_ids, topk_weights, out);
  }
  virtual absl::Status FinishRoutedExperts(int layer) { return absl::OkStatus(); }
};

// ExpertExecutor over the routed experts held in a ModelWeights (all or a subset).
class LocalExpertExecutor : public ExpertExecutor {
 public:
  explicit LocalExpertExecutor(const ModelWeights& weights) : weights_(weights) {}
  absl::Status RunRoutedExperts(int layer, common::TensorView x, common::TensorView topk_ids,
                                common::TensorView topk_weights,
                                common::TensorView out) override;

 private:
  const ModelWeights& weights_;
};

struct ModelOptions {
  // Weight dtype in memory (nullopt: as stored; f16 widened to f32). See WeightsOptions.
  std::optional<common::DType> dtype;
  // CPU kernel threads (0 = leave the process-wide pool as it is, by default hardware
  // concurrency). Process-wide (kernels::SetCpuThreads): set before other threads run kernels.
  int threads = 0;
  KvCacheOptions kv;
  // Routed experts to hold (null = all); see WeightsOptions::experts.
  std::function<bool(int layer, int expert)> experts;
  // Copy the weights into 2 MiB huge pages at load (WeightsOptions::huge_pages); false keeps
  // zero-copy views of the checkpoint's mapping.
  bool huge_pages = true;
  // Scratch sized up front for this many tokens per batch (grown on demand).
  int initial_batch_tokens = 256;
};

enum class LogitsRows : uint8_t {
  kLast,  // the last new token of the sequence (next-token prediction)
  kAll,   // every new token (scoring, golden tests)
  kNone,  // none (a prefill chunk that is not the last)
};

struct SequenceInput {
  std::span<const int32_t> tokens;       // the new tokens, at least one
  int32_t start_position = 0;            // tokens of this sequence already in the cache
  std::span<const int32_t> block_table;  // covers start_position + tokens.size() positions
  LogitsRows logits = LogitsRows::kLast;
};

struct ForwardBatch {
  std::vector<SequenceInput> seqs;
};

struct ForwardOutput {
  // [R, vocab] f32: the wanted rows, sequences in batch order. Owned by the Model; valid
  // until the next Forward.
  common::TensorView logits;
  // Sequence i's rows are [logits_offset[i], logits_offset[i + 1]). Size seqs + 1.
  std::vector<int32_t> logits_offset;
};

class Model {
 public:
  // Reads config.json and the safetensors checkpoint in `dir`, allocates the KV cache.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                     const ModelOptions& options = {});
  ~Model();

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return *weights_; }
  KvCache& kv_cache() { return *kv_cache_; }

  // Routes the routed experts through `executor` (not owned; must outlive its use).
  // nullptr restores the local executor.
  void SetExpertExecutor(ExpertExecutor* executor);

  absl::StatusOr<ForwardOutput> Forward(const ForwardBatch& batch);

 private:
  struct Scratch;
  Model() = default;

  absl::Status Attention(int layer, int num_tokens);
  absl::Status GqaAttention(int layer, int num_tokens);
  absl::Status MlaAttention(int layer, int num_tokens);
  absl::Status FeedForward(int layer, int num_tokens);

  // Set at Load.
  ModelConfig config_;
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<KvCache> kv_cache_;
  kernels::RopeTable rope_table_;
  kernels::RopeStyle rope_style_ = kernels::RopeStyle::kHalf;
  float attention_scale_ = 1.0f;
  std::unique_ptr<LocalExpertExecutor> local_executor_;

  // Per Forward (one caller at a time).
  ExpertExecutor* executor_ = nullptr;
  std::unique_ptr<Scratch> scratch_;
};

}  // namespace moe::model
