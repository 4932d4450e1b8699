#include "model/model_config.h"

#include <set>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/gen_model.h"
#include "model/tensor_names.h"
#include "nlohmann/json.hpp"

namespace moe::model {
namespace {

using ::testing::HasSubstr;

std::string TinyConfig(const std::string& arch) {
  GenModelOptions options;
  options.arch = arch;
  absl::StatusOr<std::string> text = GenModelConfigJson(options);
  EXPECT_TRUE(text.ok()) << text.status();
  return text.ok() ? *text : "";
}

ModelConfig ParseTiny(const std::string& arch) {
  absl::StatusOr<ModelConfig> config = ParseModelConfig(TinyConfig(arch));
  EXPECT_TRUE(config.ok()) << arch << ": " << config.status();
  return config.ok() ? *config : ModelConfig{};
}

// Parses `arch`'s tiny config with one field replaced and returns the error message.
std::string ErrorWith(const std::string& arch, const std::string& key, nlohmann::json value) {
  nlohmann::json j = nlohmann::json::parse(TinyConfig(arch));
  if (value.is_discarded()) {
    j.erase(key);
  } else {
    j[key] = value;
  }
  absl::StatusOr<ModelConfig> config = ParseModelConfig(j.dump());
  if (config.ok()) return "OK";
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(config.status().message());
}

TEST(ModelConfigTest, EveryGeneratedArchitectureParses) {
  for (const std::string& arch : GenModelArchitectures()) {
    ModelConfig c = ParseTiny(arch);
    EXPECT_EQ(c.model_type, arch);
    EXPECT_EQ(c.vocab_size, 512) << arch;
    EXPECT_EQ(c.hidden_size, 64) << arch;
    EXPECT_GT(c.NumMoeLayers(), 0) << arch;
    EXPECT_FALSE(c.eos_token_ids.empty()) << arch;
  }
}

TEST(ModelConfigTest, Qwen3MoeFeatures) {
  ModelConfig c = ParseTiny("qwen3_moe");
  EXPECT_EQ(c.architecture, "Qwen3MoeForCausalLM");
  EXPECT_EQ(c.attention, AttentionKind::kGqa);
  EXPECT_EQ(c.qk_norm, QkNormKind::kPerHead);
  EXPECT_EQ(c.head_dim, 32);  // explicit, != hidden / heads
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_TRUE(c.moe.norm_topk_prob);
  EXPECT_EQ(c.moe.scoring, RouterScoring::kSoftmax);
  EXPECT_EQ(c.moe.shared_intermediate_size, 0);
  EXPECT_TRUE(c.IsMoeLayer(0));
  EXPECT_FALSE(c.IsMoeLayer(1));  // mlp_only_layers: [1]
  EXPECT_TRUE(c.IsMoeLayer(2));
  EXPECT_EQ(c.rope.layout, RopeLayout::kHalfSplit);
  EXPECT_EQ(c.rope.rotary_dim, 32);
  EXPECT_DOUBLE_EQ(c.rope.theta, 1e6);
  EXPECT_DOUBLE_EQ(c.AttentionScale(), 1.0 / std::sqrt(32.0));
}

TEST(ModelConfigTest, Qwen2MoeFeatures) {
  ModelConfig c = ParseTiny("qwen2_moe");
  EXPECT_TRUE(c.attention_bias);
  EXPECT_EQ(c.qk_norm, QkNormKind::kNone);
  EXPECT_EQ(c.moe.num_shared_experts, 1);
  EXPECT_EQ(c.moe.shared_intermediate_size, 96);
  EXPECT_TRUE(c.moe.shared_expert_gate);
  EXPECT_FALSE(c.moe.norm_topk_prob);
}

TEST(ModelConfigTest, MixtralFeatures) {
  ModelConfig c = ParseTiny("mixtral");
  EXPECT_EQ(c.moe.num_experts, 8);
  EXPECT_EQ(c.moe.top_k, 2);
  EXPECT_EQ(c.moe.expert_intermediate_size, 64);  // intermediate_size is the expert width
  EXPECT_TRUE(c.moe.norm_topk_prob);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
}

TEST(ModelConfigTest, OlmoeFeatures) {
  ModelConfig c = ParseTiny("olmoe");
  EXPECT_EQ(c.qk_norm, QkNormKind::kWholeProjection);
  EXPECT_EQ(c.num_kv_heads, c.num_heads);
  EXPECT_EQ(c.clip_qkv, 0.0);
  EXPECT_EQ(c.moe.expert_intermediate_size, 32);
}

TEST(ModelConfigTest, DeepseekV3Features) {
  ModelConfig c = ParseTiny("deepseek_v3");
  EXPECT_EQ(c.attention, AttentionKind::kMla);
  EXPECT_EQ(c.mla.q_lora_rank, 32);
  EXPECT_EQ(c.mla.kv_lora_rank, 32);
  EXPECT_EQ(c.QkHeadDim(), 32);
  EXPECT_EQ(c.VHeadDim(), 16);
  EXPECT_EQ(c.rope.rotary_dim, 16);
  EXPECT_EQ(c.rope.layout, RopeLayout::kInterleaved);
  EXPECT_EQ(c.rope.scaling, RopeScalingKind::kYarn);
  EXPECT_DOUBLE_EQ(c.rope.factor, 4.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 128);
  EXPECT_EQ(c.moe.scoring, RouterScoring::kSigmoid);
  EXPECT_TRUE(c.moe.has_correction_bias);
  EXPECT_EQ(c.moe.n_group, 4);
  EXPECT_EQ(c.moe.topk_group, 2);
  EXPECT_DOUBLE_EQ(c.moe.routed_scaling_factor, 2.5);
  EXPECT_EQ(c.moe.num_shared_experts, 1);
  EXPECT_EQ(c.moe.shared_intermediate_size, 32);
  EXPECT_FALSE(c.IsMoeLayer(0));  // first_k_dense_replace: 1
  EXPECT_TRUE(c.IsMoeLayer(1));
  // yarn: softmax scale * mscale(4, 0.8)^2; cos/sin * mscale(4, 1) / mscale(4, 0.8).
  const double m08 = 0.1 * 0.8 * std::log(4.0) + 1.0;
  const double m10 = 0.1 * std::log(4.0) + 1.0;
  EXPECT_NEAR(c.AttentionScale(), m08 * m08 / std::sqrt(32.0), 1e-12);
  EXPECT_NEAR(c.rope.CosSinScale(), m10 / m08, 1e-12);
}

TEST(ModelConfigTest, DeepseekV2Features) {
  ModelConfig c = ParseTiny("deepseek_v2");
  EXPECT_EQ(c.mla.q_lora_rank, 0);  // null in config.json
  EXPECT_EQ(c.moe.scoring, RouterScoring::kSoftmax);
  EXPECT_FALSE(c.moe.has_correction_bias);
  EXPECT_FALSE(c.moe.norm_topk_prob);
  EXPECT_EQ(c.moe.n_group, 4);  // group_limited_greedy
  EXPECT_EQ(c.moe.num_shared_experts, 2);
  EXPECT_EQ(c.moe.shared_intermediate_size, 64);
  EXPECT_EQ(c.rope.layout, RopeLayout::kInterleaved);
}

TEST(ModelConfigTest, PublishedStyleConfigs) {
  // Abridged Qwen3-30B-A3B config.json.
  absl::StatusOr<ModelConfig> qwen = ParseModelConfig(R"({
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "rope_scaling": null, "moe_intermediate_size": 768,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "bos_token_id": 151643,
    "eos_token_id": 151645, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
    "use_sliding_window": false, "sliding_window": null})");
  ASSERT_TRUE(qwen.ok()) << qwen.status();
  EXPECT_EQ(qwen->NumMoeLayers(), 48);
  EXPECT_EQ(qwen->torch_dtype, "bfloat16");
  EXPECT_EQ(qwen->rope.scaling, RopeScalingKind::kNone);

