// TensorNames: the one place that knows what each weight is called in a Hugging Face
// checkpoint of each supported architecture, and what shape it has.
//
// Names follow the checkpoint files as published (per-expert tensors, e.g. Mixtral
// `model.layers.3.block_sparse_moe.experts.5.w1.weight`), not transformers' fused in-memory
// parameters. A name that does not exist for the model is the empty string, so callers test
// `!names.q_norm.empty()` instead of the architecture. Shapes are PyTorch Linear layout
// [out_features, in_features].
//
// Threads: plain values and pure functions; thread-safe.
//
//   TensorNames names(config);
//   LayerTensorNames l = names.Layer(3);
//   ExpertTensorNames e = names.Expert(3, 17);   // valid when config.IsMoeLayer(3)
//   reader.Get(e.gate_proj);                      // [moe_intermediate, hidden]
//   for (const TensorSpec& spec : names.AllTensors()) { ... }   // every tensor, with shape
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/model_config.h"

namespace moe::model {

// One routed expert's SwiGLU weights: down(silu(gate(x)) * up(x)).
struct ExpertTensorNames {
  std::string gate_proj;  // [moe_intermediate, hidden]  (Mixtral w1)
  std::string up_proj;    // [moe_intermediate, hidden]  (Mixtral w3)
  std::string down_proj;  // [hidden, moe_intermediate]  (Mixtral w2)
};

// The non-expert tensors of one decoder layer; "" = absent for this model/layer.
struct LayerTensorNames {
  std::string input_norm;           // [hidden]
  std::string post_attention_norm;  // [hidden]

  // GQA attention.
  std::string q_proj;  // [H * head_dim, hidden]; also MLA without q_lora: [H * qk_head, hidden]
  std::string k_proj;  // [KV * head_dim, hidden]
  std::string v_proj;  // [KV * head_dim, hidden]
  std::string q_bias;  // [H * head_dim]   (attention_bias)
  std::string k_bias;  // [KV * head_dim]
  std::string v_bias;  // [KV * head_dim]
  std::string q_norm;  // [head_dim] (kPerHead) or [H * head_dim] (kWholeProjection)
  std::string k_norm;  // [head_dim] (kPerHead) or [KV * head_dim] (kWholeProjection)
  std::string o_proj;  // [hidden, H * v_head]

  // MLA attention (see MlaConfig for shapes). q_proj above is used when q_lora_rank == 0.
  std::string q_a_proj;
  std::string q_a_norm;  // q_a_layernorm
  std::string q_b_proj;
  std::string kv_a_proj_with_mqa;
  std::string kv_a_norm;  // kv_a_layernorm
  std::string kv_b_proj;

  // Dense MLP (layers where !IsMoeLayer).
  std::string mlp_gate_proj;  // [intermediate, hidden]
  std::string mlp_up_proj;    // [intermediate, hidden]
  std::string mlp_down_proj;  // [hidden, intermediate]

  // MoE (layers where IsMoeLayer).
  std::string router;                  // [num_experts, hidden] (mlp.gate / block_sparse_moe.gate)
  std::string router_correction_bias;  // [num_experts], f32 (e_score_correction_bias)
  std::string shared_gate_proj;        // [shared_intermediate, hidden]
  std::string shared_up_proj;          // [shared_intermediate, hidden]
  std::string shared_down_proj;        // [hidden, shared_intermediate]
  std::string shared_expert_gate;      // [1, hidden] (Qwen2-MoE)
};

// A tensor the checkpoint must contain and its expected shape.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  // Stored in f32 whatever the checkpoint dtype (e_score_correction_bias is kept in f32
  // by transformers; gen-model writes it so).
  bool keep_f32 = false;
};

class TensorNames {
 public:
  explicit TensorNames(const ModelConfig& config);

  const std::string& embedding() const { return embedding_; }  // [vocab, hidden]
  const std::string& final_norm() const { return final_norm_; }  // [hidden]
  // [vocab, hidden]; equals embedding() when tie_word_embeddings.
  const std::string& lm_head() const { return lm_head_; }

  LayerTensorNames Layer(int layer) const;
  ExpertTensorNames Expert(int layer, int expert) const;

  // Every tensor of the checkpoint with its shape: embedding, then per layer the
  // non-expert tensors followed by the experts in order, then the final norm and lm_head
  // (absent when tied). Deterministic order.
  std::vector<TensorSpec> AllTensors() const;
  // The tensors of one layer excluding routed experts, with shapes.
  std::vector<TensorSpec> LayerTensors(int layer) const;
  // The three tensors of one routed expert, with shapes.
  std::vector<TensorSpec> ExpertTensors(int layer, int expert) const;

 private:
  ModelConfig config_;
  std::string embedding_;
  std::string final_norm_;
  std::string lm_head_;
};

}  // namespace moe::model
