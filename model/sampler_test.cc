// Tests of SequenceSampler: greedy, penalties, min_tokens, truncation (top-k, top-p, min-p),
// seeded determinism by position, and raw logprobs.
#include "model/sampler.h"

#include <cmath>
#include <map>
#include <vector>

#include "gtest/gtest.h"

namespace moe::model {
namespace {

std::vector<float> Logits(std::vector<float> v) { return v; }
using Ids = std::vector<int32_t>;

TEST(SamplerTest, GreedyPicksArgmaxTiesToLowerId) {
  SequenceSampler s({.temperature = 0.0}, {});
  EXPECT_EQ(s.Sample(Logits({0.1f, 3.0f, 3.0f, -1.0f})).token, 1);
  EXPECT_EQ(s.num_outputs(), 1);
}

TEST(SamplerTest, RawLogprobsAndTopLogprobs) {
  SequenceSampler s({.temperature = 0.0, .repetition_penalty = 5.0, .top_logprobs = 2}, Ids{2});
  std::vector<float> logits = {1.0f, 2.0f, 3.0f, 0.0f};
  SampleOutput out = s.Sample(logits);
  // Repetition penalty turns 3.0 into 0.6, so the greedy choice is 1, but logprobs stay raw.
  EXPECT_EQ(out.token, 1);
  double z = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0) + std::exp(0.0));
  EXPECT_NEAR(out.logprob, 2.0 - z, 1e-5);
  ASSERT_EQ(out.top_logprobs.size(), 2u);
  EXPECT_EQ(out.top_logprobs[0].token, 2);
  EXPECT_NEAR(out.top_logprobs[0].logprob, 3.0 - z, 1e-5);
  EXPECT_EQ(out.top_logprobs[1].token, 1);
}

TEST(SamplerTest, RepetitionPenaltyCoversPromptAndOutput) {
  // Negative logits are multiplied, positive ones divided.
  SequenceSampler s({.temperature = 0.0, .repetition_penalty = 2.0}, Ids{0});
  EXPECT_EQ(s.Sample(Logits({3.0f, 2.0f, -5.0f})).token, 1);  // 3/2 = 1.5 < 2
  // Now 1 is an output too: 2/2 = 1 < 1.5.
  EXPECT_EQ(s.Sample(Logits({3.0f, 2.0f, -5.0f})).token, 0);
}

TEST(SamplerTest, PresenceAndFrequencyPenaltiesCountOutputsOnly) {
  SequenceSampler s({.temperature = 0.0, .presence_penalty = 0.5, .frequency_penalty = 0.3},
                    Ids{0, 0, 0});
  std::vector<float> logits = {1.0f, 0.9f};
  EXPECT_EQ(s.Sample(logits).token, 0);  // the prompt does not count
  EXPECT_EQ(s.Sample(logits).token, 1);  // 1.0 - 0.8 = 0.2 < 0.9
  EXPECT_EQ(s.Sample(logits).token, 0);  // 0.9 - 0.8 = 0.1 < 0.2
  EXPECT_EQ(s.Sample(logits).token, 1);  // 1.0 - 1.1 = -0.1 < 0.1
}

TEST(SamplerTest, MinTokensBlocksEos) {
  SequenceSampler s({.temperature = 0.0, .min_tokens = 2, .min_tokens_blocked = {3}}, Ids{1});
  std::vector<float> logits = {0.0f, 1.0f, 0.5f, 9.0f};
  EXPECT_EQ(s.Sample(logits).token, 1);
  EXPECT_EQ(s.Sample(logits).token, 1);
  EXPECT_EQ(s.Sample(logits).token, 3);
}

TEST(SamplerTest, SameSeedSamePositionSameToken) {
  std::vector<float> logits(64);
  for (int i = 0; i < 64; ++i) logits[i] = std::sin(i * 0.7f);
  for (uint64_t seed : {1u, 2u, 99u}) {
    SequenceSampler a({.temperature = 1.0, .seed = seed}, std::vector<int32_t>{5, 6});
    SequenceSampler b({.temperature = 1.0, .seed = seed}, std::vector<int32_t>{7, 8});
    for (int i = 0; i < 20; ++i) EXPECT_EQ(a.Sample(logits).token, b.Sample(logits).token);
  }
  // A replayed sampler picks the same tokens from the same position on.
  SequenceSampler full({.temperature = 1.0, .seed = 5}, std::vector<int32_t>{1});
  std::vector<int32_t> outs;
  for (int i = 0; i < 10; ++i) outs.push_back(full.Sample(logits).token);
  SequenceSampler replay({.temperature = 1.0, .seed = 5}, std::vector<int32_t>{1},
                         std::span<const int32_t>(outs).subspan(0, 6));
  for (int i = 6; i < 10; ++i) EXPECT_EQ(replay.Sample(logits).token, outs[i]);
}

