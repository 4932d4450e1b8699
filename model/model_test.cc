// Tests of the weights loader, the KV cache and block allocator, the forward pass's batch
// handling and ExpertExecutor seam, and the generate loop, on tiny gen-model checkpoints.
// (Numerical agreement with the reference implementation is tests/golden/golden_test.cc.)
#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/gen_model.h"
#include "model/generate.h"
#include "model/kv_cache.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "model/tensor_names.h"
#include "model/weights.h"

namespace moe::model {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using common::DType;
using common::TensorView;

// Temp dirs made by the tests, removed when the test binary ends.
std::vector<std::string>& TempDirs() {
  static auto* dirs = new std::vector<std::string>();
  return *dirs;
}

class RemoveTempDirs : public ::testing::Environment {
 public:
  void TearDown() override {
    for (const std::string& d : TempDirs()) fs::remove_all(d);
  }
};
const auto* const kRemoveTempDirs = ::testing::AddGlobalTestEnvironment(new RemoveTempDirs);

std::string MakeTempDir() {
  std::string pattern = (fs::temp_directory_path() / "moe-model-test-XXXXXX").string();
  char* dir = mkdtemp(pattern.data());
  EXPECT_NE(dir, nullptr);
  TempDirs().push_back(pattern);
  return pattern;
}

// A tiny model of `arch` in a fresh temp dir, generated once per test binary and arch.
const std::string& TinyModel(const std::string& arch, int64_t shard_mb = 0) {
  static auto* dirs = new std::map<std::string, std::string>();
  const std::string key = arch + "/" + std::to_string(shard_mb);
  auto it = dirs->find(key);
  if (it != dirs->end()) return it->second;
  GenModelOptions options;
  options.arch = arch;
  options.seed = 5;
  options.out_dir = MakeTempDir();
  options.shard_mb = shard_mb;
  absl::StatusOr<GenModelResult> r = GenerateModel(options);
  EXPECT_TRUE(r.ok()) << r.status();
  return dirs->emplace(key, options.out_dir).first->second;
}

// Copies `src` (config.json + safetensors) into a new dir, letting `edit` drop or replace
// tensors, written as shards of `shard_bytes` (0 = one file).
std::string RewriteCheckpoint(
    const std::string& src,
    const std::function<bool(const std::string& name, TensorView& view,
                             std::vector<common::Tensor>& keep)>& edit,
    int64_t shard_bytes = 0) {
  const std::string dst = MakeTempDir();
  fs::copy_file(fs::path(src) / "config.json", fs::path(dst) / "config.json");
  auto reader = SafetensorsReader::Open(src);
  EXPECT_TRUE(reader.ok()) << reader.status();
  auto names = (*reader)->TensorNames();
  EXPECT_TRUE(names.ok());
  std::vector<common::Tensor> keep;
  std::vector<TensorToWrite> tensors;
  for (const std::string& name : *names) {
    auto view = (*reader)->Get(name);
    EXPECT_TRUE(view.ok());
    TensorView v = *view;
    if (!edit(name, v, keep)) continue;
    tensors.push_back(TensorToWrite::Copy(name, v));
  }
  auto written = WriteSafetensors(dst, tensors, {.shard_bytes = shard_bytes});
  EXPECT_TRUE(written.ok()) << written.status();
  return dst;
}

ModelConfig ConfigOf(const std::string& dir) {
  auto c = LoadModelConfig(dir);
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

// ---------------------------------------------------------------------------------------
// Weights

TEST(WeightsTest, LoadsEveryTensorAsZeroCopyViews) {
  const std::string dir = TinyModel("qwen2_moe");
  const ModelConfig config = ConfigOf(dir);
  auto w = ModelWeights::Load(dir, config);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->owned_bytes(), 0u) << "an f32 checkpoint loaded as f32 needs no copies";
  EXPECT_EQ((*w)->num_loaded_experts(), config.NumMoeLayers() * config.moe.num_experts);
  const LayerWeights& l = (*w)->layer(0);
  EXPECT_FALSE(l.attn.q_bias.empty()) << "Qwen2-MoE has qkv biases";
  EXPECT_FALSE(l.moe.shared_gate.empty()) << "Qwen2-MoE has a shared expert gate";
  EXPECT_EQ((*w)->embedding().dim(0), config.vocab_size);
}

TEST(WeightsTest, ConvertsToBf16OnRequest) {
  const std::string dir = TinyModel("mixtral");
  const ModelConfig config = ConfigOf(dir);
  auto w = ModelWeights::Load(dir, config, {.dtype = DType::kBF16});
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->layer(0).attn.q_proj.dtype(), DType::kBF16);
  EXPECT_EQ((*w)->layer(0).moe.experts[0].gate.dtype(), DType::kBF16);
  EXPECT_GT((*w)->owned_bytes(), 0u);
}