  // Abridged DeepSeek-V3 config.json (eos as a list here to exercise the list form).
  absl::StatusOr<ModelConfig> ds = ParseModelConfig(R"({
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
    "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "norm_topk_prob": true, "scoring_func": "sigmoid", "max_position_embeddings": 163840,
    "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40,
    "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
    "type": "yarn"}, "bos_token_id": 0, "eos_token_id": [1, 2]})");
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(ds->NumMoeLayers(), 58);
  EXPECT_EQ(ds->eos_token_ids, (std::vector<int64_t>{1, 2}));
  EXPECT_DOUBLE_EQ(ds->rope.CosSinScale(), 1.0);
  EXPECT_EQ(ds->QkHeadDim(), 192);

  // transformers 5 writes rope_parameters instead of rope_theta + rope_scaling.
  absl::StatusOr<ModelConfig> mix = ParseModelConfig(R"({
    "architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})");
  ASSERT_TRUE(mix.ok()) << mix.status();
  EXPECT_DOUBLE_EQ(mix->rope.theta, 1e6);
  EXPECT_EQ(mix->model_type, "mixtral");
  EXPECT_EQ(mix->head_dim, 128);
}

TEST(ModelConfigTest, UnsupportedArchitectureListsSupported) {
  std::string error = ErrorWith("qwen3_moe", "architectures", {"LlamaForCausalLM"});
  EXPECT_THAT(error, HasSubstr("architectures"));
  EXPECT_THAT(error, HasSubstr("LlamaForCausalLM"));
  for (const std::string& arch : SupportedArchitectures()) EXPECT_THAT(error, HasSubstr(arch));
}

