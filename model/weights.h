// ModelWeights: every tensor the forward pass reads, as kernel-ready views, loaded from a
// safetensors checkpoint (model/safetensors.h) under a ModelConfig and TensorNames.
//
// Ownership: ModelWeights owns the SafetensorsReader (the memory maps) and the converted
// copies. A tensor whose stored dtype is what the kernels take (f32 or bf16) and equals the
// requested dtype is a view into the map (zero copy); otherwise it is converted once into an
// owned buffer (f16 -> f32, f32 <-> bf16 when WeightsOptions::dtype asks for it). Tensors
// TensorNames marks keep_f32 (e_score_correction_bias) are always f32.
//
// Contract: Load checks every tensor's shape against the config and fails with the
// reader's message naming the tensor and file ("tensor model.layers.0.self_attn.q_proj.weight
// in model.safetensors: expected shape [..], got [..]"); a missing tensor is kNotFound naming
// it. WeightsOptions::experts selects the routed experts to load; the others stay empty
// views (kernels::ExpertFfn skips them) and their files are never mapped when the checkpoint
// is sharded and no selected tensor lives there. With load_non_expert = false (an expert
// rank) only the selected routed experts are loaded.
//
// MLA: besides the checkpoint tensors, Load prepares the weight-absorbed form used over the
// compressed latent cache: per head h, w_uk_t[h] = (k_nope rows of kv_b_proj)ᵀ [L, dn] (an
// owned transposed copy), w_uv[h] = the v rows of kv_b_proj [dv, L] (a view), and q_pe[h] =
// the rope rows of q_b_proj / q_proj [R, q_in] (a view).
//
// Huge pages (WeightsOptions::huge_pages, on by default): the zero-copy views are instead
// copied at load into anonymous memory in 2 MiB-aligned regions advised MADV_HUGEPAGE, so
// the kernels stream weights through 2 MiB pages (on our CI-class Zen 4 machine the weights
// read at 53 GB/s instead of 43-46 GB/s through the 4 KiB pages of the file mapping). When transparent huge pages
// are disabled ("never" in /sys/kernel/mm/transparent_hugepage/enabled) or the allocation
// fails, Load logs one line and keeps the views into the mapping. Set huge_pages = false
// for zero copy (e.g. when the page cache should be shared between processes).
//
// Threads: immutable after Load; any thread may read the views.
//
//   WeightsOptions opts;
//   opts.dtype = common::DType::kBF16;
//   opts.experts = [](int layer, int e) { return e % 4 == rank; };
//   MOE_ASSIGN_OR_RETURN(auto weights, ModelWeights::Load(dir, config, opts));
//   const LayerWeights& l0 = weights->layer(0);    // l0.attn.q_proj: [H * D, hidden]
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "common/tensor.h"
#include "kernels/kernels.h"
#include "model/model_config.h"
#include "model/safetensors.h"

namespace moe::model {

struct WeightsOptions {
  // Dtype of floating-point weights in memory: nullopt keeps the checkpoint's dtype (f16 is
  // widened to f32, the kernels take f32 or bf16); kF32 or kBF16 converts where needed.
  std::optional<common::DType> dtype;
  // Which routed experts to load: (layer, expert) -> load it. Null = all.
  std::function<bool(int layer, int expert)> experts;
  // Embeddings, norms, attention, routers, dense MLPs, shared experts, LM head. An expert
  // rank sets false and holds only its routed experts.
  bool load_non_expert = true;
  // Copy the weights that would be views of the mapping into 2 MiB huge pages (see above).
  bool huge_pages = true;
};

struct AttentionWeights {
  // GQA. [H*D, hidden], [KV*D, hidden] x2, biases [H*D]/[KV*D] (optional), q_norm/k_norm
  // [D] (per head) or [H*D]/[KV*D] (whole projection), optional.
  common::TensorView q_proj, k_proj, v_proj;
  common::TensorView q_bias, k_bias, v_bias;
  common::TensorView q_norm, k_norm;
  // [hidden, H * v_head]
  common::TensorView o_proj;