TEST(WeightsTest, CorrectionBiasStaysF32AndMlaIsPrepared) {
  const std::string dir = TinyModel("deepseek_v3");
  const ModelConfig config = ConfigOf(dir);
  auto w = ModelWeights::Load(dir, config, {.dtype = DType::kBF16});
  ASSERT_TRUE(w.ok()) << w.status();
  bool found_moe = false;
  for (int l = 0; l < config.num_layers; ++l) {
    const LayerWeights& lw = (*w)->layer(l);
    EXPECT_EQ(lw.attn.w_uk_t.size(), static_cast<size_t>(config.num_heads));
    EXPECT_EQ(lw.attn.w_uk_t[0].dim(0), config.mla.kv_lora_rank);
    EXPECT_EQ(lw.attn.w_uk_t[0].dim(1), config.mla.qk_nope_head_dim);
    EXPECT_EQ(lw.attn.w_uv[0].dim(0), config.mla.v_head_dim);
    if (!lw.is_moe) continue;
    found_moe = true;
    EXPECT_EQ(lw.moe.correction_bias.dtype(), DType::kF32);
    EXPECT_EQ(lw.moe.router.dtype(), DType::kBF16);
  }
  EXPECT_TRUE(found_moe);
}

TEST(WeightsTest, MissingTensorIsNamed) {
  const std::string src = TinyModel("qwen3_moe");
  const std::string missing = "model.layers.1.self_attn.k_norm.weight";
  const std::string dir = RewriteCheckpoint(
      src, [&](const std::string& name, TensorView&, auto&) { return name != missing; });
  auto w = ModelWeights::Load(dir, ConfigOf(dir));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(w.status().message()), HasSubstr(missing));
}

TEST(WeightsTest, WrongShapeIsNamed) {
  const std::string src = TinyModel("olmoe");
  const std::string bad = "model.layers.0.mlp.experts.3.down_proj.weight";
  const std::string dir = RewriteCheckpoint(
      src, [&](const std::string& name, TensorView& v, std::vector<common::Tensor>& keep) {
        if (name == bad) {  // transposed: [F, H] instead of [H, F]
          keep.emplace_back(v.dtype(), std::vector<int64_t>{v.dim(1), v.dim(0)});
          v = keep.back().view();
        }
        return true;
      });
  auto w = ModelWeights::Load(dir, ConfigOf(dir));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(w.status().message()), HasSubstr(bad));
  EXPECT_THAT(std::string(w.status().message()), HasSubstr("expected shape"));
}

TEST(WeightsTest, ExpertSubsetSkipsTheOthers) {
  const std::string dir = TinyModel("qwen3_moe");
  const ModelConfig config = ConfigOf(dir);
  auto w = ModelWeights::Load(
      dir, config, {.experts = [](int layer, int e) { return e % 2 == 0; }});
  ASSERT_TRUE(w.ok()) << w.status();
  for (int l = 0; l < config.num_layers; ++l) {
    const LayerWeights& lw = (*w)->layer(l);
    if (!lw.is_moe) continue;
    ASSERT_EQ(lw.moe.experts.size(), static_cast<size_t>(config.moe.num_experts));
    for (int e = 0; e < config.moe.num_experts; ++e) {
      EXPECT_EQ(lw.moe.experts[e].gate.empty(), e % 2 == 1) << "layer " << l << " expert " << e;
      EXPECT_EQ(lw.moe.experts[e].down.empty(), e % 2 == 1);
    }
  }
  EXPECT_EQ((*w)->num_loaded_experts(), config.NumMoeLayers() * config.moe.num_experts / 2);
}

