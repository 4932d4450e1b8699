// ModelConfig: one architecture-neutral description of a Mixture-of-Experts checkpoint.
//
// ParseModelConfig reads a Hugging Face `config.json` of one of the supported architectures
// (Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, MixtralForCausalLM, DeepseekV3ForCausalLM,
// DeepseekV2ForCausalLM, OlmoeForCausalLM) and normalises it into feature fields (attention
// kind, qk-norm kind, RoPE layout and scaling, router scoring, groups, shared experts, dense
// layers...), so that the forward pass and the workers never branch on architecture names.
// Field names and defaults follow `transformers` (5.x) `configuration_<arch>.py`; both the
// legacy `rope_theta` + `rope_scaling` keys and the newer `rope_parameters` are accepted.
//
// Contract: a returned ModelConfig is validated (positive sizes, top-k <= experts, heads
// divisible by KV heads, groups dividing experts, ...). Errors are kInvalidArgument and name
// the config.json field ("config.json: num_experts_per_tok (9) > num_experts (8)"); an
// unsupported architecture lists the supported ones. Tensor names live in tensor_names.h.
//
// Threads: ModelConfig is a plain value; the functions are pure and thread-safe.
//
//   MOE_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig("/models/Qwen3-30B-A3B"));
//   for (int l = 0; l < config.num_layers; ++l) {
//     if (config.IsMoeLayer(l)) { /* router + experts */ } else { /* dense MLP */ }
//   }
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace moe::model {

// Which checkpoint naming scheme a model uses. Only tensor_names.cc and gen_model.cc look at
// it; compute code reads the feature fields below.
enum class ModelFamily : uint8_t {
  kQwen3Moe,    // Qwen3MoeForCausalLM
  kQwen2Moe,    // Qwen2MoeForCausalLM
  kMixtral,     // MixtralForCausalLM
  kDeepseekV3,  // DeepseekV3ForCausalLM
  kDeepseekV2,  // DeepseekV2ForCausalLM
  kOlmoe,       // OlmoeForCausalLM
};

enum class AttentionKind : uint8_t {
  kGqa,  // q/k/v/o projections, num_kv_heads <= num_heads (MHA and MQA included)
  kMla,  // DeepSeek multi-head latent attention (see MlaConfig)
};

enum class QkNormKind : uint8_t {
  kNone,
  // RMSNorm over each head's head_dim, weight [head_dim], applied to q and k before RoPE
  // (Qwen3-MoE `self_attn.q_norm` / `k_norm`).
  kPerHead,
  // RMSNorm over the whole projection before splitting into heads: q_norm weight
  // [num_heads * head_dim], k_norm weight [num_kv_heads * head_dim] (OLMoE).
  kWholeProjection,
};

enum class RopeScalingKind : uint8_t { kNone, kLinear, kYarn };

// How the rotated dimensions of one head are paired.
enum class RopeLayout : uint8_t {
  // Pairs (i, i + rot/2), "rotate_half" (Llama/NeoX, Qwen, Mixtral, OLMoE).
  kHalfSplit,
  // Pairs (2i, 2i + 1) (DeepSeek-V2 complex multiply; DeepSeek-V3 rope_interleave=true).
  kInterleaved,
};

enum class RouterScoring : uint8_t {
  kSoftmax,  // softmax over all routed experts' logits
  kSigmoid,  // sigmoid per expert (DeepSeek-V3)
};

struct RopeConfig {
  double theta = 10000.0;  // rope_theta
  RopeLayout layout = RopeLayout::kHalfSplit;
  // Dimensions rotated per head: head_dim (GQA) or qk_rope_head_dim (MLA).
  int rotary_dim = 0;
  RopeScalingKind scaling = RopeScalingKind::kNone;
  double factor = 1.0;                          // linear and yarn
  int64_t original_max_position_embeddings = 0;  // yarn; 0 = max_position_embeddings
  double beta_fast = 32.0;                       // yarn
  double beta_slow = 1.0;                        // yarn
  double mscale = 0.0;                           // yarn (DeepSeek); 0 = absent
  double mscale_all_dim = 0.0;                   // yarn (DeepSeek); 0 = absent
  std::optional<double> attention_factor;        // yarn; explicit cos/sin multiplier
  bool truncate = true;                          // yarn: round the correction range

  // Multiplier applied to cos and sin (1 unless yarn): attention_factor when given, else
  // get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) when both mscale fields
  // are set, else get_mscale(factor) = 0.1 * ln(factor) + 1, as transformers computes it.
  double CosSinScale() const;
};

// DeepSeek MLA. Shapes per layer (h = hidden, H = num_heads):
//   q_lora_rank > 0: q_a_proj [q_lora_rank, h], q_a_layernorm [q_lora_rank],
//                    q_b_proj [H * (qk_nope + qk_rope), q_lora_rank]
//   q_lora_rank = 0: q_proj   [H * (qk_nope + qk_rope), h]
//   kv_a_proj_with_mqa [kv_lora_rank + qk_rope, h], kv_a_layernorm [kv_lora_rank],
//   kv_b_proj [H * (qk_nope + v_head_dim), kv_lora_rank], o_proj [h, H * v_head_dim].
struct MlaConfig {
  int q_lora_rank = 0;  // 0 = no q compression (q_proj)
  int kv_lora_rank = 0;
  int qk_nope_head_dim = 0;
  int qk_rope_head_dim = 0;
  int v_head_dim = 0;
};

struct MoeConfig {
  int num_experts = 0;  // routed experts per MoE layer
  int top_k = 0;        // num_experts_per_tok
  int64_t expert_intermediate_size = 0;  // moe_intermediate_size
  // Shared experts run on every token. DeepSeek: n_shared_experts experts fused into one
  // MLP of width n_shared_experts * moe_intermediate_size; Qwen2-MoE: one MLP of width
  // shared_expert_intermediate_size. shared_intermediate_size is the fused width (0 = none).
  int num_shared_experts = 0;
  int64_t shared_intermediate_size = 0;
  // Qwen2-MoE: the shared expert output is scaled by sigmoid(shared_expert_gate(x)),
  // a Linear [1, hidden] without bias.
  bool shared_expert_gate = false;
  RouterScoring scoring = RouterScoring::kSoftmax;
  // Renormalise the top-k weights to sum to 1 (Mixtral always does; DeepSeek-V2 never).
  bool norm_topk_prob = false;
  // Group-limited top-k: experts form n_group groups; only the topk_group best groups are
  // eligible. A group's score is its max (softmax, DeepSeek-V2 "group_limited_greedy") or the
  // sum of its top-2 scores incl. correction bias (sigmoid, DeepSeek-V3). 1/1 = no groups.
  int n_group = 1;
  int topk_group = 1;
  // DeepSeek-V3 `mlp.gate.e_score_correction_bias` [num_experts], f32: added to the scores
  // for choosing experts only; the weights come from the unbiased scores.
  bool has_correction_bias = false;
  double routed_scaling_factor = 1.0;  // multiplies the final routed weights
  // Layers [0, first_k_dense_replace) are dense (DeepSeek).
  int first_k_dense_replace = 0;
  // Qwen: layer l is MoE when (l + 1) % decoder_sparse_step == 0 and l not in mlp_only_layers.
  int decoder_sparse_step = 1;
  std::vector<int> mlp_only_layers;
};

struct ModelConfig {
  ModelFamily family = ModelFamily::kQwen3Moe;
  std::string architecture;  // "Qwen3MoeForCausalLM"
  std::string model_type;    // "qwen3_moe"

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int num_layers = 0;    // num_hidden_layers
  int num_heads = 0;     // num_attention_heads
  int num_kv_heads = 0;  // num_key_value_heads (MLA: = num_heads)
  // GQA: per-head q/k/v width (config head_dim, default hidden / heads). MLA: qk_rope_head_dim
  // as transformers sets it; use QkHeadDim() / VHeadDim() for shapes.
  int head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  std::string hidden_act = "silu";  // only silu (SwiGLU) is supported

  RopeConfig rope;

  AttentionKind attention = AttentionKind::kGqa;
  MlaConfig mla;          // attention == kMla only
  bool attention_bias = false;  // q/k/v biases (Qwen2-MoE qkv_bias, attention_bias); o_proj has none
  QkNormKind qk_norm = QkNormKind::kNone;
  double clip_qkv = 0.0;  // OLMoE: clamp q, k, v to [-clip, clip] after projection; 0 = off

  MoeConfig moe;
  int64_t intermediate_size = 0;  // dense MLP width (dense layers)

  bool tie_word_embeddings = false;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  // config.json eos_token_id, int or list
  std::optional<int64_t> pad_token_id;
  std::string torch_dtype;  // "bfloat16", "float32", ... ("" when absent)

  // Whether layer `layer` has routed experts (else a dense MLP of intermediate_size).
  bool IsMoeLayer(int layer) const;
  // q and k width per head: head_dim (GQA) or qk_nope_head_dim + qk_rope_head_dim (MLA).
  int QkHeadDim() const;
  // v width per head: head_dim (GQA) or v_head_dim (MLA).
  int VHeadDim() const;
  // Softmax scale of attention scores: QkHeadDim()^-0.5, times mscale(factor,
  // mscale_all_dim)^2 for MLA with yarn and mscale_all_dim set (DeepSeek).
  double AttentionScale() const;
  // Number of MoE layers.
  int NumMoeLayers() const;
};

// The architectures ParseModelConfig accepts, e.g. "Qwen3MoeForCausalLM".
const std::vector<std::string>& SupportedArchitectures();

// Parses config.json text. `source` names the file in error messages ("config.json").
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& source = "config.json");

// Reads `<path>/config.json` when `path` is a directory, else the file at `path`.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path);

}  // namespace moe::model