  // MLA. q_a_proj [q_lora, hidden], q_a_norm [q_lora], q_b_proj [H*(dn+R), q_lora]; without
  // q_lora, q_proj above is [H*(dn+R), hidden]. kv_a_proj [L+R, hidden], kv_a_norm [L],
  // kv_b_proj [H*(dn+dv), L].
  common::TensorView q_a_proj, q_a_norm, q_b_proj;
  common::TensorView kv_a_proj, kv_a_norm, kv_b_proj;
  std::vector<common::TensorView> w_uk_t;  // per head [L, dn], owned
  std::vector<common::TensorView> w_uv;    // per head [dv, L], view into kv_b_proj
  std::vector<common::TensorView> q_pe;    // per head [R, q_in], view into q_b_proj/q_proj
};

struct MoeWeights {
  common::TensorView router;           // [E, hidden]
  common::TensorView correction_bias;  // [E] f32, optional
  // Indexed by expert id; an expert that was not selected has empty views.
  std::vector<kernels::SwigluWeights> experts;
  // Shared expert(s) fused into one MLP ([S, hidden], [S, hidden], [hidden, S]); empty = none.
  kernels::SwigluWeights shared;
  common::TensorView shared_gate;  // [1, hidden], optional (Qwen2-MoE)
};

struct LayerWeights {
  common::TensorView input_norm;           // [hidden]
  common::TensorView post_attention_norm;  // [hidden]
  AttentionWeights attn;
  bool is_moe = false;
  kernels::SwigluWeights mlp;  // dense layers: [I, hidden], [I, hidden], [hidden, I]
  MoeWeights moe;              // MoE layers
};

class ModelWeights {
 public:
  // Opens the checkpoint in `dir` (see SafetensorsReader::Open) and loads it.
  static absl::StatusOr<std::unique_ptr<ModelWeights>> Load(const std::string& dir,
                                                            const ModelConfig& config,
                                                            const WeightsOptions& options = {});
  // Loads from an open reader (taken over).
  static absl::StatusOr<std::unique_ptr<ModelWeights>> Load(
      std::unique_ptr<SafetensorsReader> reader, const ModelConfig& config,
      const WeightsOptions& options = {});
  ~ModelWeights();

  const ModelConfig& config() const { return config_; }
  common::TensorView embedding() const { return embedding_; }    // [V, hidden]
  common::TensorView final_norm() const { return final_norm_; }  // [hidden]
  common::TensorView lm_head() const { return lm_head_; }        // [V, hidden]
  const LayerWeights& layer(int l) const { return layers_[l]; }
  int num_layers() const { return static_cast<int>(layers_.size()); }

  // Routed experts loaded, over all layers.
  int64_t num_loaded_experts() const { return num_loaded_experts_; }
  // Bytes of converted copies held in memory (zero-copy views and their huge-page copies
  // are not counted).
  size_t owned_bytes() const;
  // Bytes of mapped tensors copied into huge pages (0 with huge_pages off or unavailable).
  size_t huge_page_bytes() const { return huge_page_bytes_; }
  // Bytes of every view the weights expose (mapped or owned), experts included.
  size_t total_bytes() const { return total_bytes_; }
  SafetensorsReader& reader() { return *reader_; }

 private:
  class Loader;
  class HugePageArena;
  ModelWeights();

  ModelConfig config_;
  std::unique_ptr<SafetensorsReader> reader_;
  std::vector<common::Tensor> owned_;  // converted copies (buffers never move)
  std::unique_ptr<HugePageArena> huge_pages_;  // copies of mapped tensors, or null
  size_t huge_page_bytes_ = 0;
  common::TensorView embedding_, final_norm_, lm_head_;
  std::vector<LayerWeights> layers_;
  int64_t num_loaded_experts_ = 0;
  size_t total_bytes_ = 0;
};

}  // namespace moe::model
