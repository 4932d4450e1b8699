#include "model/model_config.h"

#include <cmath>
#include <fstream>
#include <sstream>
#include <string_view>

#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace moe::model {
namespace {

using Json = nlohmann::json;

struct ArchEntry {
  const char* architecture;
  const char* model_type;
  ModelFamily family;
};

constexpr ArchEntry kArchitectures[] = {
    {"Qwen3MoeForCausalLM", "qwen3_moe", ModelFamily::kQwen3Moe},
    {"Qwen2MoeForCausalLM", "qwen2_moe", ModelFamily::kQwen2Moe},
    {"MixtralForCausalLM", "mixtral", ModelFamily::kMixtral},
    {"DeepseekV3ForCausalLM", "deepseek_v3", ModelFamily::kDeepseekV3},
    {"DeepseekV2ForCausalLM", "deepseek_v2", ModelFamily::kDeepseekV2},
    {"OlmoeForCausalLM", "olmoe", ModelFamily::kOlmoe},
};

double GetMscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

// Typed access to the fields of one JSON object; every error names the field. Absent and
// null fields take the default (transformers treats `null` as "use the default" too).
class Fields {
 public:
  Fields(const Json& object, std::string source, std::string prefix = "")
      : object_(object), source_(std::move(source)), prefix_(std::move(prefix)) {}

  bool Has(const char* key) const {
    auto it = object_.find(key);
    return it != object_.end() && !it->is_null();
  }

  absl::Status Error(const char* key, std::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(source_, ": ", prefix_, key, " ", std::string(what)));
  }

  absl::StatusOr<int64_t> Int(const char* key, std::optional<int64_t> def) const {
    if (!Has(key)) {
      if (def) return *def;
      return Error(key, "is missing");
    }
    const Json& v = object_.at(key);
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float()) {
      double d = v.get<double>();
      if (d == std::floor(d) && std::fabs(d) < 9e15) return static_cast<int64_t>(d);
    }
    return Error(key, absl::StrCat("must be an integer, got ", v.dump()));
  }

  absl::StatusOr<double> Double(const char* key, std::optional<double> def) const {
    if (!Has(key)) {
      if (def) return *def;
      return Error(key, "is missing");
    }
    const Json& v = object_.at(key);
    if (v.is_number()) return v.get<double>();
    return Error(key, absl::StrCat("must be a number, got ", v.dump()));
  }

  absl::StatusOr<bool> Bool(const char* key, bool def) const {
    if (!Has(key)) return def;
    const Json& v = object_.at(key);
    if (v.is_boolean()) return v.get<bool>();
    return Error(key, absl::StrCat("must be true or false, got ", v.dump()));
  }

  absl::StatusOr<std::string> String(const char* key, std::string def) const {
    if (!Has(key)) return def;
    const Json& v = object_.at(key);
    if (v.is_string()) return v.get<std::string>();
    return Error(key, absl::StrCat("must be a string, got ", v.dump()));
  }

  // An int, or a list of ints (eos_token_id).
  absl::StatusOr<std::vector<int64_t>> IntOrList(const char* key) const {
    std::vector<int64_t> out;
    if (!Has(key)) return out;
    const Json& v = object_.at(key);
    if (v.is_number_integer()) {
      out.push_back(v.get<int64_t>());
      return out;
    }
    if (v.is_array()) {
      for (const Json& e : v) {
        if (!e.is_number_integer()) {
          return Error(key, absl::StrCat("must be an integer or a list of integers, got ", v.dump()));
        }
        out.push_back(e.get<int64_t>());
      }
      return out;
    }
    return Error(key, absl::StrCat("must be an integer or a list of integers, got ", v.dump()));
  }

  absl::StatusOr<std::vector<int>> IntList(const char* key) const {
    std::vector<int> out;
    if (!Has(key)) return out;
    const Json& v = object_.at(key);
    if (!v.is_array()) return Error(key, absl::StrCat("must be a list of integers, got ", v.dump()));
    for (const Json& e : v) {
      if (!e.is_number_integer()) {
        return Error(key, absl::StrCat("must be a list of integers, got ", v.dump()));
      }
      out.push_back(e.get<int>());
    }
    return out;
  }

  const std::string& source() const { return source_; }

 private:
  const Json& object_;
  std::string source_;
  std::string prefix_;
};