TEST(WeightsTest, ExpertRankMapsOnlyTheShardsOfItsExperts) {
  const std::string src = TinyModel("mixtral");
  const ModelConfig config = ConfigOf(src);
  // Many small shards, so that experts of different layers live in different files.
  const std::string dir = RewriteCheckpoint(
      src, [](const std::string&, TensorView&, auto&) { return true; }, /*shard_bytes=*/16 << 10);
  auto reader = SafetensorsReader::Open(dir);
  ASSERT_TRUE(reader.ok());
  ASSERT_TRUE((*reader)->sharded());
  const int layer = 1, expert = 3;
  auto w = ModelWeights::Load(std::move(*reader), config,
                              {.experts = [&](int l, int e) { return l == layer && e == expert; },
                               .load_non_expert = false});
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->num_loaded_experts(), 1);
  EXPECT_TRUE((*w)->embedding().empty());
  EXPECT_TRUE((*w)->layer(layer).attn.q_proj.empty());
  const TensorNames names(config);
  int64_t expert_bytes = 0;
  std::set<std::string> files;
  auto index_reader = SafetensorsReader::Open(dir);
  ASSERT_TRUE(index_reader.ok());
  for (const TensorSpec& s : names.ExpertTensors(layer, expert)) {
    expert_bytes += static_cast<int64_t>(s.shape[0] * s.shape[1] * sizeof(float));
  }
  EXPECT_EQ((*w)->total_bytes(), static_cast<size_t>(expert_bytes))
      << "the rank holds exactly one expert's weights";
  const std::vector<std::string> mapped = (*w)->reader().MappedFiles();
  EXPECT_GE(mapped.size(), 1u);
  EXPECT_LE(mapped.size(), 3u) << "only the shards holding the expert's three tensors";
  for (int l = 0; l < config.num_layers; ++l) {
    if (!config.IsMoeLayer(l)) continue;
    for (int e = 0; e < config.moe.num_experts; ++e) {
      EXPECT_EQ((*w)->layer(l).moe.experts[e].gate.empty(), !(l == layer && e == expert));
    }
  }
}

// ---------------------------------------------------------------------------------------
// KV cache and blocks

TEST(KvCacheTest, GqaAndLatentLayouts) {
  const ModelConfig gqa = ConfigOf(TinyModel("qwen3_moe"));
  auto c = KvCache::Create(gqa, {.num_blocks = 5, .block_size = 4});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE((*c)->is_latent());
  EXPECT_EQ((*c)->k(0).shape(),
            (std::vector<int64_t>{5, 4, gqa.num_kv_heads, gqa.QkHeadDim()}));
  EXPECT_EQ((*c)->v(0).shape(), (std::vector<int64_t>{5, 4, gqa.num_kv_heads, gqa.VHeadDim()}));
  EXPECT_EQ((*c)->capacity_tokens(), 20);

  const ModelConfig mla = ConfigOf(TinyModel("deepseek_v2"));
  auto m = KvCache::Create(mla, {.num_blocks = 3, .block_size = 8, .dtype = DType::kBF16});
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_TRUE((*m)->is_latent());
  const int64_t row = mla.mla.kv_lora_rank + mla.mla.qk_rope_head_dim;
  EXPECT_EQ((*m)->k(1).shape(), (std::vector<int64_t>{3, 8, 1, row}));
  const TensorView v = (*m)->v(1);
  EXPECT_EQ(v.shape(), (std::vector<int64_t>{3, 8, 1, mla.mla.kv_lora_rank}));
  EXPECT_EQ(v.data(), (*m)->k(1).data()) << "V is the latent part of the same row";
  EXPECT_EQ(v.strides()[1], row);
  EXPECT_EQ((*m)->bytes(), static_cast<size_t>(mla.num_layers * 3 * 8 * row * 2))
      << "only the compressed latent is stored";
}

TEST(KvCacheTest, RejectsBadOptions) {
  const ModelConfig config = ConfigOf(TinyModel("qwen3_moe"));
  EXPECT_FALSE(KvCache::Create(config, {.num_blocks = 0}).ok());
  EXPECT_FALSE(KvCache::Create(config, {.block_size = 0}).ok());
  EXPECT_FALSE(KvCache::Create(config, {.dtype = DType::kI32}).ok());
}