TEST(ModelConfigTest, ErrorsNameTheField) {
  EXPECT_THAT(ErrorWith("qwen3_moe", "num_experts_per_tok", 9), HasSubstr("num_experts_per_tok (9)"));
  EXPECT_THAT(ErrorWith("mixtral", "num_key_value_heads", 3), HasSubstr("num_attention_heads"));
  EXPECT_THAT(ErrorWith("qwen2_moe", "hidden_size", nlohmann::json(nlohmann::json::value_t::discarded)),
              HasSubstr("hidden_size is missing"));
  EXPECT_THAT(ErrorWith("olmoe", "vocab_size", 0), HasSubstr("vocab_size must be positive"));
  EXPECT_THAT(ErrorWith("olmoe", "vocab_size", "big"), HasSubstr("vocab_size must be an integer"));
  EXPECT_THAT(ErrorWith("deepseek_v3", "n_group", 3), HasSubstr("n_group"));
  EXPECT_THAT(ErrorWith("deepseek_v3", "topk_group", 5), HasSubstr("topk_group"));
  EXPECT_THAT(ErrorWith("deepseek_v3", "first_k_dense_replace", 9),
              HasSubstr("first_k_dense_replace"));
  EXPECT_THAT(ErrorWith("deepseek_v2", "topk_method", "magic"), HasSubstr("topk_method"));
  EXPECT_THAT(ErrorWith("qwen3_moe", "hidden_act", "gelu"), HasSubstr("hidden_act"));
  EXPECT_THAT(ErrorWith("qwen3_moe", "eos_token_id", 512), HasSubstr("eos_token_id"));
  EXPECT_THAT(ErrorWith("qwen3_moe", "mlp_only_layers", {7}), HasSubstr("mlp_only_layers"));
  EXPECT_THAT(ErrorWith("deepseek_v3", "rope_scaling", {{"type", "dynamic"}, {"factor", 2}}),
              HasSubstr("rope_scaling.rope_type"));
  EXPECT_THAT(ErrorWith("deepseek_v3", "rope_scaling", {{"type", "yarn"}, {"factor", 2}}),
              HasSubstr("rope_scaling.original_max_position_embeddings is missing"));
  absl::StatusOr<ModelConfig> bad = ParseModelConfig("{not json", "x/config.json");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("x/config.json: invalid JSON"));
}