absl::Status RequirePositive(const Fields& f, const char* key, int64_t value) {
  if (value <= 0) return f.Error(key, absl::StrCat("must be positive, got ", value));
  return absl::OkStatus();
}

absl::Status RequireNonNegative(const Fields& f, const char* key, int64_t value) {
  if (value < 0) return f.Error(key, absl::StrCat("must be >= 0, got ", value));
  return absl::OkStatus();
}

absl::StatusOr<int> ToInt(const Fields& f, const char* key, int64_t v) {
  if (v > (int64_t{1} << 30) || v < -(int64_t{1} << 30)) {
    return f.Error(key, absl::StrCat("is out of range: ", v));
  }
  return static_cast<int>(v);
}

// RoPE: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (checkpoints as
// published). The dict's "rope_type" (or legacy "type") picks the scaling.
absl::Status ParseRope(const Json& root, const Fields& f, ModelConfig& c) {
  const Json* params = nullptr;
  const char* params_key = nullptr;
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    auto it = root.find(key);
    if (it != root.end() && !it->is_null()) {
      if (!it->is_object()) return f.Error(key, absl::StrCat("must be an object, got ", it->dump()));
      params = &*it;
      params_key = key;
      break;
    }
  }
  MOE_ASSIGN_OR_RETURN(c.rope.theta, f.Double("rope_theta", 10000.0));
  if (params == nullptr) return absl::OkStatus();

  Fields p(*params, f.source(), absl::StrCat(params_key, "."));
  MOE_ASSIGN_OR_RETURN(c.rope.theta, p.Double("rope_theta", c.rope.theta));
  MOE_ASSIGN_OR_RETURN(std::string type, p.String("type", "default"));
  MOE_ASSIGN_OR_RETURN(type, p.String("rope_type", type));
  if (type == "default") {
    c.rope.scaling = RopeScalingKind::kNone;
  } else if (type == "linear") {
    c.rope.scaling = RopeScalingKind::kLinear;
    MOE_ASSIGN_OR_RETURN(c.rope.factor, p.Double("factor", std::nullopt));
  } else if (type == "yarn") {
    c.rope.scaling = RopeScalingKind::kYarn;
    MOE_ASSIGN_OR_RETURN(c.rope.original_max_position_embeddings,
                         p.Int("original_max_position_embeddings", std::nullopt));
    MOE_RETURN_IF_ERROR(RequirePositive(p, "original_max_position_embeddings",
                                        c.rope.original_max_position_embeddings));
    if (p.Has("factor")) {
      MOE_ASSIGN_OR_RETURN(c.rope.factor, p.Double("factor", std::nullopt));
    } else {
      c.rope.factor = static_cast<double>(c.max_position_embeddings) /
                      static_cast<double>(c.rope.original_max_position_embeddings);
    }
    MOE_ASSIGN_OR_RETURN(c.rope.beta_fast, p.Double("beta_fast", 32.0));
    MOE_ASSIGN_OR_RETURN(c.rope.beta_slow, p.Double("beta_slow", 1.0));
    MOE_ASSIGN_OR_RETURN(c.rope.mscale, p.Double("mscale", 0.0));
    MOE_ASSIGN_OR_RETURN(c.rope.mscale_all_dim, p.Double("mscale_all_dim", 0.0));
    if (p.Has("attention_factor")) {
      MOE_ASSIGN_OR_RETURN(double af, p.Double("attention_factor", std::nullopt));
      c.rope.attention_factor = af;
    }
    MOE_ASSIGN_OR_RETURN(c.rope.truncate, p.Bool("truncate", true));
  } else {
    return p.Error("rope_type",
                   absl::StrCat("\"", type, "\" is not supported (supported: default, linear, yarn)"));
  }
  if (c.rope.scaling != RopeScalingKind::kNone && !(c.rope.factor > 0.0)) {
    return p.Error("factor", absl::StrCat("must be positive, got ", c.rope.factor));
  }
  return absl::OkStatus();
}