TEST(BlockAllocatorTest, AllocatesUntilFullAndReusesFreedBlocks) {
  BlockAllocator alloc(3);
  std::set<int32_t> got;
  for (int i = 0; i < 3; ++i) {
    auto b = alloc.Allocate();
    ASSERT_TRUE(b.ok());
    got.insert(*b);
  }
  EXPECT_EQ(got, (std::set<int32_t>{0, 1, 2}));
  EXPECT_EQ(alloc.num_free(), 0);
  auto full = alloc.Allocate();
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  alloc.Free(1);
  EXPECT_EQ(*alloc.Allocate(), 1);
}

TEST(BlockAllocatorTest, SequenceBlocksGrowAndRollBackWhenFull) {
  BlockAllocator alloc(4);
  SequenceBlocks a, b;
  ASSERT_TRUE(a.Reserve(5, /*block_size=*/4, alloc).ok());  // 2 blocks
  EXPECT_EQ(a.num_blocks(), 2);
  ASSERT_TRUE(a.Reserve(8, 4, alloc).ok());  // still 2
  EXPECT_EQ(a.num_blocks(), 2);
  absl::Status s = b.Reserve(12, 4, alloc);  // needs 3, only 2 free
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(b.num_blocks(), 0);
  EXPECT_EQ(alloc.num_free(), 2) << "a failed Reserve returns what it took";
  a.Release(alloc);
  EXPECT_EQ(alloc.num_free(), 4);
  EXPECT_TRUE(b.Reserve(12, 4, alloc).ok());
}

// ---------------------------------------------------------------------------------------
// Forward pass

std::unique_ptr<Model> LoadModel(const std::string& dir, ModelOptions options = {}) {
  if (options.kv.num_blocks == 256) options.kv = {.num_blocks = 32, .block_size = 4};
  auto m = Model::Load(dir, options);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

std::vector<float> LogitsRow(const ForwardOutput& out, int row) {
  const float* p = out.logits.Row(row).data_as<const float>();
  return std::vector<float>(p, p + out.logits.dim(1));
}

float MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = 0.0f;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

TEST(ForwardTest, RejectsBadBatches) {
  auto model = LoadModel(TinyModel("qwen3_moe"));
  ASSERT_NE(model, nullptr);
  const std::vector<int32_t> table = {0, 1};
  const std::vector<int32_t> ok_tokens = {1, 2, 3};
  const std::vector<int32_t> bad_tokens = {1, 100000};
  ForwardBatch batch;
  batch.seqs.push_back({.tokens = bad_tokens, .block_table = table});
  auto r = model->Forward(batch);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("token id 100000"));

  batch.seqs[0] = {.tokens = ok_tokens, .start_position = 6, .block_table = table};
  r = model->Forward(batch);  // positions 6..8 need 3 blocks of 4
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("block table"));

  const std::vector<int32_t> bad_table = {0, 999};
  batch.seqs[0] = {.tokens = ok_tokens, .start_position = 2, .block_table = bad_table};
  r = model->Forward(batch);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("block id 999"));

  batch.seqs[0] = {.tokens = {}, .block_table = table};
  EXPECT_FALSE(model->Forward(batch).ok());
  EXPECT_FALSE(model->Forward(ForwardBatch{}).ok());
}

TEST(ForwardTest, LogitsRowsFollowTheRequest) {
  auto model = LoadModel(TinyModel("olmoe"));
  ASSERT_NE(model, nullptr);
  const std::vector<int32_t> t1 = {5, 6, 7}, t2 = {8, 9}, t3 = {10, 11, 12, 13};
  const std::vector<int32_t> b1 = {0}, b2 = {1}, b3 = {2};
  ForwardBatch batch;
  batch.seqs.push_back({.tokens = t1, .block_table = b1, .logits = LogitsRows::kAll});
  batch.seqs.push_back({.tokens = t2, .block_table = b2, .logits = LogitsRows::kNone});
  batch.seqs.push_back({.tokens = t3, .block_table = b3, .logits = LogitsRows::kLast});
  auto out = model->Forward(batch);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->logits_offset, (std::vector<int32_t>{0, 3, 3, 4}));
  EXPECT_EQ(out->logits.dim(0), 4);
  EXPECT_EQ(out->logits.dim(1), model->config().vocab_size);
}