TEST(SamplerTest, DifferentSeedsDiffer) {
  std::vector<float> logits(64, 0.0f);
  int differ = 0;
  for (uint64_t pos = 0; pos < 50; ++pos) {
    differ += SamplingUniform(1, pos) != SamplingUniform(2, pos);
    EXPECT_GE(SamplingUniform(1, pos), 0.0);
    EXPECT_LT(SamplingUniform(1, pos), 1.0);
  }
  EXPECT_EQ(differ, 50);
}

TEST(SamplerTest, TopKOneIsGreedy) {
  std::vector<float> logits = {0.0f, 0.2f, 0.1f};
  for (uint64_t seed = 0; seed < 30; ++seed) {
    SequenceSampler s({.temperature = 2.0, .top_k = 1, .seed = seed}, {});
    EXPECT_EQ(s.Sample(logits).token, 1);
  }
}

TEST(SamplerTest, TopPAndMinPTruncate) {
  // probs ~ {0.665, 0.245, 0.09}: top_p 0.6 keeps only token 0; min_p 0.3 drops token 2.
  std::vector<float> logits = {2.0f, 1.0f, 0.0f};
  std::map<int32_t, int> seen_top_p, seen_min_p;
  for (uint64_t seed = 0; seed < 200; ++seed) {
    SequenceSampler p({.temperature = 1.0, .top_p = 0.6, .seed = seed}, {});
    ++seen_top_p[p.Sample(logits).token];
    SequenceSampler m({.temperature = 1.0, .min_p = 0.3, .seed = seed}, {});
    ++seen_min_p[m.Sample(logits).token];
  }
  EXPECT_EQ(seen_top_p.size(), 1u);
  EXPECT_EQ(seen_top_p.begin()->first, 0);
  EXPECT_EQ(seen_min_p.count(2), 0u);
  EXPECT_GT(seen_min_p[1], 20);  // ~27 % of draws
}

TEST(SamplerTest, TemperatureSamplingFollowsTheDistribution) {
  std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  std::map<int32_t, int> counts;
  const int n = 4000;
  for (uint64_t seed = 0; seed < n; ++seed) {
    SequenceSampler s({.temperature = 1.0, .seed = seed}, {});
    ++counts[s.Sample(logits).token];
  }
  EXPECT_NEAR(counts[0] / double(n), 0.5, 0.04);
  EXPECT_NEAR(counts[1] / double(n), 0.3, 0.04);
  EXPECT_NEAR(counts[2] / double(n), 0.2, 0.04);
}

TEST(SamplerTest, AllMaskedFallsBackToRawArgmax) {
  SequenceSampler s({.temperature = 0.0, .min_tokens = 1, .min_tokens_blocked = {0, 1}}, {});
  EXPECT_EQ(s.Sample(Logits({1.0f, 2.0f})).token, 1);
}

TEST(SamplerTest, ValidateNamesTheField) {
  EXPECT_TRUE(ValidateSamplingOptions({}).ok());
  auto msg = [](SamplingOptions o) { return std::string(ValidateSamplingOptions(o).message()); };
  EXPECT_NE(msg({.temperature = -1}).find("temperature"), std::string::npos);
  EXPECT_NE(msg({.top_p = 0}).find("top_p"), std::string::npos);
  EXPECT_NE(msg({.top_k = -2}).find("top_k"), std::string::npos);
  EXPECT_NE(msg({.min_p = 1.5}).find("min_p"), std::string::npos);
  EXPECT_NE(msg({.presence_penalty = 3}).find("presence_penalty"), std::string::npos);
  EXPECT_NE(msg({.frequency_penalty = -3}).find("frequency_penalty"), std::string::npos);
  EXPECT_NE(msg({.repetition_penalty = 0}).find("repetition_penalty"), std::string::npos);
  EXPECT_NE(msg({.top_logprobs = -1}).find("top_logprobs"), std::string::npos);
}

}  // namespace
}  // namespace moe::model