absl::Status ParseGqaAttention(const Fields& f, ModelConfig& c) {
  c.attention = AttentionKind::kGqa;
  MOE_ASSIGN_OR_RETURN(int64_t kv, f.Int("num_key_value_heads", c.num_heads));
  MOE_ASSIGN_OR_RETURN(c.num_kv_heads, ToInt(f, "num_key_value_heads", kv));
  MOE_RETURN_IF_ERROR(RequirePositive(f, "num_key_value_heads", c.num_kv_heads));
  if (c.num_heads % c.num_kv_heads != 0) {
    return f.Error("num_attention_heads",
                   absl::StrCat("(", c.num_heads, ") must be divisible by num_key_value_heads (",
                                c.num_kv_heads, ")"));
  }
  int64_t default_head_dim = c.hidden_size / c.num_heads;
  MOE_ASSIGN_OR_RETURN(int64_t head_dim, f.Int("head_dim", default_head_dim));
  MOE_ASSIGN_OR_RETURN(c.head_dim, ToInt(f, "head_dim", head_dim));
  MOE_RETURN_IF_ERROR(RequirePositive(f, "head_dim", c.head_dim));
  if (c.head_dim % 2 != 0) return f.Error("head_dim", absl::StrCat("must be even, got ", c.head_dim));
  c.rope.rotary_dim = c.head_dim;
  c.rope.layout = RopeLayout::kHalfSplit;
  return absl::OkStatus();
}

absl::Status ParseMlaAttention(const Fields& f, ModelConfig& c) {
  c.attention = AttentionKind::kMla;
  MOE_ASSIGN_OR_RETURN(int64_t kv, f.Int("num_key_value_heads", c.num_heads));
  MOE_ASSIGN_OR_RETURN(c.num_kv_heads, ToInt(f, "num_key_value_heads", kv));
  MOE_ASSIGN_OR_RETURN(int64_t q_lora, f.Int("q_lora_rank", 0));  // null = no q compression
  MOE_RETURN_IF_ERROR(RequireNonNegative(f, "q_lora_rank", q_lora));
  MOE_ASSIGN_OR_RETURN(c.mla.q_lora_rank, ToInt(f, "q_lora_rank", q_lora));
  struct {
    const char* key;
    int* out;
    int64_t def;
  } dims[] = {
      {"kv_lora_rank", &c.mla.kv_lora_rank, 512},
      {"qk_nope_head_dim", &c.mla.qk_nope_head_dim, 128},
      {"qk_rope_head_dim", &c.mla.qk_rope_head_dim, 64},
      {"v_head_dim", &c.mla.v_head_dim, 128},
  };
  for (auto& d : dims) {
    MOE_ASSIGN_OR_RETURN(int64_t v, f.Int(d.key, d.def));
    MOE_RETURN_IF_ERROR(RequirePositive(f, d.key, v));
    MOE_ASSIGN_OR_RETURN(*d.out, ToInt(f, d.key, v));
  }
  if (c.mla.qk_rope_head_dim % 2 != 0) {
    return f.Error("qk_rope_head_dim", absl::StrCat("must be even, got ", c.mla.qk_rope_head_dim));
  }
  c.head_dim = c.mla.qk_rope_head_dim;  // as transformers sets config.head_dim
  c.rope.rotary_dim = c.mla.qk_rope_head_dim;
  c.rope.layout = RopeLayout::kInterleaved;
  if (c.family == ModelFamily::kDeepseekV3) {
    MOE_ASSIGN_OR_RETURN(bool interleave, f.Bool("rope_interleave", true));
    c.rope.layout = interleave ? RopeLayout::kInterleaved : RopeLayout::kHalfSplit;
  }
  return absl::OkStatus();
}