// Sums the outputs of two subset executors: what an expert-parallel data plane does.
class SplitExecutor : public ExpertExecutor {
 public:
  SplitExecutor(ExpertExecutor& a, ExpertExecutor& b, int64_t hidden) : a_(a), b_(b), hidden_(hidden) {}
  absl::Status RunRoutedExperts(int layer, TensorView x, TensorView ids, TensorView weights,
                                TensorView out) override {
    ++calls_;
    layers_.push_back(layer);
    common::Tensor partial(DType::kF32, {x.dim(0), hidden_});
    MOE_RETURN_IF_ERROR(a_.RunRoutedExperts(layer, x, ids, weights, out));
    MOE_RETURN_IF_ERROR(b_.RunRoutedExperts(layer, x, ids, weights, partial.view()));
    return kernels::Add({.a = out, .b = partial.view(), .out = out});
  }
  int calls_ = 0;
  std::vector<int> layers_;

 private:
  ExpertExecutor& a_;
  ExpertExecutor& b_;
  int64_t hidden_;
};

TEST(ForwardTest, ExpertExecutorSeamMatchesLocalExperts) {
  const std::string dir = TinyModel("deepseek_v3");
  auto full = LoadModel(dir);
  auto even = LoadModel(dir, {.experts = [](int, int e) { return e % 2 == 0; }});
  ASSERT_NE(full, nullptr);
  ASSERT_NE(even, nullptr);
  const ModelConfig& config = full->config();
  auto odd_weights = ModelWeights::Load(
      dir, config, {.experts = [](int, int e) { return e % 2 == 1; }, .load_non_expert = false});
  ASSERT_TRUE(odd_weights.ok()) << odd_weights.status();
  LocalExpertExecutor even_local(even->weights());
  LocalExpertExecutor odd_local(**odd_weights);
  SplitExecutor split(even_local, odd_local, config.hidden_size);
  even->SetExpertExecutor(&split);

  const std::vector<int32_t> tokens = {3, 1, 4, 1, 5, 9, 2, 6};
  const std::vector<int32_t> table = {0, 1};
  ForwardBatch batch;
  batch.seqs.push_back({.tokens = tokens, .block_table = table, .logits = LogitsRows::kAll});
  auto a = full->Forward(batch);
  ASSERT_TRUE(a.ok()) << a.status();
  std::vector<std::vector<float>> want;
  for (int i = 0; i < 8; ++i) want.push_back(LogitsRow(*a, i));
  auto b = even->Forward(batch);
  ASSERT_TRUE(b.ok()) << b.status();
  for (int i = 0; i < 8; ++i) {
    EXPECT_LT(MaxAbsDiff(want[i], LogitsRow(*b, i)), 1e-4) << "row " << i;
  }
  EXPECT_EQ(split.calls_, config.NumMoeLayers()) << "one call per MoE layer per step";
  for (size_t i = 1; i < split.layers_.size(); ++i) EXPECT_LT(split.layers_[i - 1], split.layers_[i]);
}

TEST(ForwardTest, ScratchGrowsForLargerBatches) {
  auto model = LoadModel(TinyModel("mixtral"), {.kv = {.num_blocks = 40, .block_size = 4},
                                                .initial_batch_tokens = 2});
  ASSERT_NE(model, nullptr);
  std::vector<int32_t> tokens(37);
  for (int i = 0; i < 37; ++i) tokens[i] = (i * 7) % 100;
  std::vector<int32_t> table(10);
  for (int i = 0; i < 10; ++i) table[i] = i;
  ForwardBatch batch;
  batch.seqs.push_back({.tokens = tokens, .block_table = table});
  auto out = model->Forward(batch);
  ASSERT_TRUE(out.ok()) << out.status();
  for (float x : LogitsRow(*out, 0)) ASSERT_TRUE(std::isfinite(x));
}

// ---------------------------------------------------------------------------------------
// Generate (sampling itself is tested in model/sampler_test.cc)

