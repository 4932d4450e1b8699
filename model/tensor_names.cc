#include "model/tensor_names.h"

#include "absl/strings/str_cat.h"

namespace moe::model {

TensorNames::TensorNames(const ModelConfig& config) : config_(config) {
  embedding_ = "model.embed_tokens.weight";
  final_norm_ = "model.norm.weight";
  lm_head_ = config.tie_word_embeddings ? embedding_ : "lm_head.weight";
}

LayerTensorNames TensorNames::Layer(int layer) const {
  const ModelConfig& c = config_;
  const std::string p = absl::StrCat("model.layers.", layer, ".");
  const std::string attn = p + "self_attn.";
  LayerTensorNames n;
  n.input_norm = p + "input_layernorm.weight";
  n.post_attention_norm = p + "post_attention_layernorm.weight";

  if (c.attention == AttentionKind::kGqa) {
    n.q_proj = attn + "q_proj.weight";
    n.k_proj = attn + "k_proj.weight";
    n.v_proj = attn + "v_proj.weight";
    if (c.attention_bias) {
      n.q_bias = attn + "q_proj.bias";
      n.k_bias = attn + "k_proj.bias";
      n.v_bias = attn + "v_proj.bias";
    }
    if (c.qk_norm != QkNormKind::kNone) {
      n.q_norm = attn + "q_norm.weight";
      n.k_norm = attn + "k_norm.weight";
    }
  } else {
    if (c.mla.q_lora_rank > 0) {
      n.q_a_proj = attn + "q_a_proj.weight";
      n.q_a_norm = attn + "q_a_layernorm.weight";
      n.q_b_proj = attn + "q_b_proj.weight";
    } else {
      n.q_proj = attn + "q_proj.weight";
    }
    n.kv_a_proj_with_mqa = attn + "kv_a_proj_with_mqa.weight";
    n.kv_a_norm = attn + "kv_a_layernorm.weight";
    n.kv_b_proj = attn + "kv_b_proj.weight";
  }
  n.o_proj = attn + "o_proj.weight";

  if (!c.IsMoeLayer(layer)) {
    n.mlp_gate_proj = p + "mlp.gate_proj.weight";
    n.mlp_up_proj = p + "mlp.up_proj.weight";
    n.mlp_down_proj = p + "mlp.down_proj.weight";
    return n;
  }
  const std::string moe = p + (c.family == ModelFamily::kMixtral ? "block_sparse_moe." : "mlp.");
  n.router = moe + "gate.weight";
  if (c.moe.has_correction_bias) n.router_correction_bias = moe + "gate.e_score_correction_bias";
  if (c.moe.shared_intermediate_size > 0) {
    const std::string shared =
        moe + (c.family == ModelFamily::kQwen2Moe ? "shared_expert." : "shared_experts.");
    n.shared_gate_proj = shared + "gate_proj.weight";
    n.shared_up_proj = shared + "up_proj.weight";
    n.shared_down_proj = shared + "down_proj.weight";
  }
  if (c.moe.shared_expert_gate) n.shared_expert_gate = moe + "shared_expert_gate.weight";
  return n;
}

ExpertTensorNames TensorNames::Expert(int layer, int expert) const {
  ExpertTensorNames n;
  if (config_.family == ModelFamily::kMixtral) {
    const std::string p =
        absl::StrCat("model.layers.", layer, ".block_sparse_moe.experts.", expert, ".");
    n.gate_proj = p + "w1.weight";
    n.down_proj = p + "w2.weight";
    n.up_proj = p + "w3.weight";
  } else {
    const std::string p = absl::StrCat("model.layers.", layer, ".mlp.experts.", expert, ".");
    n.gate_proj = p + "gate_proj.weight";
    n.up_proj = p + "up_proj.weight";
    n.down_proj = p + "down_proj.weight";
  }
  return n;
}

std::vector<TensorSpec> TensorNames::LayerTensors(int layer) const {
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size;
  const int64_t heads = c.num_heads;
  const int64_t kv = c.num_kv_heads;
  const int64_t hd = c.head_dim;
  const LayerTensorNames n = Layer(layer);
  std::vector<TensorSpec> out;
  auto add = [&out](const std::string& name, std::vector<int64_t> shape, bool keep_f32 = false) {
    if (!name.empty()) out.push_back({name, std::move(shape), keep_f32});
  };
  add(n.input_norm, {h});
  if (c.attention == AttentionKind::kGqa) {
    add(n.q_proj, {heads * hd, h});
    add(n.q_bias, {heads * hd});
    add(n.k_proj, {kv * hd, h});
    add(n.k_bias, {kv * hd});
    add(n.v_proj, {kv * hd, h});
    add(n.v_bias, {kv * hd});
    if (c.qk_norm == QkNormKind::kPerHead) {
      add(n.q_norm, {hd});
      add(n.k_norm, {hd});
    } else if (c.qk_norm == QkNormKind::kWholeProjection) {
      add(n.q_norm, {heads * hd});
      add(n.k_norm, {kv * hd});
    }
  } else {
    const int64_t qk = c.QkHeadDim();
    add(n.q_a_proj, {c.mla.q_lora_rank, h});
    add(n.q_a_norm, {c.mla.q_lora_rank});
    add(n.q_b_proj, {heads * qk, c.mla.q_lora_rank});
    add(n.q_proj, {heads * qk, h});
    add(n.kv_a_proj_with_mqa, {c.mla.kv_lora_rank + c.mla.qk_rope_head_dim, h});
    add(n.kv_a_norm, {c.mla.kv_lora_rank});
    add(n.kv_b_proj, {heads * (c.mla.qk_nope_head_dim + c.mla.v_head_dim), c.mla.kv_lora_rank});
  }
  add(n.o_proj, {h, heads * c.VHeadDim()});
  add(n.post_attention_norm, {h});
  add(n.mlp_gate_proj, {c.intermediate_size, h});
  add(n.mlp_up_proj, {c.intermediate_size, h});
  add(n.mlp_down_proj, {h, c.intermediate_size});
  add(n.router, {c.moe.num_experts, h});
  add(n.router_correction_bias, {c.moe.num_experts}, /*keep_f32=*/true);
  const int64_t s = c.moe.shared_intermediate_size;
  add(n.shared_gate_proj, {s, h});
  add(n.shared_up_proj, {s, h});
  add(n.shared_down_proj, {h, s});
  add(n.shared_expert_gate, {1, h});
  return out;
}

std::vector<TensorSpec> TensorNames::ExpertTensors(int layer, int expert) const {
  const int64_t h = config_.hidden_size;
  const int64_t f = config_.moe.expert_intermediate_size;
  ExpertTensorNames n = Expert(layer, expert);
  return {{n.gate_proj, {f, h}}, {n.up_proj, {f, h}}, {n.down_proj, {h, f}}};
}

std::vector<TensorSpec> TensorNames::AllTensors() const {
  std::vector<TensorSpec> out;
  out.push_back({embedding_, {config_.vocab_size, config_.hidden_size}});
  for (int l = 0; l < config_.num_layers; ++l) {
    for (TensorSpec& s : LayerTensors(l)) out.push_back(std::move(s));
    if (!config_.IsMoeLayer(l)) continue;
    for (int e = 0; e < config_.moe.num_experts; ++e) {
      for (TensorSpec& s : ExpertTensors(l, e)) out.push_back(std::move(s));
    }
  }
  out.push_back({final_norm_, {config_.hidden_size}});
  if (!config_.tie_word_embeddings) {
    out.push_back({lm_head_, {config_.vocab_size, config_.hidden_size}});
  }
  return out;
}

}  // namespace moe::model
