#include "model/gen_model.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/safetensors.h"
#include "model/tensor_names.h"
#include "nlohmann/json.hpp"

namespace moe::model {
namespace {

using ::testing::HasSubstr;

std::string NewDir(const std::string& name) {
  std::string dir = ::testing::TempDir() + "/gen_model_test_" + name;
  std::filesystem::remove_all(dir);
  return dir;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

GenModelResult Generate(const GenModelOptions& options) {
  absl::StatusOr<GenModelResult> result = GenerateModel(options);
  EXPECT_TRUE(result.ok()) << options.arch << ": " << result.status();
  return result.ok() ? *result : GenModelResult{};
}

TEST(GenModelTest, RandomNumbersArePinned) {
  // Changing these changes every generated model: regenerate tests/golden then.
  EXPECT_EQ(GenModelUniformForTest(0, "x", 0), -0.402532935f);
  EXPECT_EQ(GenModelUniformForTest(1234, "model.embed_tokens.weight", 7), -0.917345524f);
  EXPECT_EQ(GenModelUniformForTest(5, "w", 1000000), -0.324645996f);
  EXPECT_NE(GenModelUniformForTest(0, "x", 0), GenModelUniformForTest(1, "x", 0));
  EXPECT_NE(GenModelUniformForTest(0, "x", 0), GenModelUniformForTest(0, "y", 0));
  double sum = 0, sum_sq = 0;
  const int n = 100000;
  for (int i = 0; i < n; ++i) {
    float u = GenModelUniformForTest(7, "w", i);
    ASSERT_GE(u, -1.0f);
    ASSERT_LT(u, 1.0f);
    sum += u;
    sum_sq += u * u;
  }
  EXPECT_NEAR(sum / n, 0.0, 0.01);
  EXPECT_NEAR(sum_sq / n, 1.0 / 3.0, 0.01);
}

TEST(GenModelTest, DeterministicAndSeedDependent) {
  // bf16 qwen3_moe and f32 deepseek_v3 (yarn, correction bias kept in f32).
  for (const auto& [arch, dtype] : std::vector<std::pair<std::string, std::string>>{
           {"qwen3_moe", "bf16"}, {"deepseek_v3", "f32"}}) {
  GenModelOptions options{.arch = arch, .preset = "tiny", .dtype = dtype, .seed = 11};
  options.out_dir = NewDir("det_a");
  Generate(options);
  options.out_dir = NewDir("det_b");
  options.num_threads = 1;
  Generate(options);
  options.out_dir = NewDir("det_c");
  options.seed = 12;
  Generate(options);
  const std::string a = ::testing::TempDir() + "/gen_model_test_det_a/";
  const std::string b = ::testing::TempDir() + "/gen_model_test_det_b/";
  const std::string c = ::testing::TempDir() + "/gen_model_test_det_c/";
  for (const char* file : {"config.json", "model.safetensors", "tokenizer.json",
                           "tokenizer_config.json", "generation_config.json"}) {
    EXPECT_EQ(ReadFile(a + file), ReadFile(b + file)) << file;
  }
  EXPECT_NE(ReadFile(a + "model.safetensors"), ReadFile(c + "model.safetensors"));
  EXPECT_EQ(ReadFile(a + "tokenizer.json"), ReadFile(c + "tokenizer.json"));
  }
}

TEST(GenModelTest, TensorsMatchTensorNamesForEveryArch) {
  for (const std::string& arch : GenModelArchitectures()) {
    for (const std::string dtype : {"f32", "bf16"}) {
      GenModelOptions options{.arch = arch, .preset = "tiny", .dtype = dtype, .seed = 3};
      options.out_dir = NewDir("names_" + arch + dtype);
      GenModelResult result = Generate(options);
      absl::StatusOr<ModelConfig> config = LoadModelConfig(options.out_dir);
      ASSERT_TRUE(config.ok()) << config.status();
      EXPECT_EQ(config->torch_dtype, dtype == "bf16" ? "bfloat16" : "float32");
      absl::StatusOr<std::unique_ptr<SafetensorsReader>> reader =
          SafetensorsReader::Open(options.out_dir);
      ASSERT_TRUE(reader.ok()) << reader.status();
      std::vector<TensorSpec> specs = TensorNames(*config).AllTensors();
      absl::StatusOr<std::vector<std::string>> names = (*reader)->TensorNames();
      ASSERT_TRUE(names.ok());
      EXPECT_EQ(names->size(), specs.size()) << arch;
      int64_t params = 0;
      for (const TensorSpec& spec : specs) {
        absl::StatusOr<common::TensorView> v = (*reader)->Get(spec.name, spec.shape);
        ASSERT_TRUE(v.ok()) << arch << ": " << v.status();
        const bool f32 = dtype == "f32" || spec.keep_f32;
        EXPECT_EQ(v->dtype(), f32 ? common::DType::kF32 : common::DType::kBF16) << spec.name;
        params += v->numel();
        // Values are finite and not all equal.
        float first = f32 ? v->data_as<float>()[0] : common::Bf16ToF32(v->data_as<uint16_t>()[0]);
        bool varied = false;
        for (int64_t i = 0; i < v->numel(); ++i) {
          float x = f32 ? v->data_as<float>()[i] : common::Bf16ToF32(v->data_as<uint16_t>()[i]);
          ASSERT_TRUE(std::isfinite(x)) << spec.name;
          ASSERT_LT(std::fabs(x), 4.0f) << spec.name;
          varied |= x != first;
        }
        EXPECT_TRUE(varied || v->numel() == 1) << spec.name;
      }
      EXPECT_EQ(params, result.num_parameters);
      absl::StatusOr<std::map<std::string, std::string>> md = (*reader)->Metadata();
      ASSERT_TRUE(md.ok());
      EXPECT_EQ(md->at("format"), "pt");
      EXPECT_THAT(md->at("moe_serve_gen_model"), HasSubstr("--arch " + arch));
    }
  }
}

TEST(GenModelTest, ShardedHoldsTheSameTensors) {
  GenModelOptions options{.arch = "mixtral", .preset = "tiny", .dtype = "bf16", .seed = 9};
  options.out_dir = NewDir("single");
  Generate(options);
  options.out_dir = NewDir("sharded");
  options.shard_mb = 0;
  GenModelOptions sharded = options;
  sharded.shard_mb = 1;  // ~0.8 MB of bf16 weights: 1 shard per MiB
  sharded.out_dir = NewDir("sharded");
  Generate(sharded);
  auto single = SafetensorsReader::Open(::testing::TempDir() + "/gen_model_test_single");
  auto shards = SafetensorsReader::Open(sharded.out_dir);
  ASSERT_TRUE(single.ok() && shards.ok());
  EXPECT_TRUE((*shards)->sharded());
  absl::StatusOr<std::vector<std::string>> names = (*single)->TensorNames();
  ASSERT_TRUE(names.ok());
  for (const std::string& name : *names) {
    absl::StatusOr<common::TensorView> x = (*single)->Get(name);
    absl::StatusOr<common::TensorView> y = (*shards)->Get(name);
    ASSERT_TRUE(x.ok() && y.ok()) << name;
    ASSERT_EQ(x->shape(), y->shape());
    EXPECT_EQ(std::memcmp(x->data(), y->data(), x->nbytes()), 0) << name;
  }
}

TEST(GenModelTest, ShardedSubsetMapsOnlyNeededShards) {
  GenModelOptions options{.arch = "olmoe", .preset = "tiny", .dtype = "f32", .seed = 2};
  options.shard_mb = 1;
  options.out_dir = NewDir("subset");
  Generate(options);
  absl::StatusOr<ModelConfig> config = LoadModelConfig(options.out_dir);
  ASSERT_TRUE(config.ok());
  auto reader = SafetensorsReader::Open(options.out_dir);
  ASSERT_TRUE(reader.ok());
  ExpertTensorNames e = TensorNames(*config).Expert(config->num_layers - 1, 15);
  ASSERT_TRUE((*reader)->Prefetch({e.gate_proj, e.up_proj, e.down_proj}).ok());
  EXPECT_EQ((*reader)->MappedFiles().size(), 1u);
  int shards = 0;
  for (const auto& f : std::filesystem::directory_iterator(options.out_dir)) {
    shards += f.path().extension() == ".safetensors";
  }
  EXPECT_GE(shards, 2);
}

TEST(GenModelTest, TokenizerFiles) {
  for (const std::string& arch : GenModelArchitectures()) {
    GenModelOptions options{.arch = arch};
    absl::StatusOr<std::string> text = GenModelConfigJson(options);
    ASSERT_TRUE(text.ok());
    absl::StatusOr<ModelConfig> config = ParseModelConfig(*text);
    ASSERT_TRUE(config.ok());
    absl::StatusOr<GenTokenizerFiles> files = GenTokenizer(*config);
    ASSERT_TRUE(files.ok()) << files.status();
    nlohmann::json tok = nlohmann::json::parse(files->tokenizer_json);
    nlohmann::json tc = nlohmann::json::parse(files->tokenizer_config_json);
    EXPECT_EQ(tok["model"]["type"], "BPE");
    EXPECT_EQ(tok["decoder"]["type"], "ByteLevel");
    const int64_t vocab = static_cast<int64_t>(tok["model"]["vocab"].size());
    int64_t max_id = 0;
    for (const auto& [k, v] : tok["model"]["vocab"].items()) max_id = std::max<int64_t>(max_id, v);
    for (const auto& t : tok["added_tokens"]) max_id = std::max<int64_t>(max_id, t["id"]);
    EXPECT_LT(max_id, config->vocab_size) << arch;
    EXPECT_GE(vocab, 256 + 200) << arch;  // bytes plus learned merges
    EXPECT_FALSE(tc["chat_template"].get<std::string>().empty());
    ASSERT_FALSE(config->eos_token_ids.empty());
    bool eos_found = false;
    for (const auto& t : tok["added_tokens"]) {
      if (t["id"] == config->eos_token_ids[0]) {
        EXPECT_EQ(t["content"], tc["eos_token"]) << arch;
        eos_found = true;
      }
    }
    EXPECT_TRUE(eos_found) << arch;
  }
}

TEST(GenModelTest, SmallQwen2MoeHasTheBenchmarkShape) {
  GenModelOptions options{.arch = "qwen2_moe", .preset = "small"};
  absl::StatusOr<std::string> text = GenModelConfigJson(options);
  ASSERT_TRUE(text.ok());
  absl::StatusOr<ModelConfig> c = ParseModelConfig(*text);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->hidden_size, 1024);
  EXPECT_EQ(c->num_layers, 16);
  EXPECT_EQ(c->num_heads, 16);
  EXPECT_EQ(c->num_kv_heads, 4);
  EXPECT_EQ(c->moe.num_experts, 64);
  EXPECT_EQ(c->moe.top_k, 8);
  EXPECT_EQ(c->moe.expert_intermediate_size, 256);
  EXPECT_EQ(c->moe.shared_intermediate_size, 512);
  EXPECT_EQ(c->vocab_size, 32000);
  int64_t params = 0;
  for (const TensorSpec& s : TensorNames(*c).AllTensors()) {
    int64_t n = 1;
    for (int64_t d : s.shape) n *= d;
    params += n;
  }
  EXPECT_EQ(params, 939074560);
}

TEST(GenModelTest, BadOptionsNameTheFlag) {
  GenModelOptions options{.arch = "llama", .out_dir = NewDir("bad")};
  absl::StatusOr<GenModelResult> r = GenerateModel(options);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("--arch \"llama\""));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("deepseek_v3"));
  options.arch = "olmoe";
  options.preset = "huge";
  EXPECT_THAT(std::string(GenerateModel(options).status().message()), HasSubstr("--preset"));
  options.preset = "tiny";
  options.dtype = "f16";
  EXPECT_THAT(std::string(GenerateModel(options).status().message()), HasSubstr("--dtype"));
}

}  // namespace
}  // namespace moe::model