absl::Status ParseMoe(const Fields& f, ModelConfig& c) {
  MoeConfig& m = c.moe;
  const bool deepseek =
      c.family == ModelFamily::kDeepseekV3 || c.family == ModelFamily::kDeepseekV2;
  const char* experts_key = "num_experts";
  if (c.family == ModelFamily::kMixtral) experts_key = "num_local_experts";
  if (deepseek) experts_key = "n_routed_experts";
  int64_t experts_default = 0;
  int64_t top_k_default = 0;
  switch (c.family) {
    case ModelFamily::kQwen3Moe: experts_default = 128; top_k_default = 8; break;
    case ModelFamily::kQwen2Moe: experts_default = 60; top_k_default = 4; break;
    case ModelFamily::kMixtral: experts_default = 8; top_k_default = 2; break;
    case ModelFamily::kDeepseekV3: experts_default = 256; top_k_default = 8; break;
    case ModelFamily::kDeepseekV2: experts_default = 64; break;  // top-k has no default
    case ModelFamily::kOlmoe: experts_default = 64; top_k_default = 8; break;
  }
  MOE_ASSIGN_OR_RETURN(int64_t experts, f.Int(experts_key, experts_default));
  MOE_RETURN_IF_ERROR(RequirePositive(f, experts_key, experts));
  MOE_ASSIGN_OR_RETURN(m.num_experts, ToInt(f, experts_key, experts));
  MOE_ASSIGN_OR_RETURN(int64_t top_k,
                       f.Int("num_experts_per_tok", top_k_default > 0
                                                         ? std::optional<int64_t>(top_k_default)
                                                         : std::nullopt));
  MOE_RETURN_IF_ERROR(RequirePositive(f, "num_experts_per_tok", top_k));
  if (top_k > experts) {
    return f.Error("num_experts_per_tok",
                   absl::StrCat("(", top_k, ") must be <= ", experts_key, " (", experts, ")"));
  }
  m.top_k = static_cast<int>(top_k);

  // Expert width: Mixtral and OLMoE use intermediate_size for the experts themselves.
  if (c.family == ModelFamily::kMixtral || c.family == ModelFamily::kOlmoe) {
    m.expert_intermediate_size = c.intermediate_size;
  } else {
    int64_t def = 768;
    if (c.family == ModelFamily::kQwen2Moe) def = 1408;
    if (c.family == ModelFamily::kDeepseekV3) def = 2048;
    if (c.family == ModelFamily::kDeepseekV2) def = 1407;
    MOE_ASSIGN_OR_RETURN(m.expert_intermediate_size, f.Int("moe_intermediate_size", def));
    MOE_RETURN_IF_ERROR(RequirePositive(f, "moe_intermediate_size", m.expert_intermediate_size));
  }

  // Shared experts.
  if (deepseek) {
    MOE_ASSIGN_OR_RETURN(int64_t shared,
                         f.Int("n_shared_experts", c.family == ModelFamily::kDeepseekV3 ? 1 : 2));
    MOE_RETURN_IF_ERROR(RequireNonNegative(f, "n_shared_experts", shared));
    MOE_ASSIGN_OR_RETURN(m.num_shared_experts, ToInt(f, "n_shared_experts", shared));
    m.shared_intermediate_size = shared * m.expert_intermediate_size;
  } else if (c.family == ModelFamily::kQwen2Moe) {
    MOE_ASSIGN_OR_RETURN(m.shared_intermediate_size,
                         f.Int("shared_expert_intermediate_size", 5632));
    MOE_RETURN_IF_ERROR(
        RequirePositive(f, "shared_expert_intermediate_size", m.shared_intermediate_size));
    m.num_shared_experts = 1;
    m.shared_expert_gate = true;
  }

  // Scoring, normalisation, groups, bias, scaling.
  if (c.family == ModelFamily::kMixtral) {
    m.scoring = RouterScoring::kSoftmax;
    m.norm_topk_prob = true;  // softmax over the chosen experts
  } else if (c.family == ModelFamily::kDeepseekV3) {
    m.scoring = RouterScoring::kSigmoid;
    m.has_correction_bias = true;
    MOE_ASSIGN_OR_RETURN(m.norm_topk_prob, f.Bool("norm_topk_prob", true));
  } else if (c.family == ModelFamily::kDeepseekV2) {
    // transformers' DeepseekV2TopkRouter never renormalises (norm_topk_prob is ignored).
    m.scoring = RouterScoring::kSoftmax;
    m.norm_topk_prob = false;
  } else {  // Qwen3-MoE, Qwen2-MoE, OLMoE
    m.scoring = RouterScoring::kSoftmax;
    MOE_ASSIGN_OR_RETURN(m.norm_topk_prob, f.Bool("norm_topk_prob", false));
  }
  if (deepseek) {
    MOE_ASSIGN_OR_RETURN(m.routed_scaling_factor,
                         f.Double("routed_scaling_factor",
                                  c.family == ModelFamily::kDeepseekV3 ? 2.5 : 1.0));
    if (!(m.routed_scaling_factor > 0.0)) {
      return f.Error("routed_scaling_factor",
                     absl::StrCat("must be positive, got ", m.routed_scaling_factor));
    }
    bool grouped = true;
    if (c.family == ModelFamily::kDeepseekV2) {
      MOE_ASSIGN_OR_RETURN(std::string method, f.String("topk_method", "greedy"));
      if (method != "greedy" && method != "group_limited_greedy") {
        return f.Error("topk_method", absl::StrCat("\"", method,
                                                   "\" is not supported (supported: greedy, "
                                                   "group_limited_greedy)"));
      }
      grouped = method == "group_limited_greedy";
    }
    if (grouped) {
      MOE_ASSIGN_OR_RETURN(int64_t n_group,
                           f.Int("n_group", c.family == ModelFamily::kDeepseekV3
                                                ? std::optional<int64_t>(8)
                                                : std::nullopt));
      MOE_ASSIGN_OR_RETURN(int64_t topk_group,
                           f.Int("topk_group", c.family == ModelFamily::kDeepseekV3
                                                   ? std::optional<int64_t>(4)
                                                   : std::nullopt));
      MOE_RETURN_IF_ERROR(RequirePositive(f, "n_group", n_group));
      MOE_RETURN_IF_ERROR(RequirePositive(f, "topk_group", topk_group));
      if (experts % n_group != 0) {
        return f.Error("n_group", absl::StrCat("(", n_group, ") must divide ", experts_key, " (",
                                               experts, ")"));
      }
      if (topk_group > n_group) {
        return f.Error("topk_group",
                       absl::StrCat("(", topk_group, ") must be <= n_group (", n_group, ")"));
      }
      if (top_k > topk_group * (experts / n_group)) {
        return f.Error("num_experts_per_tok",
                       absl::StrCat("(", top_k, ") exceeds the experts of topk_group groups (",
                                    topk_group * (experts / n_group), ")"));
      }
      if (c.family == ModelFamily::kDeepseekV3 && experts / n_group < 2) {
        return f.Error("n_group", "must leave at least 2 experts per group (top-2 group score)");
      }
      m.n_group = static_cast<int>(n_group);
      m.topk_group = static_cast<int>(topk_group);
    }
    MOE_ASSIGN_OR_RETURN(int64_t first_dense,
                         f.Int("first_k_dense_replace", c.family == ModelFamily::kDeepseekV3 ? 3 : 0));
    MOE_RETURN_IF_ERROR(RequireNonNegative(f, "first_k_dense_replace", first_dense));
    if (first_dense > c.num_layers) {
      return f.Error("first_k_dense_replace",
                     absl::StrCat("(", first_dense, ") exceeds num_hidden_layers (", c.num_layers, ")"));
    }
    m.first_k_dense_replace = static_cast<int>(first_dense);
  }
  if (c.family == ModelFamily::kQwen3Moe || c.family == ModelFamily::kQwen2Moe) {
    MOE_ASSIGN_OR_RETURN(int64_t step, f.Int("decoder_sparse_step", 1));
    MOE_RETURN_IF_ERROR(RequirePositive(f, "decoder_sparse_step", step));
    MOE_ASSIGN_OR_RETURN(m.decoder_sparse_step, ToInt(f, "decoder_sparse_step", step));
    MOE_ASSIGN_OR_RETURN(m.mlp_only_layers, f.IntList("mlp_only_layers"));
    for (int l : m.mlp_only_layers) {
      if (l < 0 || l >= c.num_layers) {
        return f.Error("mlp_only_layers",
                       absl::StrCat("has layer ", l, " outside [0, ", c.num_layers, ")"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseRoot(const Json& root, const std::string& source) {
  if (!root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": must be a JSON object"));
  }
  Fields f(root, source);
  ModelConfig c;

  // Architecture: `architectures[0]`, else `model_type`.
  std::vector<std::string> supported = SupportedArchitectures();
  std::string supported_list = absl::StrJoin(supported, ", ");
  const ArchEntry* entry = nullptr;
  MOE_ASSIGN_OR_RETURN(std::string model_type, f.String("model_type", ""));
  std::string arch_name;
  if (f.Has("architectures")) {
    const Json& archs = root.at("architectures");
    if (!archs.is_array() || archs.empty() || !archs[0].is_string()) {
      return f.Error("architectures",
                     absl::StrCat("must be a non-empty list of strings, got ", archs.dump()));
    }
    arch_name = archs[0].get<std::string>();
    for (const ArchEntry& e : kArchitectures) {
      if (arch_name == e.architecture) entry = &e;
    }
    if (entry == nullptr) {
      return f.Error("architectures", absl::StrCat("\"", arch_name, "\" is not supported (supported: ",
                                                   supported_list, ")"));
    }
  } else {
    for (const ArchEntry& e : kArchitectures) {
      if (model_type == e.model_type) entry = &e;
    }
    if (entry == nullptr) {
      return f.Error("model_type",
                     absl::StrCat("\"", model_type,
                                  "\" is not supported and no architectures are given (supported: ",
                                  supported_list, ")"));
    }
  }
  c.family = entry->family;
  c.architecture = entry->architecture;
  c.model_type = model_type.empty() ? std::string(entry->model_type) : model_type;
  const bool deepseek =
      c.family == ModelFamily::kDeepseekV3 || c.family == ModelFamily::kDeepseekV2;

  MOE_ASSIGN_OR_RETURN(c.vocab_size, f.Int("vocab_size", std::nullopt));
  MOE_RETURN_IF_ERROR(RequirePositive(f, "vocab_size", c.vocab_size));
  MOE_ASSIGN_OR_RETURN(c.hidden_size, f.Int("hidden_size", std::nullopt));
  MOE_RETURN_IF_ERROR(RequirePositive(f, "hidden_size", c.hidden_size));
  MOE_ASSIGN_OR_RETURN(int64_t layers, f.Int("num_hidden_layers", std::nullopt));
  MOE_RETURN_IF_ERROR(RequirePositive(f, "num_hidden_layers", layers));
  MOE_ASSIGN_OR_RETURN(c.num_layers, ToInt(f, "num_hidden_layers", layers));
  MOE_ASSIGN_OR_RETURN(int64_t heads, f.Int("num_attention_heads", std::nullopt));
  MOE_RETURN_IF_ERROR(RequirePositive(f, "num_attention_heads", heads));
  MOE_ASSIGN_OR_RETURN(c.num_heads, ToInt(f, "num_attention_heads", heads));
  MOE_ASSIGN_OR_RETURN(c.max_position_embeddings, f.Int("max_position_embeddings", 4096));
  MOE_RETURN_IF_ERROR(RequirePositive(f, "max_position_embeddings", c.max_position_embeddings));
  MOE_ASSIGN_OR_RETURN(c.rms_norm_eps, f.Double("rms_norm_eps", 1e-6));
  if (!(c.rms_norm_eps > 0.0)) {
    return f.Error("rms_norm_eps", absl::StrCat("must be positive, got ", c.rms_norm_eps));
  }
  MOE_ASSIGN_OR_RETURN(c.hidden_act, f.String("hidden_act", "silu"));
  if (c.hidden_act != "silu") {
    return f.Error("hidden_act", absl::StrCat("\"", c.hidden_act, "\" is not supported (supported: silu)"));
  }
  MOE_ASSIGN_OR_RETURN(c.intermediate_size, f.Int("intermediate_size", std::nullopt));
  MOE_RETURN_IF_ERROR(RequirePositive(f, "intermediate_size", c.intermediate_size));

  MOE_RETURN_IF_ERROR(ParseRope(root, f, c));
  if (deepseek) {
    MOE_RETURN_IF_ERROR(ParseMlaAttention(f, c));
  } else {
    MOE_RETURN_IF_ERROR(ParseGqaAttention(f, c));
  }

  // Attention extras.
  if (c.family == ModelFamily::kQwen2Moe) {
    MOE_ASSIGN_OR_RETURN(c.attention_bias, f.Bool("qkv_bias", true));
  } else if (c.family != ModelFamily::kMixtral) {
    MOE_ASSIGN_OR_RETURN(c.attention_bias, f.Bool("attention_bias", false));
  }
  if (c.family == ModelFamily::kQwen3Moe) c.qk_norm = QkNormKind::kPerHead;
  if (c.family == ModelFamily::kOlmoe) {
    c.qk_norm = QkNormKind::kWholeProjection;
    MOE_ASSIGN_OR_RETURN(c.clip_qkv, f.Double("clip_qkv", 0.0));
    if (c.clip_qkv < 0.0) return f.Error("clip_qkv", absl::StrCat("must be >= 0, got ", c.clip_qkv));
  }
  if (deepseek) {
    MOE_ASSIGN_OR_RETURN(bool mlp_bias, f.Bool("mlp_bias", false));
    if (mlp_bias) return f.Error("mlp_bias", "= true is not supported");
  }
  if (c.family == ModelFamily::kQwen3Moe || c.family == ModelFamily::kQwen2Moe) {
    MOE_ASSIGN_OR_RETURN(bool sliding, f.Bool("use_sliding_window", false));
    if (sliding) return f.Error("use_sliding_window", "= true is not supported");
  }
  if (c.family == ModelFamily::kMixtral && f.Has("sliding_window")) {
    return f.Error("sliding_window", "is not supported (must be null)");
  }

  MOE_RETURN_IF_ERROR(ParseMoe(f, c));

  MOE_ASSIGN_OR_RETURN(c.tie_word_embeddings, f.Bool("tie_word_embeddings", false));
  if (f.Has("bos_token_id")) {
    MOE_ASSIGN_OR_RETURN(int64_t bos, f.Int("bos_token_id", std::nullopt));
    c.bos_token_id = bos;
  }
  if (f.Has("pad_token_id")) {
    MOE_ASSIGN_OR_RETURN(int64_t pad, f.Int("pad_token_id", std::nullopt));
    c.pad_token_id = pad;
  }
  MOE_ASSIGN_OR_RETURN(c.eos_token_ids, f.IntOrList("eos_token_id"));
  for (int64_t id : c.eos_token_ids) {
    if (id < 0 || id >= c.vocab_size) {
      return f.Error("eos_token_id", absl::StrCat("(", id, ") is outside [0, vocab_size=",
                                                  c.vocab_size, ")"));
    }
  }
  if (c.bos_token_id && (*c.bos_token_id < 0 || *c.bos_token_id >= c.vocab_size)) {
    return f.Error("bos_token_id", absl::StrCat("(", *c.bos_token_id,
                                                ") is outside [0, vocab_size=", c.vocab_size, ")"));
  }
  MOE_ASSIGN_OR_RETURN(c.torch_dtype, f.String("torch_dtype", ""));
  MOE_ASSIGN_OR_RETURN(c.torch_dtype, f.String("dtype", c.torch_dtype));
  return c;
}

}  // namespace

double RopeConfig::CosSinScale() const {
  if (scaling != RopeScalingKind::kYarn) return 1.0;
  if (attention_factor) return *attention_factor;
  if (mscale != 0.0 && mscale_all_dim != 0.0) {
    return GetMscale(factor, mscale) / GetMscale(factor, mscale_all_dim);
  }
  return GetMscale(factor, 1.0);
}

bool ModelConfig::IsMoeLayer(int layer) const {
  if (layer < 0 || layer >= num_layers) return false;
  if (layer < moe.first_k_dense_replace) return false;
  for (int l : moe.mlp_only_layers) {
    if (l == layer) return false;
  }
  return moe.num_experts > 0 && (layer + 1) % moe.decoder_sparse_step == 0;
}

int ModelConfig::QkHeadDim() const {
  return attention == AttentionKind::kMla ? mla.qk_nope_head_dim + mla.qk_rope_head_dim
                                          : head_dim;
}

int ModelConfig::VHeadDim() const {
  return attention == AttentionKind::kMla ? mla.v_head_dim : head_dim;
}

double ModelConfig::AttentionScale() const {
  double scale = 1.0 / std::sqrt(static_cast<double>(QkHeadDim()));
  if (attention == AttentionKind::kMla && rope.scaling == RopeScalingKind::kYarn &&
      rope.mscale_all_dim != 0.0) {
    double m = GetMscale(rope.factor, rope.mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

int ModelConfig::NumMoeLayers() const {
  int n = 0;
  for (int l = 0; l < num_layers; ++l) n += IsMoeLayer(l) ? 1 : 0;
  return n;
}

const std::vector<std::string>& SupportedArchitectures() {
  static const std::vector<std::string>* names = [] {
    auto* v = new std::vector<std::string>();
    for (const ArchEntry& e : kArchitectures) v->push_back(e.architecture);
    return v;
  }();
  return *names;
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& source) {
  Json root;
  try {
    root = Json::parse(json_text);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": invalid JSON: ", e.what()));
  }
  try {
    return ParseRoot(root, source);
  } catch (const std::exception& e) {  // defensive: nlohmann accessors throw on type errors
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", e.what()));
  }
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path) {
  std::string file = path;
  {
    std::ifstream probe(path + "/config.json");
    if (probe.good()) file = path + "/config.json";
  }
  std::ifstream in(file, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", file));
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read ", file));
  return ParseModelConfig(text.str(), file);
}

}  // namespace moe::model