TEST(TensorNamesTest, NamesPerArchitecture) {
  {
    TensorNames n(ParseTiny("mixtral"));
    EXPECT_EQ(n.Expert(1, 5).gate_proj, "model.layers.1.block_sparse_moe.experts.5.w1.weight");
    EXPECT_EQ(n.Expert(1, 5).up_proj, "model.layers.1.block_sparse_moe.experts.5.w3.weight");
    EXPECT_EQ(n.Expert(1, 5).down_proj, "model.layers.1.block_sparse_moe.experts.5.w2.weight");
    EXPECT_EQ(n.Layer(0).router, "model.layers.0.block_sparse_moe.gate.weight");
    EXPECT_EQ(n.lm_head(), "lm_head.weight");
  }
  {
    TensorNames n(ParseTiny("qwen2_moe"));
    LayerTensorNames l = n.Layer(0);
    EXPECT_EQ(l.shared_gate_proj, "model.layers.0.mlp.shared_expert.gate_proj.weight");
    EXPECT_EQ(l.shared_expert_gate, "model.layers.0.mlp.shared_expert_gate.weight");
    EXPECT_EQ(l.q_bias, "model.layers.0.self_attn.q_proj.bias");
    EXPECT_EQ(n.Expert(0, 3).up_proj, "model.layers.0.mlp.experts.3.up_proj.weight");
  }
  {
    TensorNames n(ParseTiny("deepseek_v3"));
    LayerTensorNames dense = n.Layer(0);
    EXPECT_EQ(dense.mlp_gate_proj, "model.layers.0.mlp.gate_proj.weight");
    EXPECT_TRUE(dense.router.empty());
    LayerTensorNames l = n.Layer(1);
    EXPECT_EQ(l.q_a_proj, "model.layers.1.self_attn.q_a_proj.weight");
    EXPECT_EQ(l.q_a_norm, "model.layers.1.self_attn.q_a_layernorm.weight");
    EXPECT_TRUE(l.q_proj.empty());
    EXPECT_EQ(l.kv_a_proj_with_mqa, "model.layers.1.self_attn.kv_a_proj_with_mqa.weight");
    EXPECT_EQ(l.router_correction_bias, "model.layers.1.mlp.gate.e_score_correction_bias");
    EXPECT_EQ(l.shared_down_proj, "model.layers.1.mlp.shared_experts.down_proj.weight");
  }
  {
    TensorNames n(ParseTiny("deepseek_v2"));
    EXPECT_EQ(n.Layer(1).q_proj, "model.layers.1.self_attn.q_proj.weight");
    EXPECT_TRUE(n.Layer(1).q_a_proj.empty());
    EXPECT_TRUE(n.Layer(1).router_correction_bias.empty());
  }
  {
    TensorNames n(ParseTiny("olmoe"));
    std::vector<TensorSpec> layer = n.LayerTensors(0);
    bool found = false;
    for (const TensorSpec& s : layer) {
      if (s.name == "model.layers.0.self_attn.q_norm.weight") {
        EXPECT_EQ(s.shape, (std::vector<int64_t>{64}));  // whole projection
        found = true;
      }
    }
    EXPECT_TRUE(found);
  }
}

TEST(TensorNamesTest, AllTensorsAreUnique) {
  for (const std::string& arch : GenModelArchitectures()) {
    ModelConfig c = ParseTiny(arch);
    std::set<std::string> names;
    for (const TensorSpec& s : TensorNames(c).AllTensors()) {
      EXPECT_TRUE(names.insert(s.name).second) << arch << ": " << s.name;
      for (int64_t d : s.shape) EXPECT_GT(d, 0) << s.name;
    }
  }
}

}  // namespace
}  // namespace moe::model
