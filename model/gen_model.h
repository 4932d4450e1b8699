// gen-model: writes a seeded random Mixture-of-Experts model in Hugging Face layout, for tests
// (tiny, golden fixtures) and benchmarks (small).
//
// The directory gets config.json, model.safetensors (or shards + model.safetensors.index.json
// when shard_mb > 0), tokenizer.json (byte-level BPE learned from an embedded text),
// tokenizer_config.json (bos/eos and a chat template in the style of the family) and
// generation_config.json. Every feature of the architecture is exercised by the tiny preset
// (DeepSeek-V3: dense first layer, expert groups, correction bias, shared experts, q_lora,
// yarn; Qwen2-MoE: shared expert + gate, qkv bias; Qwen3-MoE: qk-norm, an mlp_only layer...).
//
// Contract: the same options give byte-identical files on any machine: weights come from a
// counter-based hash of (seed, tensor name, element index), never from <random>'s
// distributions, and are computed with single rounding steps that do not depend on FMA
// contraction. Weights are uniform with variance chosen so activations stay O(1) and logits are
// not degenerate. Norm weights are 1 + U(-1/4, 1/4) and biases nonzero, so that they matter.
//
// Threads: GenerateModel fills tensors on `num_threads` threads; the functions are otherwise
// pure and thread-safe.
//
//   GenModelOptions options{.arch = "qwen3_moe", .preset = "tiny", .seed = 7, .out_dir = dir};
//   MOE_RETURN_IF_ERROR(GenerateModel(options));
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "model/model_config.h"

namespace moe::model {

struct GenModelOptions {
  std::string arch;            // qwen3_moe | qwen2_moe | mixtral | deepseek_v3 | deepseek_v2 | olmoe
  std::string preset = "tiny";  // tiny | small
  std::string dtype = "f32";    // f32 | bf16
  uint64_t seed = 0;
  std::string out_dir;
  int64_t shard_mb = 0;  // > 0: shards of at most this many MiB
  int num_threads = 0;   // 0: hardware concurrency
};

// The --arch values, in a fixed order.
const std::vector<std::string>& GenModelArchitectures();

// config.json text of a preset (what GenerateModel writes). kInvalidArgument for an unknown
// arch, preset or dtype, naming the flag.
absl::StatusOr<std::string> GenModelConfigJson(const GenModelOptions& options);

// The tokenizer files GenerateModel writes for `config` (vocab ids < config.vocab_size).
struct GenTokenizerFiles {
  std::string tokenizer_json;
  std::string tokenizer_config_json;
  std::string generation_config_json;
};
absl::StatusOr<GenTokenizerFiles> GenTokenizer(const ModelConfig& config);

// Writes the model directory. Returns what it wrote, for logs.
struct GenModelResult {
  std::string out_dir;
  int64_t num_parameters = 0;
  int64_t weight_bytes = 0;
  std::vector<std::string> files;
};
absl::StatusOr<GenModelResult> GenerateModel(const GenModelOptions& options);

// The value of element `index` of tensor `name` for `seed`, uniform in [-1, 1) with 24 bits,
// before scaling (exposed for tests).
float GenModelUniformForTest(uint64_t seed, const std::string& name, uint64_t index);

}  // namespace moe::model