TEST(GenerateTest, ChunkedPrefillAndSeedsAreDeterministic) {
  auto model = LoadModel(TinyModel("qwen2_moe"), {.kv = {.num_blocks = 16, .block_size = 4}});
  ASSERT_NE(model, nullptr);
  const std::vector<int32_t> prompt = {11, 22, 33, 44, 55, 66, 77};
  GenerateOptions opts{.max_tokens = 8, .ignore_eos = true};
  auto whole = Generate(*model, nullptr, prompt, opts);
  ASSERT_TRUE(whole.ok()) << whole.status();
  opts.prefill_chunk_tokens = 3;
  auto chunked = Generate(*model, nullptr, prompt, opts);
  ASSERT_TRUE(chunked.ok()) << chunked.status();
  ASSERT_EQ(whole->tokens.size(), 8u);
  for (size_t i = 0; i < 8; ++i) {
    EXPECT_EQ(whole->tokens[i].sample.token, chunked->tokens[i].sample.token) << i;
    EXPECT_NEAR(whole->tokens[i].sample.logprob, chunked->tokens[i].sample.logprob, 1e-4);
  }
  opts.sampling = {.temperature = 1.0, .seed = 9};
  auto s1 = Generate(*model, nullptr, prompt, opts);
  auto s2 = Generate(*model, nullptr, prompt, opts);
  ASSERT_TRUE(s1.ok() && s2.ok());
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(s1->tokens[i].sample.token, s2->tokens[i].sample.token);
}

TEST(GenerateTest, PromptTooLongAndBadIdsAreInvalidArgument) {
  auto model = LoadModel(TinyModel("qwen2_moe"), {.kv = {.num_blocks = 2, .block_size = 4}});
  ASSERT_NE(model, nullptr);
  const std::vector<int32_t> prompt = {1, 2, 3, 4, 5, 6};
  auto r = Generate(*model, nullptr, prompt, {.max_tokens = 4});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("prompt too long"));
  const std::vector<int32_t> bad = {1, -4};
  r = Generate(*model, nullptr, bad, {.max_tokens = 1});
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("outside the vocabulary"));
}

TEST(GenerateTest, TextIsTheIncrementalDecodeOfTheTokens) {
  const std::string dir = TinyModel("qwen3_moe");
  auto model = LoadModel(dir, {.kv = {.num_blocks = 16, .block_size = 8}});
  ASSERT_NE(model, nullptr);
  auto tok = Tokenizer::FromDirectory(dir);
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::vector<int32_t> prompt = (*tok)->Encode("the experts", true);
  auto r = Generate(*model, tok->get(), prompt, {.max_tokens = 6, .ignore_eos = true});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->finish_reason, "length");
  std::string joined;
  std::vector<int32_t> ids;
  for (const GeneratedToken& t : r->tokens) {
    joined += t.text;
    ids.push_back(t.sample.token);
  }
  EXPECT_EQ(joined, r->text);
  EXPECT_EQ(r->text, (*tok)->Decode(ids, true));
}

TEST(GenerateTest, StopsAtAnEndOfSequenceId) {
  const std::string src = TinyModel("mixtral");
  const std::vector<int32_t> prompt = {40, 41, 42};
  int32_t second = 0;
  {
    auto model = LoadModel(src, {.kv = {.num_blocks = 16, .block_size = 4}});
    ASSERT_NE(model, nullptr);
    auto r = Generate(*model, nullptr, prompt, {.max_tokens = 2, .ignore_eos = true});
    ASSERT_TRUE(r.ok()) << r.status();
    second = r->tokens[1].sample.token;
  }
  // The same model with that token declared end-of-sequence in config.json.
  const std::string dir = RewriteCheckpoint(src, [](const std::string&, TensorView&, auto&) { return true; });
  std::ifstream in(fs::path(dir) / "config.json");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t at = text.find("\"eos_token_id\"");
  ASSERT_NE(at, std::string::npos);
  const size_t end = text.find_first_of(",\n}", at + 15);
  text = text.substr(0, at) + "\"eos_token_id\": " + std::to_string(second) + text.substr(end);
  std::ofstream(fs::path(dir) / "config.json") << text;
  auto model = LoadModel(dir, {.kv = {.num_blocks = 16, .block_size = 4}});
  ASSERT_NE(model, nullptr);
  auto r = Generate(*model, nullptr, prompt, {.max_tokens = 10});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->finish_reason, "stop");
  ASSERT_EQ(r->tokens.size(), 2u);
  EXPECT_EQ(r->tokens[1].sample.token, second);
}

}  // namespace
}  // namespace moe::model
